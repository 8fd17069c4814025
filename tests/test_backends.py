"""Training backends register themselves: one module declares a backend (name, summary,
installation, options) and the settings, the API's validation, `vbs finetune backends`, the
trainer and the docs find it. Proved with ``tests/plugin_backend.py``, which no file of vbs
names: only ``VBS_TRAINING_BACKEND_MODULES`` points at it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

from vbs_resources import load_settings
from vbs_resources.settings import SettingsError
from vbs_resources.training import (
    BACKENDS,
    Hyperparameters,
    Trainer,
    TrainingBackend,
    TrainingError,
    TrainingJob,
    describe_backends,
    register_backend,
)
from vbs_resources.training import _imported as imported_modules
from vbs_resources.training.jobs import JobError, check_backend

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = "tests.plugin_backend"


@pytest.fixture
def registry():
    """The process's registry as it was before the test, whatever the test registered."""
    backends, modules = dict(BACKENDS), set(imported_modules)
    try:
        yield BACKENDS
    finally:
        BACKENDS.clear()
        BACKENDS.update(backends)
        imported_modules.clear()
        imported_modules.update(modules)


def vbs_backends(**env: str) -> dict[str, dict]:
    """`vbs finetune backends --json` in a process of its own, the tests' folder on its path."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("VBS_")}
    full.update(PYTHONPATH=str(ROOT), **env)
    out = subprocess.run(
        [sys.executable, "-m", "vbs_cli.main", "finetune", "backends", "--json"],
        env=full, capture_output=True, text=True, timeout=120, check=True, cwd="/",
    ).stdout  # fmt: skip
    return {b["name"]: b for b in map(json.loads, out.splitlines())}


def test_a_backend_from_the_test_folder_alone_is_found_and_trains(registry, tmp_path, model_dir):
    assert "untrained_lora" not in vbs_backends()
    listed = vbs_backends(VBS_TRAINING_BACKEND_MODULES=PLUGIN)["untrained_lora"]
    assert listed["missing"] == [] and "test folder" in listed["summary"]
    assert listed["options"] == [
        {"variable": "VBS_UNTRAINED_LORA_INIT", "type": "str", "default": "true",
         "description": "peft's init_lora_weights: true, gaussian, ..."},
    ]  # fmt: skip
    # The built-in ones are listed beside it: those of vbs's environment ready; Axolotl's
    # (optional, an environment of its own) ready or naming how to install it.
    listed = vbs_backends()
    assert set(listed) == {"axolotl", "hf", "openai", "unsloth"}
    assert all(not listed[name]["missing"] for name in ("hf", "openai", "unsloth"))
    assert all("make axolotl" in m for m in listed["axolotl"]["missing"])

    with pytest.raises(JobError, match="untrained_lora.*known: axolotl, hf, openai, unsloth"):
        check_backend("untrained_lora")  # the API's validation, before the settings named it
    settings = load_settings(
        {"VBS_TRAINING_BACKEND_MODULES": f" {PLUGIN} ,", "VBS_TRAINER_BACKEND": "untrained_lora"}
    )
    assert settings.trainer_backend == "untrained_lora"
    assert check_backend("untrained_lora") == "untrained_lora"

    train = tmp_path / "train.jsonl"
    train.write_text(
        json.dumps({"messages": [{"role": "user", "content": "Hi."},
                                 {"role": "assistant", "content": "Hello."}]}) + "\n"
    )  # fmt: skip
    out = tmp_path / "adapter"
    hp = Hyperparameters(lora_r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    outcome = Trainer(backend=settings.trainer_backend).train(
        TrainingJob(str(model_dir), str(train), str(out), hp)
    )
    assert (outcome.backend, outcome.steps, outcome.train_examples) == ("untrained_lora", 0, 1)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert json.loads((out / "vbs_training.json").read_text())["backend"] == "untrained_lora"


def test_bad_backends_and_settings_are_refused_by_name(registry):
    with pytest.raises(SettingsError, match=r"^VBS_TRAINER_BACKEND='nöpe\\u202e' is no .*hf"):
        load_settings({"VBS_TRAINER_BACKEND": "nöpe\u202e"})
    with pytest.raises(SettingsError, match=r"^VBS_TRAINING_BACKEND_MODULES: .*tests\.no_such"):
        load_settings({"VBS_TRAINING_BACKEND_MODULES": "tests.no_such_module"})
    # A backend's option set wrong is what the listing says it lacks, naming the variable.
    listed = vbs_backends(VBS_OPENAI_FT_EXTRA_BODY="[1]", VBS_AXOLOTL_DEVICE="gpu\u202e")
    assert listed["openai"]["missing"] == [
        "VBS_OPENAI_FT_EXTRA_BODY: Value error, must be a JSON object"
    ]
    assert listed["axolotl"]["missing"][0].startswith("VBS_AXOLOTL_DEVICE: Input should be")
    # A backend that cannot train here is refused at the door (the API's validation), with why.
    with mock.patch.dict(os.environ, {"VBS_AXOLOTL_COMMAND": "/nonexistent/axolotl"}):
        with pytest.raises(
            JobError, match=r"axolotl training backend cannot train here: .*make axo"
        ):
            check_backend("axolotl")
    with mock.patch.dict(os.environ, {"VBS_OPENAI_FT_POLL_SECONDS": "nan"}):
        with pytest.raises(JobError, match="VBS_OPENAI_FT_POLL_SECONDS"):
            check_backend("openai")

    class Nameless(TrainingBackend):
        summary, install = "s", "i"

        def train(self, job):  # pragma: no cover - never called
            raise AssertionError

    for name in (None, "", "Upper", "x" * 41, "a b", "1st"):
        Nameless.name = name
        with pytest.raises(TrainingError, match="name must be"):
            register_backend(Nameless)

    class Hf(Nameless):
        name = "hf"

    with pytest.raises(TrainingError, match="Two training backends are named 'hf'"):
        register_backend(Hf)
    assert BACKENDS["hf"].__module__ == "vbs_resources.training.hf_backend"

    class Undeclared(TrainingBackend):
        name = "undeclared"

        def train(self, job):  # pragma: no cover
            raise AssertionError

    with pytest.raises(TrainingError, match="declares no summary"):
        register_backend(Undeclared)


def test_the_docs_list_every_backend_and_its_options():
    """docs/fine-tuning.md's table of backends is the registry's (`vbs finetune backends`)."""
    text = (ROOT / "docs" / "fine-tuning.md").read_text()
    for backend in describe_backends():
        assert f"| `{backend['name']}` |" in text, backend["name"]
        for option in backend["options"]:
            assert f"`{option['variable']}`" in text, option["variable"]
