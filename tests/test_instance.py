"""The Dagster instance `vbs serve` runs on: written from the settings, on SQLite or on a real
PostgreSQL; a team's own file used as it is, but refused when it drops crash recovery."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml

from tests.conftest import settings_for
from vbs_resources.dagster_instance import (
    REQUIRED,
    check_instance_file,
    instance_config,
    write_instance,
)
from vbs_resources.settings import SettingsError

ROOT = Path(__file__).resolve().parent.parent


def test_the_default_settings_write_the_projects_dagster_yaml(home):
    folder = write_instance(settings_for(home))
    written = yaml.safe_load((folder / "dagster.yaml").read_text())
    assert written == yaml.safe_load((ROOT / "dagster.yaml").read_text())
    assert "storage" not in written  # SQLite under DAGSTER_HOME


def test_settings_reach_the_file_and_an_edit_is_replaced(home):
    settings = settings_for(
        home, VBS_MAX_CONCURRENT_RUNS="9", VBS_GPU_SLOTS="2", VBS_RUN_RETRIES="5"
    )
    path = write_instance(settings) / "dagster.yaml"
    config = yaml.safe_load(path.read_text())
    assert config["concurrency"]["runs"]["max_concurrent_runs"] == 9
    assert config["concurrency"]["pools"]["default_limit"] == 2
    assert config["run_retries"]["max_retries"] == 5
    path.write_text("run_monitoring: {enabled: false}\n")
    write_instance(settings)
    assert yaml.safe_load(path.read_text()) == config


def test_dagster_runs_on_postgres_and_the_password_stays_in_the_environment(
    home, postgres, monkeypatch
):
    url = postgres.database("dagster").replace("vbs@", "vbs:s3cret-pw@")
    settings = settings_for(home, VBS_DAGSTER_STORAGE_URL=url.replace("+psycopg2", ""))
    folder = write_instance(settings)
    text = (folder / "dagster.yaml").read_text()
    assert "s3cret-pw" not in text and "VBS_DAGSTER_STORAGE_URL" in text
    env = settings.child_environment()
    assert env["VBS_DAGSTER_STORAGE_URL"] == url  # the driver vbs installs, psycopg2
    monkeypatch.setenv("VBS_DAGSTER_STORAGE_URL", env["VBS_DAGSTER_STORAGE_URL"])
    with dg.DagsterInstance.from_config(str(folder)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.schedule_storage).__name__ == "PostgresScheduleStorage"

        @dg.asset
        def probe() -> int:
            return 1

        result = dg.materialize([probe], instance=instance)
        assert result.success
        assert instance.get_latest_materialization_event(dg.AssetKey("probe")) is not None
    # Another process sees the run: it is in Postgres, not in a file under the folder.
    code = (
        "import dagster as dg, sys; i = dg.DagsterInstance.from_config(sys.argv[1]); "
        "print(len(i.get_runs()))"
    )
    seen = subprocess.run(
        [sys.executable, "-c", code, str(folder)],
        env={**os.environ, "VBS_DAGSTER_STORAGE_URL": url},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert seen.stdout.strip() == "1"
    assert not list(folder.glob("**/*.db"))


def _user_file(tmp_path: Path, drop: tuple[str, ...] | None = None, **change) -> Path:
    config = instance_config(settings_for(tmp_path / "defaults"))
    if drop is not None:
        parent = config
        for key in drop[:-1]:
            parent = parent[key]
        del parent[drop[-1]]
    for dotted, value in change.items():
        parent = config
        keys = dotted.split("__")
        for key in keys[:-1]:
            parent = parent[key]
        parent[keys[-1]] = value
    path = tmp_path / "team" / "dagster.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# the team's own\n" + yaml.safe_dump(config))
    return path


def test_a_teams_own_file_is_used_as_it_is_and_never_rewritten(home, tmp_path):
    path = _user_file(tmp_path, sensors__num_workers=3)
    before, stat = path.read_bytes(), path.stat()
    folder = write_instance(settings_for(home, VBS_DAGSTER_YAML=str(path)))
    assert (folder / "dagster.yaml").read_bytes() == before
    assert path.read_bytes() == before and path.stat().st_mtime_ns == stat.st_mtime_ns
    # Named as the instance's own file, it is left alone too.
    own = settings_for(home, VBS_DAGSTER_YAML=str(folder / "dagster.yaml"))
    assert write_instance(own) == folder and (folder / "dagster.yaml").read_bytes() == before


@pytest.mark.parametrize(
    "drop, change, named",
    [
        (("run_monitoring",), {}, "run_monitoring.enabled"),
        (None, {"run_monitoring__enabled": False}, "run_monitoring.enabled"),
        (("run_retries",), {}, "run_retries.enabled"),
        (None, {"run_retries__max_retries": 0}, "run_retries.max_retries"),
        (None, {"run_retries__max_retries": True}, "run_retries.max_retries"),
        (("run_coordinator",), {}, "run_coordinator.class"),
        (None, {"run_coordinator__class": "DefaultRunCoordinator"}, "run_coordinator.class"),
        (("concurrency",), {}, "concurrency.pools.default_limit"),
    ],
    ids=[
        "no-monitoring", "monitoring-off", "no-retries", "zero-retries", "bool-retries",
        "no-coordinator", "default-coordinator", "no-pools",
    ],
)  # fmt: skip
def test_a_teams_file_without_crash_recovery_is_refused_naming_it(
    home, tmp_path, drop, change, named
):
    path = _user_file(tmp_path, drop, **change)
    before = path.read_bytes()
    with pytest.raises(SettingsError) as info:
        write_instance(settings_for(home, VBS_DAGSTER_YAML=str(path)))
    message = str(info.value)
    assert message.startswith(f"VBS_DAGSTER_YAML={path}: {named} ")
    assert "crash recovery" in message
    assert path.read_bytes() == before
    assert not (home / "dagster" / "dagster.yaml").exists()


def test_a_file_that_is_not_an_instance_file_is_refused(home, tmp_path):
    cases = {
        "not-yaml": "run_monitoring: [unclosed\n",
        "a-list": "- 1\n- 2\n",
        "binary": b"\xff\xfe\x00run_monitoring",
    }
    for name, content in cases.items():
        path = tmp_path / f"{name}.yaml"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        with pytest.raises(SettingsError, match=r"^VBS_DAGSTER_YAML="):
            write_instance(settings_for(home, VBS_DAGSTER_YAML=str(path)))
    unknown = _user_file(tmp_path, run_monitoring__frequency_of_checks="often")
    with pytest.raises(SettingsError, match="not a Dagster instance file"):
        check_instance_file(unknown, settings_for(home))
    with pytest.raises(SettingsError, match="cannot be read"):
        write_instance(settings_for(home, VBS_DAGSTER_YAML=str(tmp_path / "missing.yaml")))


def test_a_storage_url_a_teams_file_would_ignore_is_refused(home, tmp_path):
    path = _user_file(tmp_path)
    settings = settings_for(
        home,
        VBS_DAGSTER_YAML=str(path),
        VBS_DAGSTER_STORAGE_URL="postgresql://vbs:pw@127.0.0.1:9/d",
    )
    with pytest.raises(SettingsError, match="VBS_DAGSTER_STORAGE_URL would be ignored") as info:
        write_instance(settings)
    assert "pw" not in str(info.value)


def test_every_required_block_is_in_the_written_file(home):
    config = instance_config(settings_for(home))
    for keys, test, _ in REQUIRED:
        value = config
        for key in keys:
            value = value[key]
        assert test(value), keys


def test_serve_refuses_a_teams_file_in_one_line_before_starting_anything(tmp_path):
    path = _user_file(tmp_path, ("run_retries",))
    home = tmp_path / "vbs"
    done = subprocess.run(
        [sys.executable, "-m", "vbs_cli.main", "serve"],
        env={**os.environ, "VBS_HOME": str(home), "VBS_DAGSTER_YAML": str(path)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"vbs: VBS_DAGSTER_YAML={path}: run_retries.enabled must be true: a run that died "
        "resumes from its checkpoint only in a retry (crash recovery depends on it)"
    ]
    assert not (home / "serve.lock").exists() and not (home / "dagster").exists()


def test_migrate_brings_new_databases_to_head_and_runs_again_harmlessly(tmp_path, postgres):
    """`vbs migrate`, a deployment's start-up step, on new PostgreSQL databases, twice."""
    from vbs_cli.doctor import catalog, dagster_storage
    from vbs_resources.settings import load_settings

    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("VBS_")},
        "VBS_HOME": str(tmp_path / "vbs"),
        "VBS_CATALOG_URL": postgres.database("catalog"),
        "VBS_DAGSTER_STORAGE_URL": postgres.database("dagster"),
    }
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-m", "vbs_cli.main", "migrate"],
            env=env, capture_output=True, text=True, timeout=180,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "catalog postgresql+psycopg2://127.0.0.1:" in done.stdout
        assert "Dagster storage (Postgres) upgraded" in done.stdout
    settings = load_settings({k: v for k, v in env.items() if k.startswith("VBS_")})
    assert catalog(settings, 5).ok and dagster_storage(settings, 5).ok


def test_serve_refuses_a_code_server_port_another_process_holds(tmp_path):
    """gRPC binds with SO_REUSEPORT: a second code server on a taken port would start and share
    the calls of two platforms. `vbs serve` refuses first, naming the setting."""
    import socket

    from tests.conftest import free_port

    port = free_port()
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as gRPC binds
        holder.bind(("127.0.0.1", port))
        holder.listen()
        done = subprocess.run(
            [sys.executable, "-m", "vbs_cli.main", "serve"],
            env={**os.environ, "VBS_HOME": str(tmp_path / "vbs"),
                 "VBS_CODE_SERVER_PORT": str(port)},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert f"VBS_CODE_SERVER_PORT={port}: 127.0.0.1:{port} is in use" in done.stderr
    assert "Traceback" not in done.stderr
