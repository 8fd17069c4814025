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
