"""The code location loads, names what it should, stays light to load, and keeps its import
direction (settings/layout/wire <- resources <- assets <- sensors <- definitions)."""

import ast
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from vbs_definitions import defs
from vbs_resources import Catalog

ROOT = Path(__file__).resolve().parent.parent


def test_assets_checks_jobs_and_sensors():
    graph = defs.resolve_asset_graph()
    assert {k.to_user_string() for k in graph.get_all_asset_keys()} == {
        "batch_input",
        "batch_output",
        "conquests",
        "label_studio_tasks",
        "curated_dataset",
        "fine_tuned_adapter",
        "adapter_eval",
        "deployed_model",
    }
    # A typed batch's conquests are made in its own run, after its results, then sent to
    # Label Studio.
    assert graph.get(dg.AssetKey("conquests")).parent_keys == {dg.AssetKey("batch_output")}
    assert graph.get(dg.AssetKey("label_studio_tasks")).parent_keys == {dg.AssetKey("conquests")}
    # A type's dataset is made of every batch's conquests: its lineage reaches the batches.
    dataset = graph.get(dg.AssetKey("curated_dataset"))
    assert dataset.parent_keys == {dg.AssetKey("conquests")}
    assert dataset.partitions_def.name == "conquest_types"
    assert {k.name for k in graph.asset_check_keys} == {
        "output_complete", "error_rate", "min_examples", "chat_format_valid", "no_eval_leakage",
        "beats_base",
    }  # fmt: skip
    # A model's chain: trained on a dataset version, evaluated, deployed, each partitioned by
    # that version; training and evaluation hold the gpu pool.
    chain = ("curated_dataset", "fine_tuned_adapter", "adapter_eval", "deployed_model")
    for parent, child in zip(chain, chain[1:], strict=False):
        node = graph.get(dg.AssetKey(child))
        assert node.parent_keys == {dg.AssetKey(parent)}, child
        assert node.partitions_def.name == "dataset_versions", child
    assert graph.get(dg.AssetKey("fine_tuned_adapter")).pools == {"gpu"}
    assert graph.get(dg.AssetKey("adapter_eval")).pools == {"gpu"}
    for name, assets in (
        ("fine_tuning_job", {"fine_tuned_adapter", "adapter_eval", "deployed_model"}),
        ("training_job", {"fine_tuned_adapter", "adapter_eval"}),
        ("deploy_job", {"deployed_model"}),
    ):
        selected = defs.resolve_job_def(name).asset_layer.executable_asset_keys
        assert {k.to_user_string() for k in selected} == assets, name
    (schedule,) = defs.schedules
    assert schedule.name == "retraining_schedule" and schedule.cron_schedule == "0 3 * * 1"
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED
    datasets = defs.resolve_job_def("dataset_job")
    assert {k.to_user_string() for k in datasets.asset_layer.asset_graph.get_all_asset_keys()} >= {
        "curated_dataset"
    }
    job = defs.resolve_job_def("batch_job")
    assert {k.to_user_string() for k in job.asset_layer.executable_asset_keys} == {
        "batch_input",
        "batch_output",
    }
    assert {k.name for k in job.asset_layer.asset_graph.asset_check_keys} == {
        "output_complete",
        "error_rate",
    }
    # Curation runs on its own, holding no pool: it never holds up inference or training.
    curation = defs.resolve_job_def("curation_job")
    assert {k.to_user_string() for k in curation.asset_layer.executable_asset_keys} == {
        "conquests",
        "label_studio_tasks",
    }
    for name in ("conquests", "label_studio_tasks", "curated_dataset", "deployed_model"):
        assert not graph.get(dg.AssetKey(name)).pools, name
    assert sorted(s.name for s in defs.sensors) == [
        "batch_reconciler",
        "conquest_type_partitions",
        "fine_tuning_reconciler",
        "inbox_sensor",
        "label_studio_sync",
        "retrain_on_new_dataset",
        "typed_batch_curation",
        "webhook_delivery",
    ]
    assert defs.resolve_sensor_def("inbox_sensor").minimum_interval_seconds == 1
    assert defs.resolve_sensor_def("batch_reconciler").minimum_interval_seconds == 5
    assert graph.get(dg.AssetKey("batch_output")).pools == {"gpu"}


