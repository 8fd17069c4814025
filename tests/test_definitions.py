"""The code location loads, names what it should, and stays light to load."""

import subprocess
import sys

import dagster as dg

from vbs_assets.definitions import defs


def test_assets_checks_jobs_and_sensors():
    graph = defs.resolve_asset_graph()
    assert {k.to_user_string() for k in graph.get_all_asset_keys()} == {
        "batch_input",
        "batch_output",
    }
    assert {k.name for k in graph.asset_check_keys} == {"output_complete", "error_rate"}
    job = defs.resolve_job_def("batch_job")
    assert {k.name for k in job.asset_layer.asset_graph.asset_check_keys} == {
        "output_complete",
        "error_rate",
    }
    assert [s.name for s in defs.sensors] == ["inbox_sensor"]
    assert defs.resolve_sensor_def("inbox_sensor").minimum_interval_seconds == 1
    assert graph.get(dg.AssetKey("batch_output")).pools == {"gpu"}


def test_blocking_completeness_check():
    graph = defs.resolve_asset_graph()
    blocking = {k.name: graph.get_check_spec(k).blocking for k in graph.asset_check_keys}
    assert blocking == {"output_complete": True, "error_rate": False}


def test_loading_the_code_location_does_not_import_heavy_libraries():
    code = (
        "import sys, vbs_assets.definitions; "
        "print(sorted(m for m in ('torch', 'vllm', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_workspace_and_instance_files_are_valid():
    import yaml
    from dagster._core.instance.config import dagster_instance_config

    workspace = yaml.safe_load(open("workspace.yaml"))
    assert workspace["load_from"][0]["python_module"]["module_name"] == "vbs_assets.definitions"
    config, _ = dagster_instance_config(".", "dagster.yaml")
    assert config["run_retries"]["enabled"] and config["run_monitoring"]["enabled"]
