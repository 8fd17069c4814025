"""What a read of the CUDA paths found (issue 21), proven here on CPU where the logic allows: the
device taken from the installed vLLM build, each engine's share of a GPU, the server's command
line and environment on CUDA, FlashInfer's sampler, the environment rebuilt for the other
extra, the driver check of `vbs doctor`, and Unsloth's compile cache.

The CUDA build of vLLM cannot be installed on these machines: where a test needs it, it sets
``installed_vllm_build`` (the package metadata) to ``"cuda"`` and says so. ``nvidia-smi`` is a
test double of the driver's tool (a script printing what the real one prints)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import settings_for
from vbs_cli.doctor import cuda_fits_driver, gpu, gpu_report
from vbs_resources import build_local_engine
from vbs_resources.engine import hardware
from vbs_resources.engine.hardware import (
    EngineSetupError,
    detect_device,
    flashinfer_sampler,
    installed_vllm_build,
)
from vbs_resources.settings import SettingsError

ROOT = Path(__file__).resolve().parent.parent

NVIDIA_SMI_DOUBLE = """#!/bin/sh
if [ "$1" = "-L" ]; then
  echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-00000000-0000-0000-0000-000000000000)"
else
  echo "| NVIDIA-SMI 550.54.15    Driver Version: 550.54.15    CUDA Version: 12.4     |"
fi
"""


@pytest.fixture
def gpu_host(tmp_path, monkeypatch):
    """This host with a GPU's driver tool on PATH (``nvidia_smi_double``)."""
    bin_dir = tmp_path / "nvidia_smi_double"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(NVIDIA_SMI_DOUBLE)
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert hardware.gpu_present() and hardware.gpu_count() == 1


def test_the_device_is_the_installed_vllm_builds_not_the_hosts(gpu_host):
    # `make setup EXTRA=cpu` on a GPU host: the CPU build runs on the CPU, GPUs or not.
    assert installed_vllm_build() == "cpu"
    assert detect_device() == "cpu" and detect_device("") == "cpu" and detect_device("0") == "cpu"
    # The CUDA build (package metadata set, it cannot be installed here) runs on the GPUs...
    assert detect_device(None, build="cuda") == "cuda"
    assert detect_device("1", build="cuda") == "cuda"
    # ...and cannot run with every GPU hidden: said, not attempted on the CPU.
    with pytest.raises(EngineSetupError, match="CUDA_VISIBLE_DEVICES is set empty.*EXTRA=cpu"):
        detect_device("", build="cuda")
    # No vLLM at all: the host decides.
    assert detect_device(None, build=None) == "cuda" and detect_device("", build=None) == "cpu"


def test_each_engine_has_its_share_of_the_gpu_and_the_embedding_one_comes_off_the_chats(
    tmp_path, monkeypatch
):
    settings = settings_for(
        tmp_path, VBS_GPU_MEMORY_UTILIZATION="0.9", VBS_EMBEDDING_GPU_MEMORY_UTILIZATION="0.05"
    )
    local = build_local_engine(settings)
    assert local.embedding_model  # the packaged all-MiniLM-L6-v2
    assert (local.gpu_memory_utilization, local.embedding_gpu_memory_utilization) == (0.85, 0.05)
    chat = local.llm_options(local.model, "generate", "cuda")
    pooling = local.llm_options(local.embedding_model, "pooling", "cuda")
    assert chat["gpu_memory_utilization"] == 0.85
    assert pooling["gpu_memory_utilization"] == 0.05 and pooling["runner"] == "pooling"
    assert chat["gpu_memory_utilization"] + pooling["gpu_memory_utilization"] <= 0.9
    # On the CPU vLLM takes no share (its KV cache is VLLM_CPU_KVCACHE_SPACE).
    assert "gpu_memory_utilization" not in local.llm_options(local.model, "generate", "cpu")
    # No embedding model: the chat engine has the whole share.
    alone = build_local_engine(
        settings_for(tmp_path, VBS_GPU_MEMORY_UTILIZATION="0.9", VBS_EMBEDDING_MODEL="")
    )
    assert alone.embedding_model is None and alone.gpu_memory_utilization == 0.9
    # The warm server on CUDA asks vLLM for the chat engine's share, so that a run's embedding
    # engine still finds its own free on the same GPU.
    from vbs_cli.engine import server_command

    monkeypatch.setattr(hardware, "installed_vllm_build", lambda: "cuda")
    command, env = server_command(settings)
    assert command[command.index("--gpu-memory-utilization") + 1] == "0.85"
    assert "--enable-sleep-mode" in command and "--enforce-eager" not in command
    assert env["VLLM_SERVER_DEV_MODE"] == "1" and "VBS_ENGINE_FOLLOW_LOAD" not in env
    # A share that leaves the chat engine nothing is refused, naming both settings.
    with pytest.raises(SettingsError, match="VBS_EMBEDDING_GPU_MEMORY_UTILIZATION=0.9 .*"):
        settings_for(
            tmp_path, VBS_GPU_MEMORY_UTILIZATION="0.9", VBS_EMBEDDING_GPU_MEMORY_UTILIZATION="0.9"
        )


