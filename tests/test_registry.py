"""The model registry: configured models registered on start, adapters checked at the door
(`vbs models add`), retirement, and the API's `/v1/models`."""

import json
import subprocess
import sys

import pytest

from tests.adapters import make_adapter
from tests.conftest import resources_for, settings_for
from vbs_resources.registry import ModelRegistry, RegistryError

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture
def registry(home, model_dir):
    resources = resources_for(home, model_dir)
    registry = ModelRegistry(resources["catalog"], max_lora_rank=64)
    registry.register_configured(resources["engine"].configured_models())
    return registry


def vbs_models(home, model_dir, *args):
    env = {"PATH": "/usr/bin:/bin", "VBS_HOME": str(home), "VBS_MODEL": str(model_dir)}
    return subprocess.run(
        [sys.executable, "-m", "vbs_cli.main", "models", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_configured_models_are_registered_once_and_follow_the_settings(registry, model_dir):
    names = {(m["name"], m["kind"]) for m in registry.list()}
    assert names == {(MODEL, "base"), ("all-MiniLM-L6-v2", "embedding")}
    # Again, with the base model moved: one row, new path.
    from vbs_resources.registry import ServedModel

    registry.register_configured([ServedModel(MODEL, "base", "/elsewhere/SmolLM2")])
    assert registry.get(MODEL)["path"] == "/elsewhere/SmolLM2"
    assert len(registry.list()) == 2


def test_an_adapter_is_added_listed_and_retired_through_the_cli(home, model_dir, tmp_path):
    adapter = make_adapter(tmp_path / "support-v3", model_dir)
    added = vbs_models(home, model_dir, "add", "support-v3", "--adapter", str(adapter))
    assert added.returncode == 0, added.stderr
    row = json.loads(added.stdout)
    assert (row["kind"], row["base"], row["rank"], row["status"]) == (
        "adapter",
        MODEL,
        8,
        "available",
    )
    listed = [
        json.loads(x)["name"] for x in vbs_models(home, model_dir, "list").stdout.splitlines()
    ]
    assert "support-v3" in listed
    retired = vbs_models(home, model_dir, "retire", "support-v3")
    assert retired.returncode == 0 and json.loads(retired.stdout)["status"] == "retired"
    listed = [
        json.loads(x)["name"] for x in vbs_models(home, model_dir, "list").stdout.splitlines()
    ]
    assert "support-v3" not in listed
    everything = vbs_models(home, model_dir, "list", "--all").stdout
    assert "support-v3" in everything
    assert adapter.exists()  # retiring never deletes files
    again = vbs_models(home, model_dir, "add", "support-v3", "--adapter", str(adapter))
    assert again.returncode == 2 and "never reused" in again.stderr


@pytest.mark.parametrize(
    "change, field",
    [
        ({"peft_type": "PREFIX_TUNING"}, "peft_type"),
        ({"r": 128}, "r"),
        ({"r": "8"}, "r"),
        ({"target_modules": []}, "target_modules"),
        ({"base_model_name_or_path": "meta-llama/Llama-3.1-8B"}, "base_model_name_or_path"),
        ({"base_model_name_or_path": None}, "base_model_name_or_path"),
    ],
)
def test_a_malformed_adapter_is_refused_naming_what_is_wrong(
    registry, model_dir, tmp_path, change, field
):
    adapter = make_adapter(tmp_path / "bad", model_dir, **change)
    with pytest.raises(RegistryError) as info:
        registry.add_adapter("bad", str(adapter))
    assert info.value.field == field
    assert registry.catalog.models.get("bad") is None


def test_missing_files_names_and_bases_are_refused(registry, model_dir, tmp_path):
    good = make_adapter(tmp_path / "good", model_dir)
    no_weights = make_adapter(tmp_path / "no-weights", model_dir)
    (no_weights / "adapter_model.safetensors").unlink()
    no_config = make_adapter(tmp_path / "no-config", model_dir)
    (no_config / "adapter_config.json").unlink()
    broken = make_adapter(tmp_path / "broken", model_dir)
    (broken / "adapter_config.json").write_text("{not json")
    cases = [
        (("x1", str(tmp_path / "nowhere")), {}, "path"),
        (("x2", str(no_weights)), {}, "weights"),
        (("x3", str(no_config)), {}, "adapter_config.json"),
        (("x4", str(broken)), {}, "adapter_config.json"),
        (("bad name!", str(good)), {}, "name"),
        (("x5", str(good)), {"base": "no-such-base"}, "base"),
        (("x6", str(good)), {"base": "all-MiniLM-L6-v2"}, "base"),
    ]
    for (name, path), kwargs, field in cases:
        with pytest.raises(RegistryError) as info:
            registry.add_adapter(name, path, **kwargs)
        assert info.value.field == field, (name, info.value.message)
    # The adapter's base named by its Hub id matches the local folder of the same name.
    hub = make_adapter(
        tmp_path / "hub", model_dir, base_model_name_or_path=f"HuggingFaceTB/{MODEL}"
    )
    assert registry.add_adapter("from-hub-id", str(hub))["base"] == MODEL


def _rewrite_tensors(folder, change) -> None:
    """Write the adapter's tensors again, each as ``change(name, tensor)`` makes it (None drops
    it)."""
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    tensors = {}
    for name, tensor in load_file(str(path)).items():
        changed = change(name, tensor)
        if changed is not None:
            tensors[name] = changed
    save_file(tensors, str(path))


def test_the_weights_are_read_at_registration_and_named_when_they_cannot_serve(
    registry, model_dir, tmp_path
):
    import torch

    def adapter(name, change=None, raw=None, **config):
        folder = make_adapter(tmp_path / name, model_dir, **config)
        if change is not None:
            _rewrite_tensors(folder, change)
        if raw is not None:
            weights = folder / "adapter_model.safetensors"
            weights.write_bytes(raw(weights.read_bytes()))
        return str(folder)

    first = "base_model.model.model.layers.0.self_attn.q_proj"
    cases = {
        "garbage": adapter("garbage", raw=lambda b: bytes(range(256)) * 64),
        "truncated": adapter("truncated", raw=lambda b: b[: len(b) // 2]),
        "header-lies": adapter("header-lies", raw=lambda b: b[:8] + b"]" + b[9:]),
        "narrow": adapter(
            "narrow", lambda n, t: t[:, :100].contiguous() if n == f"{first}.lora_A.weight" else t
        ),
        "rank": adapter("rank", lambda n, t: torch.zeros(4, t.shape[1]) if ".lora_A." in n else t),
        "half": adapter("half", lambda n, t: None if n == f"{first}.lora_B.weight" else t),
        "untargeted": adapter(
            "untargeted", targets=("q_proj", "k_proj"), target_modules=["q_proj"]
        ),  # fmt: skip
        "deep": adapter("deep"),
        "empty": adapter("empty", lambda n, t: None),
    }
    # A layer the base does not have.
    _rewrite_tensors(
        tmp_path / "deep",
        lambda n, t: t if ".layers.0." not in n else None,
    )
    from safetensors.torch import load_file, save_file

    deep = tmp_path / "deep" / "adapter_model.safetensors"
    tensors = load_file(str(deep))
    tensors["base_model.model.model.layers.99.self_attn.q_proj.lora_A.weight"] = torch.zeros(8, 576)
    save_file(tensors, str(deep))
    expected = {
        "garbage": "not safetensors",
        "truncated": "outside the file's data",
        "header-lies": "not JSON",
        "narrow": "needs [8, 576]",
        "rank": "rank 4",
        "half": "has no lora_B",
        "untargeted": "target_modules does not name",
        "deep": "layer 99",
        "empty": "no LoRA tensors",
    }
    for name, path in cases.items():
        with pytest.raises(RegistryError) as info:
            registry.add_adapter(name, path)
        assert expected[name] in info.value.message, (name, info.value.message)
        assert info.value.message.startswith("adapter_model.safetensors: "), name
        assert registry.catalog.models.get(name) is None
    # The tensor at fault is named as the field.
    with pytest.raises(RegistryError) as info:
        registry.add_adapter("narrow", cases["narrow"])
    assert info.value.field == f"{first}.lora_A.weight"


def test_the_api_lists_available_models_with_parent_and_root(home, model_dir, tmp_path):
    from fastapi.testclient import TestClient
    from openai import NotFoundError, OpenAI

    from vbs_api.app import create_app

    resources = resources_for(home, model_dir)
    app = create_app(settings_for(home, model_dir, VBS_API_KEYS="k"), resources)
    http = TestClient(app, base_url="http://testserver/v1")
    client = OpenAI(base_url="http://testserver/v1", api_key="k", http_client=http)
    registry = ModelRegistry(resources["catalog"])
    adapter = make_adapter(tmp_path / "a", model_dir)
    registry.add_adapter("ft:SmolLM2:support:abc123", str(adapter))
    registry.add_adapter("old-adapter", str(adapter))
    registry.retire("old-adapter")
    listed = {m.id: m for m in client.models.list()}
    assert set(listed) == {MODEL, "all-MiniLM-L6-v2", "ft:SmolLM2:support:abc123"}
    one = client.models.retrieve("ft:SmolLM2:support:abc123")
    assert (one.model_extra["parent"], one.model_extra["root"]) == (MODEL, str(adapter))
    assert listed[MODEL].model_extra["parent"] is None
    with pytest.raises(NotFoundError):
        client.models.retrieve("old-adapter")