def test_blocking_completeness_check():
    graph = defs.resolve_asset_graph()
    blocking = {k.name: graph.get_check_spec(k).blocking for k in graph.asset_check_keys}
    assert blocking == {
        "output_complete": True, "error_rate": False,
        "min_examples": True, "chat_format_valid": True, "no_eval_leakage": True,
        "beats_base": True,
    }  # fmt: skip


def test_loading_the_code_location_does_not_import_heavy_libraries():
    code = (
        "import sys, vbs_definitions; "
        "print(sorted(m for m in ('torch', 'vllm', 'transformers', 'unsloth', 'trl', 'peft', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_workspace_and_instance_files_are_valid():
    import yaml
    from dagster._core.instance.config import dagster_instance_config

    workspace = yaml.safe_load(open(ROOT / "workspace.yaml"))
    assert workspace["load_from"][0]["python_module"]["module_name"] == "vbs_definitions"
    config, _ = dagster_instance_config(str(ROOT), "dagster.yaml")
    assert config["run_retries"]["enabled"] and config["run_monitoring"]["enabled"]


# Which vbs packages each package may import: the layers of DESIGN.md.
ALLOWED = {
    "vbs_resources": {"vbs_resources"},
    "vbs_assets": {"vbs_resources", "vbs_assets"},
    "vbs_sensors": {"vbs_resources", "vbs_assets", "vbs_sensors"},
    "vbs_api": {"vbs_resources", "vbs_api"},
    "vbs_cli": {"vbs_resources", "vbs_cli", "vbs_api"},
    "vbs_definitions": {"vbs_resources", "vbs_assets", "vbs_sensors"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return {n for n in names if n.startswith("vbs_")}


def test_packages_import_only_downwards():
    offenders = []
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            bad = _imports(path) - allowed
            if bad:
                offenders.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert offenders == []


def test_only_the_settings_module_reads_the_environment():
    readers = []
    for package in ALLOWED:
        for path in sorted((ROOT / package).rglob("*.py")):
            text = path.read_text()
            for needle in ("os.environ.get(", "os.environ[", "os.getenv(", "environ.get("):
                if needle in text and path.name != "settings.py":
                    readers.append(f"{path.relative_to(ROOT)}: {needle}")
    assert readers == []


# Each stateful entity's status changes in its store's ``transition``, which only its lifecycle
# calls; the stores' other writes refuse a status.
LIFECYCLES = {
    "catalog.batches.transition(": "vbs_resources/lifecycle.py",
    "catalog.fine_tuning.transition(": "vbs_resources/training/lifecycle.py",
    "catalog.deployments.transition(": "vbs_resources/training/lifecycle.py",
    "catalog.conquests.transition(": "vbs_resources/curation/lifecycle.py",
    "catalog.conquests.record_annotation(": "vbs_resources/curation/lifecycle.py",
    "catalog.conquests.set_excluded(": "vbs_resources/curation/lifecycle.py",
}


def test_status_is_written_only_by_each_entitys_lifecycle():
    sources = {
        str(path.relative_to(ROOT)): path.read_text()
        for package in ALLOWED
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    for call, lifecycle in LIFECYCLES.items():
        assert [p for p, text in sources.items() if call in text] == [lifecycle], call
    # Nothing else calls a transition, nor updates a stateful table with its own SQL.
    transitions = {p for p, text in sources.items() if ".transition(" in text}
    assert transitions == set(LIFECYCLES.values())
    for table in ("batches", "fine_tuning_jobs", "deployments", "conquests"):
        writers = [p for p, text in sources.items() if f"{table}.update()" in text]
        assert all(p.startswith("vbs_resources/catalog/") for p in writers), (table, writers)


def test_the_stores_refuse_a_status_outside_the_lifecycles(tmp_path):
    catalog = Catalog(url=f"sqlite:///{tmp_path / 'c.db'}")
    for update in (
        lambda: catalog.batches.update_unfinished("batch_x0000000", status="completed"),
        lambda: catalog.fine_tuning.update_unfinished("ftjob-x0000000", status="succeeded"),
        lambda: catalog.deployments.update_in_flight("ftdeploy-x0000000", status="succeeded"),
    ):
        with pytest.raises(ValueError, match="lifecycle"):
            update()