def test_flashinfers_sampler_is_off_unless_its_kernels_match_it(tmp_path, monkeypatch):
    # Without FlashInfer (the CPU build here): vLLM's default, nothing set.
    assert flashinfer_sampler() is None
    assert flashinfer_sampler({}) is None
    python = {"flashinfer-python": "0.6.3"}
    # Installed without its kernels, or with another version's: PyTorch's sampler.
    assert flashinfer_sampler(python) == "0"
    assert flashinfer_sampler({**python, "flashinfer-cubin": "0.6.2"}) == "0"
    assert flashinfer_sampler({**python, "flashinfer-cubin": "0.6.3",
                               "flashinfer-jit-cache": "0.6.1"}) == "0"  # fmt: skip
    # `vllm download-kernels` installed them: FlashInfer samples.
    assert flashinfer_sampler({**python, "flashinfer-cubin": "0.6.3"}) is None
    assert flashinfer_sampler({**python, "flashinfer-cubin": "0.6.3",
                               "flashinfer-jit-cache": "0.6.3"}) is None  # fmt: skip
    # The CUDA server gets the decision in its environment; a user's own setting wins.
    from vbs_cli import engine

    monkeypatch.setattr(hardware, "installed_vllm_build", lambda: "cuda")
    monkeypatch.setattr(engine, "flashinfer_sampler", lambda: "0")
    settings = settings_for(tmp_path)
    assert engine.server_command(settings)[1]["VLLM_USE_FLASHINFER_SAMPLER"] == "0"
    monkeypatch.setenv("VLLM_USE_FLASHINFER_SAMPLER", "1")
    assert engine.server_command(settings)[1]["VLLM_USE_FLASHINFER_SAMPLER"] == "1"


def test_an_environment_built_for_the_other_extra_is_built_again(tmp_path):
    venv = tmp_path / "venv"

    def make(extra: str) -> str:
        return subprocess.run(
            ["make", "--no-print-directory", f"VENV={venv}", f"EXTRA={extra}", "venv-for-extra"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip

    venv.mkdir()
    (venv / ".installed-cpu").touch()
    (venv / "kept").touch()
    assert make("cpu") == "" and (venv / "kept").exists()  # its own extra: kept
    assert "was built for cpu, not gpu" in make("gpu")
    assert not venv.exists()  # the gpu extra gets a fresh environment
    assert make("gpu") == ""  # nothing there: nothing to do
    # The recipe that installs an extra runs the check first.
    recipe = subprocess.run(
        ["make", "-n", f"VENV={tmp_path / 'fresh'}", "EXTRA=gpu", "setup"],
        cwd=ROOT, capture_output=True, text=True,
    ).stdout  # fmt: skip
    assert recipe.index("venv-for-extra") < recipe.index("pip install")
    assert "vllm download-kernels" in recipe
    # torch from PyTorch's index for the CUDA vLLM's wheel is built with, as vLLM installs it.
    assert "--extra-index-url https://download.pytorch.org/whl/cu129" in recipe

    # On the gpu extra the suite runs on one worker (two workers' engines would share a GPU).
    def pytest_line(extra: str) -> str:
        dry = subprocess.run(["make", "-n", f"EXTRA={extra}", "test"], cwd=ROOT,
                             capture_output=True, text=True).stdout  # fmt: skip
        return next(line for line in dry.splitlines() if "-m pytest" in line)

    assert " -n 1 " in pytest_line("gpu") and " -n 2 " in pytest_line("cpu")


def test_doctor_checks_the_build_the_gpus_and_the_driver_against_torch(gpu_host, tmp_path):
    # This host, a GPU's driver (the double) and vLLM's CPU build: said, not failed.
    check = gpu(settings_for(tmp_path), 5)
    assert check.ok is None and "vLLM's CPU build is installed" in check.detail
    assert "EXTRA=gpu" in check.detail
    h100 = ["GPU 0: NVIDIA H100 80GB HBM3"]
    # The CUDA build (as its metadata would say):
    ok = gpu_report("cuda", h100, "12.8", "12.8", None)
    assert ok.ok is True and "CUDA 12.8, driver up to 12.8" in ok.detail
    old_driver = gpu_report("cuda", h100, "11.8", "12.8", None)
    assert old_driver.ok is False and "upgrade the NVIDIA driver" in old_driver.fix
    minor = gpu_report("cuda", h100, "12.4", "12.8", None)
    assert minor.ok is None and "minor version compatibility" in minor.detail
    hidden = gpu_report("cuda", h100, "12.8", "12.8", "")
    assert hidden.ok is False and "CUDA_VISIBLE_DEVICES" in hidden.detail
    no_gpu = gpu_report("cuda", [], None, "12.8", None)
    assert no_gpu.ok is False and "EXTRA=cpu" in no_gpu.fix
    assert [cuda_fits_driver(t, d) for t, d in [("12.8", "12.9"), ("12.8", "13.0"),
            ("13.0", "12.9"), ("12.9", "12.8"), (None, "12.8"), ("12.8", None)]] == [
        True, True, False, None, False, False]  # fmt: skip


def test_unslothes_compile_cache_goes_under_vbs_home_not_the_working_directory(tmp_path):
    """Unsloth writes generated sources to ``unsloth_compiled_cache`` in the working directory
    (the checkout, where ruff would lint them) unless told otherwise before its import."""
    code = (
        "from vbs_resources.training.unsloth_backend import prepare_import\n"
        "prepare_import()\n"
        "import unsloth  # noqa: F401\n"
        "import unsloth_zoo.compiler as c\n"
        "print(c.UNSLOTH_COMPILE_LOCATION)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "UNSLOTH_COMPILE_LOCATION"}
    env["VBS_HOME"] = str(tmp_path / "vbs")
    found = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert found.returncode == 0, found.stderr[-2000:]
    where = found.stdout.strip().splitlines()[-1]
    assert where == str(tmp_path / "vbs" / "cache" / "unsloth_compiled_cache")
    assert not (tmp_path / "unsloth_compiled_cache").exists()
