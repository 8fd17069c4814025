"""The image and the compose file, checked by parsing: no container daemon runs on these
machines, so neither is built or run here (docs/deploy.md). What can drift is checked: every
``VBS_*`` variable they set is a setting, every command they run is one vbs or Dagster has (with
the command line `vbs serve` would run for it), every port agrees, every path exists."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from vbs_resources.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
VBS_SERVICES = {
    name: service for name, service in SERVICES.items() if service["image"].startswith("vbs:")
}


def interpolate(value: str) -> str:
    """Compose's ``${NAME:?message}`` (a required secret: a placeholder here) and
    ``${NAME:-default}``."""
    value = re.sub(r"\$\{(\w+):\?[^}]*\}", lambda m: f"test-{m.group(1).lower()}", value)
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: m.group(2), value)


def environment(service: dict[str, Any]) -> dict[str, str]:
    return {key: interpolate(str(value)) for key, value in service["environment"].items()}


def setting_names() -> set[str]:
    """Every variable the settings read."""
    names = set()
    for name, info in Settings.model_fields.items():
        names.add(f"VBS_{name.upper()}")
        if info.validation_alias is not None:
            aliases = getattr(info.validation_alias, "choices", [info.validation_alias])
            names.update(str(alias).upper() for alias in aliases)
    return names


def settings_of(service: dict[str, Any], home: Path, monkeypatch) -> Settings:
    """The settings a container of this service would load (the image's ``ENV`` and the
    service's environment), with nothing from this process's environment but the catalog."""
    for key in list(os.environ):
        if key.startswith("VBS_"):
            monkeypatch.delenv(key)
    image_env = dict(re.findall(r"(VBS_\w+)=(\S+)", DOCKERFILE))
    # The catalog on SQLite: the compose network's `postgres` is not reachable from here, and
    # the engine's command line asks the catalog whether adapters are registered.
    local = {"VBS_HOME": str(home), "VBS_CATALOG_URL": f"sqlite:///{home}/catalog.db"}
    for key, value in {**image_env, **environment(service), **local}.items():
        monkeypatch.setenv(key, value)
    return Settings()


def published(service: dict[str, Any]) -> list[tuple[str, int, int]]:
    found = []
    for entry in service.get("ports", []):
        host, host_port, container_port = entry.split(":")
        found.append((host, int(host_port), int(container_port)))
    return found


def test_every_vbs_variable_in_the_image_and_compose_is_a_setting():
    known = setting_names()
    named = set(re.findall(r"\bVBS_[A-Z0-9_]+", DOCKERFILE))
    for service in VBS_SERVICES.values():
        named |= {key for key in service["environment"] if key.startswith("VBS_")}
    assert named, "nothing was read"
    assert named <= known, sorted(named - known)


def test_every_vbs_command_parses_and_names_a_process_vbs_serve_runs():
    from vbs_cli.main import main
    from vbs_cli.serve import PROCESSES

    only = []
    for name, service in VBS_SERVICES.items():
        command = service["command"]
        assert command[0] == "vbs", (name, command)
        with pytest.raises(SystemExit) as parsed:
            main([*command[1:], "--help"])
        assert parsed.value.code == 0, (name, command)
        if command[1:3] == ["serve", "--only"]:
            only.append(command[3])
    # Every process of `vbs serve` but none twice, each in a container of its own.
    assert sorted(only) == sorted(PROCESSES)


def test_each_container_runs_what_vbs_serve_runs_on_the_ports_compose_publishes(
    tmp_path, monkeypatch
):
    from vbs_cli.serve import child_name, serve_commands

    listening: dict[str, int] = {}
    for name, service in VBS_SERVICES.items():
        command = service["command"]
        if command[1:3] != ["serve", "--only"]:
            continue
        settings = settings_of(service, tmp_path / name, monkeypatch)
        commands = {child_name(c): c for c, _ in serve_commands(settings)}
        assert command[3] in commands, f"{name}: these settings would not start {command[3]}"
        line = commands[command[3]]
        # Dagster's and the API's commands exist: each answers --help.
        words = {"code-server": 3, "webserver": 1, "daemon": 2, "api": 3}.get(command[3])
        if words is not None:
            done = subprocess.run([*line[:words], "--help"], capture_output=True, timeout=120)
            assert done.returncode == 0, (name, line[:words], done.stderr[-500:])
        if command[3] == "daemon":
            assert "ports" not in service and "--port" not in line and "-p" not in line
            continue
        port = int(line[line.index("--port" if "--port" in line else "-p") + 1])
        listening[name] = port
        # It listens on every interface of its container, and compose publishes it on the
        # host's loopback only, on the same port.
        [host_flag] = [f for f in ("--host", "-h", "--internal-host") if f in line]
        assert line[line.index(host_flag) + 1] == "0.0.0.0", (name, line)
        for host, host_port, container_port in published(service):
            assert (host, host_port, container_port) == ("127.0.0.1", port, port), name
        test = service.get("healthcheck", {}).get("test", [])
        for url in [part for part in test if part.startswith("http://")]:
            assert url.startswith(f"http://127.0.0.1:{port}/"), (name, url)
    # Where the others look for each one is where it listens.
    peers = environment(SERVICES["api"])
    assert peers["VBS_ENGINE_URL"] == f"http://engine:{listening['engine']}"
    assert peers["VBS_LABEL_STUDIO_URL"] == f"http://label-studio:{listening['label-studio']}"
    assert peers["VBS_DAGSTER_URL"] == f"http://webserver:{listening['webserver']}"
    assert peers["VBS_CODE_SERVER_HOST"] == "code-server"
    assert int(peers["VBS_CODE_SERVER_PORT"]) == listening["code-server"]
    expose = {int(p) for p in re.findall(r"^EXPOSE (.+)$", DOCKERFILE, re.M)[0].split()}
    assert set(listening.values()) == expose


def test_the_webserver_and_daemon_load_the_location_from_the_code_server(tmp_path, monkeypatch):
    from vbs_resources.dagster_instance import LOCATION_NAME, write_workspace

    for name in ("webserver", "daemon"):
        settings = settings_of(SERVICES[name], tmp_path / name, monkeypatch)
        workspace = yaml.safe_load(write_workspace(settings).read_text())
        assert workspace == {
            "load_from": [
                {
                    "grpc_server": {
                        "host": "code-server",
                        "port": 4266,
                        "location_name": LOCATION_NAME,
                    }
                }
            ]
        }


def test_the_stores_are_postgres_and_s3_in_databases_of_their_own():
    env = environment(SERVICES["api"])
    catalog, dagster = env["VBS_CATALOG_URL"], env["VBS_DAGSTER_STORAGE_URL"]
    assert catalog.startswith("postgresql+psycopg2://") and dagster.startswith("postgresql")
    # Both use Alembic: one database each, the second made by the init script.
    assert catalog.rsplit("/", 1)[1] == SERVICES["postgres"]["environment"]["POSTGRES_DB"]
    init = (ROOT / "deploy" / "postgres-init.sql").read_text()
    assert f"CREATE DATABASE {dagster.rsplit('/', 1)[1]}" in init
    assert env["VBS_BUCKET_URL"].startswith("s3://")
    s3_port = int(re.search(r"-s3\.port=(\d+)", " ".join(SERVICES["s3"]["command"])).group(1))
    assert env["AWS_ENDPOINT_URL"] == f"http://s3:{s3_port}"
    # Every vbs process sees the same stores.
    for name, service in VBS_SERVICES.items():
        mine = environment(service)
        for key in ("VBS_CATALOG_URL", "VBS_DAGSTER_STORAGE_URL", "VBS_BUCKET_URL"):
            assert mine[key] == env[key], (name, key)


def test_paths_dependencies_and_gpus_are_consistent():
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), (name, source)
            else:
                assert source in COMPOSE["volumes"], (name, source)
        for other in service.get("depends_on", {}):
            assert other in SERVICES, (name, other)
    # The engine and the code server (whose runs train and, in process, infer) get a GPU.
    for name in ("engine", "code-server"):
        [device] = SERVICES[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"]


def test_the_dockerfile_is_multi_stage_and_does_the_readmes_install():
    stages = re.findall(r"^FROM (\S+)(?: AS (\w+))?", DOCKERFILE, re.M)
    assert len(stages) >= 2 and stages[0][1] == "build"
    makefile = (ROOT / "Makefile").read_text()
    [install] = re.findall(r"^RUN make (.+)$", DOCKERFILE, re.M)
    words = shlex.split(install)
    targets = [w for w in words if "=" not in w]
    assert targets == ["setup", "model"]
    for target in targets:
        assert re.search(rf"^{target}:", makefile, re.M), target
    assert "EXTRA=${EXTRA}" in words and re.search(r"^ARG EXTRA=cpu$", DOCKERFILE, re.M)
    assert re.search(r"^EXTRA \?=", makefile, re.M)  # the Makefile takes it as given
    # Start-up migrates first, then runs the command.
    entrypoint = re.search(r'^ENTRYPOINT \[.*"(/opt/vbs/[^"]+)"\]', DOCKERFILE, re.M).group(1)
    script = ROOT / entrypoint.removeprefix("/opt/vbs/")
    assert os.access(script, os.X_OK)
    body = [line.strip() for line in script.read_text().splitlines() if line.strip()]
    assert body.index("vbs migrate") < body.index('exec "$@"', body.index("vbs migrate"))
    # The model the image prepares is where VBS_MODEL points.
    from vbs_resources.model_store import default_model_dir

    model = re.search(r"VBS_MODEL=(\S+)", DOCKERFILE).group(1)
    assert model == str(default_model_dir("/opt/vbs/.vbs"))
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv*", ".vbs", ".git"} <= set(ignored)  # no local venv or state in the image
