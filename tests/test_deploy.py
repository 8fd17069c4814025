"""The image and the compose file, checked by parsing: no container daemon runs on these
machines, so neither is built or run here (docs/deploy.md). What can drift is checked: every
``VBS_*`` variable they set is a setting, every command they run is one vbs or Dagster has (with
the command line `vbs serve` would run for it), every port agrees, every path exists."""

from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
import sys
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
    from vbs_cli.serve import serve_commands

    listening: dict[str, int] = {}
    for name, service in VBS_SERVICES.items():
        command = service["command"]
        if command[1:3] != ["serve", "--only"]:
            continue
        settings = settings_of(service, tmp_path / name, monkeypatch)
        commands = {name: command for name, command, _ in serve_commands(settings)}
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


# ---- Kubernetes: deploy/helm/values.yaml (Dagster's Helm chart) and deploy/k8s/ -----------------
# Neither is applied nor rendered here (no cluster, no helm): what can drift is checked against
# the settings, `vbs serve`'s own command lines, the instance vbs writes, vllm-router's --help and
# the keys read in the chart's source (docs/deploy.md).

HELM = yaml.safe_load((ROOT / "deploy" / "helm" / "values.yaml").read_text())
K8S_FILES = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
MANIFESTS: list[dict[str, Any]] = [
    doc for path in K8S_FILES for doc in yaml.safe_load_all(path.read_text()) if doc
]
[CODE_LOCATION] = HELM["dagster-user-deployments"]["deployments"]
KUBERNETES_DOC = (ROOT / "docs" / "deploy.md").read_text().split("\n## Kubernetes\n", 1)[1]
SECRET = "vbs-secrets"


def manifest(kind: str, name: str) -> dict[str, Any]:
    [found] = [m for m in MANIFESTS if m["kind"] == kind and m["metadata"]["name"] == name]
    return found


def pod_spec(name: str) -> dict[str, Any]:
    return manifest("Deployment", name)["spec"]["template"]["spec"]


def only_container(name: str) -> dict[str, Any]:
    [container] = pod_spec(name)["containers"]
    return container


def secret_literals() -> dict[str, str]:
    """The Secret docs/deploy.md makes, key by key, its shell variables as placeholders."""
    [command] = re.findall(r"create secret generic (\S+)((?:.*\\\n)+.*)", KUBERNETES_DOC)
    assert command[0] == SECRET
    literals = dict(re.findall(r'--from-literal=([\w.-]+)="?([^"\s]*)"?', command[1]))
    return {
        key: re.sub(r"\$\{?(\w+)\}?", lambda m: f"test-{m.group(1).lower()}", value)
        for key, value in literals.items()
    }


def k8s_env(env: list[dict[str, Any]]) -> dict[str, str]:
    """A container's environment: its values, and its secrets as docs/deploy.md's Secret has them."""
    literals = secret_literals()
    values = {}
    for entry in env:
        if "value" in entry:
            values[entry["name"]] = str(entry["value"])
            continue
        ref = entry["valueFrom"]["secretKeyRef"]
        assert ref["name"] == SECRET, entry
        assert ref["key"] in literals, f"docs/deploy.md's Secret has no {ref['key']}"
        values[entry["name"]] = literals[ref["key"]]
    return values


def flag_values(args: list[str]) -> dict[str, list[str]]:
    """``--flag value ...`` as {flag: [values]}, every flag once."""
    found: dict[str, list[str]] = {}
    for word in args:
        if word.startswith("--"):
            assert word not in found, f"{word} twice"
            flag = word
            found[flag] = []
        else:
            found[flag].append(word)
    return found


def image_home() -> str:
    """VBS_HOME in the runtime image (./Dockerfile's last ENV of it)."""
    return re.findall(r"VBS_HOME=(\S+)", DOCKERFILE)[-1]


def test_every_vbs_variable_in_the_kubernetes_files_is_a_setting():
    known = setting_names()
    texts = [path.read_text() for path in [ROOT / "deploy" / "helm" / "values.yaml", *K8S_FILES]]
    named = set(re.findall(r"\bVBS_[A-Z0-9_]+", "\n".join([*texts, KUBERNETES_DOC])))
    assert {"VBS_ENGINE_URL", "VBS_ENGINE_API_KEY", "VBS_CATALOG_URL"} <= named  # read at all
    assert named <= known, sorted(named - known)
    # The router reads no setting, and so no secret: the image's entry point does not run there.
    router = only_container("vllm-router")
    assert "env" not in router and "envFrom" not in router
    assert router["command"][:2] == ["tini", "--"]


def test_the_secret_holds_what_the_files_read_and_names_the_charts_database():
    literals = secret_literals()
    read = {
        e["valueFrom"]["secretKeyRef"]["key"]
        for e in [*CODE_LOCATION["env"], *only_container("vllm-engine")["env"]]
        if "valueFrom" in e
    }
    # The chart reads the password from the Secret it is told, under this key (dagster_k8s,
    # DAGSTER_PG_PASSWORD_SECRET_KEY), and makes none of its own.
    assert HELM["global"]["postgresqlSecretName"] == SECRET
    assert HELM["generatePostgresqlPasswordSecret"] is False
    assert read | {"postgresql-password"} == set(literals)
    from sqlalchemy.engine import make_url

    pg = HELM["postgresql"]
    dagster = make_url(literals["VBS_DAGSTER_STORAGE_URL"])
    catalog = make_url(literals["VBS_CATALOG_URL"])
    assert pg["enabled"] is False  # an external server
    for url in (dagster, catalog):
        assert (url.username, url.host, url.port) == (
            pg["postgresqlUsername"],
            pg["postgresqlHost"],
            pg["service"]["port"],
        )
        assert url.password == literals["postgresql-password"]
    # One database each (both use Alembic), named as in compose.yaml and deploy/postgres-init.sql.
    assert dagster.database == pg["postgresqlDatabase"]
    assert f"CREATE DATABASE {dagster.database}" in (ROOT / "deploy/postgres-init.sql").read_text()
    assert catalog.database == SERVICES["postgres"]["environment"]["POSTGRES_DB"]
    assert catalog.database != dagster.database


def test_the_replicas_run_vbs_engine_on_the_port_of_their_probes_and_the_routers_discovery(
    tmp_path, monkeypatch
):
    from vbs_cli.engine import server_command
    from vbs_cli.main import main
    from vbs_cli.serve import PROCESSES

    engine = only_container("vllm-engine")
    args = engine["args"]
    # CMD only: the image's entry point still migrates first, as in compose.yaml.
    assert "command" not in engine
    assert args[:3] == ["vbs", "serve", "--only"] and args[3] == "engine" in PROCESSES
    with pytest.raises(SystemExit) as parsed:
        main([*args[1:], "--help"])
    assert parsed.value.code == 0
    env = k8s_env(engine["env"])
    assert "VBS_ENGINE_URL" not in env  # with it, `--only engine` would start nothing
    settings = settings_of({"environment": env}, tmp_path / "engine", monkeypatch)
    assert settings.engine == "server"
    # What `vbs serve --only engine` runs (serve_one): one vLLM server, whatever the replicas.
    line, child_env = server_command(settings.model_copy(update={"engine_replicas": 1}))
    assert line[line.index("--host") + 1] == "0.0.0.0"
    port = int(line[line.index("--port") + 1])
    assert child_env["VLLM_API_KEY"] == env["VBS_ENGINE_API_KEY"]
    assert [p["containerPort"] for p in engine["ports"]] == [port]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert engine[probe]["httpGet"] == {"path": "/health", "port": port}, probe
    discovery = flag_values(only_container("vllm-router")["args"])
    assert discovery["--service-discovery-port"] == [str(port)]
    expose = {int(p) for p in re.findall(r"^EXPOSE (.+)$", DOCKERFILE, re.M)[0].split()}
    assert port in expose
    # One GPU per replica, and no second one needed while a replica is replaced.
    assert engine["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert manifest("Deployment", "vllm-engine")["spec"]["strategy"]["rollingUpdate"] == {
        "maxSurge": 0,
        "maxUnavailable": 1,
    }
    # Off loopback the settings refuse a server without the key.
    monkeypatch.delenv("VBS_ENGINE_API_KEY")
    with pytest.raises(ValueError, match="VBS_ENGINE_API_KEY"):
        Settings()


@functools.cache
def router_help() -> str:
    router = Path(sys.executable).parent / "vllm-router"
    done = subprocess.run([str(router), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-500:]
    return done.stdout


def test_the_router_finds_the_replicas_with_flags_it_has_and_vbs_serves_own(tmp_path, monkeypatch):
    from vbs_cli.engine import router_command

    router = only_container("vllm-router")
    assert router["command"][-1] == "vllm-router"
    flags = flag_values(router["args"])
    help_text = router_help()
    assert set(flags) <= set(re.findall(r"--[a-z][a-z0-9-]*", help_text)), sorted(flags)
    policies = re.search(r"--policy \{([^}]*)\}", help_text).group(1).split(",")
    assert flags["--policy"][0] in policies
    # Found in Kubernetes instead of listed.
    assert flags["--service-discovery"] == [] and "--worker-urls" not in flags
    # The rest as `vbs serve` starts its own router in front of replicas with the replicas'
    # settings (on VBS_ENGINE_PORT, on every interface).
    engine_env = k8s_env(only_container("vllm-engine")["env"])
    settings = settings_of({"environment": engine_env}, tmp_path / "router", monkeypatch)
    own = flag_values(router_command(settings)[0][1:])
    for flag in ("--host", "--port", "--policy", "--health-check-interval-secs"):
        assert flags[flag] == own[flag], flag
    assert flags["--prometheus-host"] == own["--prometheus-host"]
    assert flags["--log-level"] == own["--log-level"]
    # It selects the replicas' pods, not its own, in the namespace it watches.
    engine = manifest("Deployment", "vllm-engine")
    selector = dict(pair.split("=", 1) for pair in flags["--selector"])
    assert selector.items() <= engine["spec"]["template"]["metadata"]["labels"].items()
    own_labels = manifest("Deployment", "vllm-router")["spec"]["template"]["metadata"]["labels"]
    assert not selector.items() <= own_labels.items()
    assert flags["--service-discovery-namespace"] == [engine["metadata"]["namespace"]]
    assert {m["metadata"]["namespace"] for m in MANIFESTS} == {engine["metadata"]["namespace"]}
    # Its ports, its Service, and the URL the platform is given.
    port, metrics = int(flags["--port"][0]), int(flags["--prometheus-port"][0])
    assert port != metrics
    assert sorted(p["containerPort"] for p in router["ports"]) == sorted([port, metrics])
    service = manifest("Service", "vllm-router")
    assert service["spec"]["selector"].items() <= own_labels.items()
    [http] = [p for p in service["spec"]["ports"] if p["targetPort"] == port]
    assert k8s_env(CODE_LOCATION["env"])["VBS_ENGINE_URL"] == (
        f"http://{service['metadata']['name']}:{http['port']}"
    )
    # /health and /readiness answer 503 while no replica is healthy: only readiness asks them.
    assert router["readinessProbe"]["httpGet"] == {"path": "/readiness", "port": port}
    assert router["livenessProbe"]["tcpSocket"] == {"port": port}


def test_the_router_may_get_list_and_watch_pods_in_its_namespace():
    spec = pod_spec("vllm-router")
    account = spec["serviceAccountName"]
    namespace = manifest("Deployment", "vllm-router")["metadata"]["namespace"]
    assert manifest("ServiceAccount", account)["metadata"]["namespace"] == namespace
    [binding] = [
        m
        for m in MANIFESTS
        if m["kind"] == "RoleBinding"
        and {"kind": "ServiceAccount", "name": account, "namespace": namespace} in m["subjects"]
    ]
    assert binding["metadata"]["namespace"] == namespace
    assert binding["roleRef"]["kind"] == "Role"
    role = manifest("Role", binding["roleRef"]["name"])
    assert role["metadata"]["namespace"] == namespace
    granted = {
        verb
        for rule in role["rules"]
        if "" in rule["apiGroups"] and "pods" in rule["resources"]
        for verb in rule["verbs"]
    }
    assert {"get", "list", "watch"} <= granted


def test_the_code_location_is_the_image_running_what_vbs_serve_runs(tmp_path, monkeypatch):
    from vbs_cli.serve import PROJECT_ROOT, serve_commands
    from vbs_resources.dagster_instance import LOCATION_NAME

    # The chart names the location (and its Service) after the deployment.
    assert CODE_LOCATION["name"] == LOCATION_NAME
    assert "dagsterApiGrpcArgs" not in CODE_LOCATION
    env = k8s_env(CODE_LOCATION["env"])
    settings = settings_of({"environment": env}, tmp_path / "location", monkeypatch)
    line = {name: command for name, command, _ in serve_commands(settings)}["code-server"]
    # The chart runs `dagster code-server start -h 0.0.0.0 -p PORT <codeServerArgs>` from PATH.
    assert Path(line[0]).name == "dagster" and line[1:3] == ["code-server", "start"]
    assert line[3] == "-h" and line[5] == "-p"
    assert re.search(r"PATH=/opt/vbs/\.venv/bin:", DOCKERFILE)
    workdir = re.findall(r"^WORKDIR (\S+)$", DOCKERFILE, re.M)[-1]
    expected = [workdir if word == str(PROJECT_ROOT) else word for word in line[7:]]
    assert CODE_LOCATION["codeServerArgs"] == expected
    assert "vbs_definitions" in expected and LOCATION_NAME in expected
    assert CODE_LOCATION["port"] == int(line[6]) == settings.code_server_port
    assert CODE_LOCATION["port"] in {
        int(p) for p in re.findall(r"^EXPOSE (.+)$", DOCKERFILE, re.M)[0].split()
    }
    # One image, compose's `vbs`, for the location, its runs, the replicas and the router.
    image = CODE_LOCATION["image"]
    assert image["repository"].rsplit("/", 1)[-1] == SERVICES["api"]["image"].split(":")[0]
    deployments = [m for m in MANIFESTS if m["kind"] == "Deployment"]
    assert {
        c["image"] for d in deployments for c in d["spec"]["template"]["spec"]["containers"]
    } == {f"{image['repository']}:{image['tag']}"}
    assert "image" not in HELM["runLauncher"]["config"]["k8sRunLauncher"]
    # Server mode through the router.
    assert settings.engine == "server" and settings.engine_url == env["VBS_ENGINE_URL"]


def test_vbs_home_is_one_shared_volume_for_the_replicas_and_the_runs():
    home = image_home()
    [claim] = [m for m in MANIFESTS if m["kind"] == "PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    uid = re.search(r"useradd .*--uid (\d+) vbs", DOCKERFILE).group(1)
    mounts = {
        "code location": (CODE_LOCATION["volumes"], CODE_LOCATION["volumeMounts"]),
        "replicas": (
            pod_spec("vllm-engine")["volumes"],
            only_container("vllm-engine")["volumeMounts"],
        ),
    }
    for who, (volumes, volume_mounts) in mounts.items():
        [mount] = [m for m in volume_mounts if m["mountPath"] == home]
        [volume] = [v for v in volumes if v["name"] == mount["name"]]
        assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"], who
    # The image's user can write it; the runs get the location's volumes and security context.
    assert CODE_LOCATION["podSecurityContext"]["fsGroup"] == int(uid)
    assert pod_spec("vllm-engine")["securityContext"]["fsGroup"] == int(uid)
    assert CODE_LOCATION["includeConfigInLaunchedRuns"] == {"enabled": True}


def chart_instance(values: dict[str, Any]) -> dict[str, Any]:
    """The blocks of dagster.yaml that Dagster's chart renders from ``values``, as its templates
    read (templates/configmap-instance.yaml, helpers/instance/_run-coordinator.tpl and
    _concurrency.tpl in dagster-io/dagster's helm/dagster)."""
    daemon, concurrency = values["dagsterDaemon"], values["concurrency"]
    coordinator = daemon["runCoordinator"]
    assert coordinator["enabled"] and coordinator["type"] == "CustomRunCoordinator"
    custom = coordinator["config"]["customRunCoordinator"]
    monitoring, retries, sensors = daemon["runMonitoring"], daemon["runRetries"], daemon["sensors"]
    assert concurrency["enabled"] and monitoring["enabled"] and retries["enabled"]
    assert sensors["useThreads"]
    return {
        "run_coordinator": {k: custom[k] for k in ("module", "class", "config")},
        "concurrency": {
            "runs": {"max_concurrent_runs": concurrency["runs"]["maxConcurrentRuns"]},
            "pools": {
                "default_limit": concurrency["pools"]["defaultLimit"],
                "granularity": concurrency["pools"]["granularity"],
            },
        },
        "run_monitoring": {
            "enabled": monitoring["enabled"],
            "start_timeout_seconds": monitoring["startTimeoutSeconds"],
            "max_resume_run_attempts": monitoring["maxResumeRunAttempts"],
            "poll_interval_seconds": monitoring["pollIntervalSeconds"],
        },
        "run_retries": {
            "enabled": retries["enabled"],
            "max_retries": retries["maxRetries"],
            "retry_on_asset_or_op_failure": retries["retryOnAssetOrOpFailure"],
        },
        "sensors": {"use_threads": sensors["useThreads"], "num_workers": sensors["numWorkers"]},
        "telemetry": {"enabled": values["telemetry"]["enabled"]},
    }


def test_the_charts_instance_is_the_one_vbs_writes(tmp_path, monkeypatch):
    from vbs_resources.dagster_instance import REQUIRED, _at, _validate_schema, instance_config

    settings = settings_of({"environment": k8s_env(CODE_LOCATION["env"])}, tmp_path, monkeypatch)
    written = instance_config(settings)
    rendered = chart_instance(HELM)
    for block, value in rendered.items():
        expected = written[block]
        if block == "run_monitoring":  # unset there: Dagster's default, no resumed run workers
            expected = {"max_resume_run_attempts": 0, **expected}
        assert value == expected, block
    # Every block vbs writes but two: the chart writes its own storage blocks (dagster-postgres,
    # on the same database), and vbs's JSON log handler is vbs code, which the chart's webserver
    # and daemon images lack.
    assert set(written) - set(rendered) == {"storage", "python_logs"}
    # What crash recovery depends on, as vbs checks an instance file of a team's own...
    for keys, check, why in REQUIRED:
        assert check(_at(rendered, keys)), f"{'.'.join(keys)} {why}"
    # ...and Dagster's instance schema.
    path = tmp_path / "dagster.yaml"
    path.write_text(yaml.safe_dump(rendered))
    _validate_schema(path, "deploy/helm/values.yaml")
    # Each run in a pod of its own, with a GPU.
    launcher = HELM["runLauncher"]
    assert launcher["type"] == "K8sRunLauncher"
    resources = launcher["config"]["k8sRunLauncher"]["runK8sConfig"]["containerConfig"]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1


# The chart's values that deploy/helm/values.yaml may set, as read in the chart's schema
# (dagster-io/dagster helm/dagster/schema/schema/charts: dagster/values.py and subschema/,
# dagster_user_deployments/subschema/user_deployments.py); below a key ending in "*" the value
# is free-form there (a dict or a Kubernetes object).
CHART_KEYS = {
    "global.postgresqlSecretName",
    "generatePostgresqlPasswordSecret",
    "postgresql.enabled",
    "postgresql.postgresqlHost",
    "postgresql.postgresqlUsername",
    "postgresql.postgresqlDatabase",
    "postgresql.service.port",
    "dagster-user-deployments.enabled",
    "dagster-user-deployments.enableSubchart",
    "dagster-user-deployments.deployments",
    "runLauncher.type",
    "runLauncher.config.k8sRunLauncher.runK8sConfig.containerConfig*",
    "runLauncher.config.k8sRunLauncher.runK8sConfig.podSpecConfig*",
    "dagsterDaemon.runCoordinator.enabled",
    "dagsterDaemon.runCoordinator.type",
    "dagsterDaemon.runCoordinator.config.customRunCoordinator.module",
    "dagsterDaemon.runCoordinator.config.customRunCoordinator.class",
    "dagsterDaemon.runCoordinator.config.customRunCoordinator.config*",
    # A dict in the schema; these are the keys configmap-instance.yaml renders.
    "dagsterDaemon.runMonitoring.enabled",
    "dagsterDaemon.runMonitoring.startTimeoutSeconds",
    "dagsterDaemon.runMonitoring.cancelTimeoutSeconds",
    "dagsterDaemon.runMonitoring.maxResumeRunAttempts",
    "dagsterDaemon.runMonitoring.pollIntervalSeconds",
    "dagsterDaemon.runMonitoring.freeSlotsAfterRunEndSeconds",
    "dagsterDaemon.runRetries.enabled",
    "dagsterDaemon.runRetries.maxRetries",
    "dagsterDaemon.runRetries.retryOnAssetOrOpFailure",
    "dagsterDaemon.sensors.useThreads",
    "dagsterDaemon.sensors.numWorkers",
    "concurrency.enabled",
    "concurrency.pools.defaultLimit",
    "concurrency.pools.granularity",
    "concurrency.pools.opGranularityRunBuffer",
    "concurrency.runs.maxConcurrentRuns",
    "telemetry.enabled",
}
USER_DEPLOYMENT_KEYS = {
    "name", "image", "dagsterApiGrpcArgs", "codeServerArgs", "includeConfigInLaunchedRuns",
    "deploymentNamespace", "port", "replicaCount", "env", "envConfigMaps", "envSecrets",
    "annotations", "nodeSelector", "affinity", "tolerations", "podSecurityContext",
    "securityContext", "resources", "livenessProbe", "readinessProbe", "startupProbe", "labels",
    "volumeMounts", "volumes", "schedulerName", "initContainers", "sidecarContainers",
    "deploymentStrategy",
}  # fmt: skip


def leaf_paths(value: Any, prefix: str = "") -> list[str]:
    if isinstance(value, dict) and value:
        return [p for k, v in value.items() for p in leaf_paths(v, f"{prefix}{k}.")]
    return [prefix.rstrip(".")]


def test_every_value_is_a_key_of_the_chart_at_the_pinned_dagsters_version():
    for path in leaf_paths(HELM):
        assert path in CHART_KEYS or any(
            key.endswith("*") and (path + ".").startswith(key[:-1] + ".") for key in CHART_KEYS
        ), f"{path}: not a key read in Dagster's chart"
    assert set(CODE_LOCATION) <= USER_DEPLOYMENT_KEYS, sorted(
        set(CODE_LOCATION) - USER_DEPLOYMENT_KEYS
    )
    assert set(CODE_LOCATION["image"]) <= {"repository", "tag", "pullPolicy"}
    # The chart's version is the pinned dagster's, in the values' header and the install command.
    pinned = re.search(r'"dagster==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    values_text = (ROOT / "deploy" / "helm" / "values.yaml").read_text()
    assert set(re.findall(r"--version (\S+)", values_text + KUBERNETES_DOC)) == {pinned}
    namespace = manifest("Deployment", "vllm-router")["metadata"]["namespace"]
    install = re.search(r"^helm upgrade --install .*$", KUBERNETES_DOC, re.M).group(0)
    assert "dagster/dagster" in install and f"-n {namespace}" in install
    assert "-f deploy/helm/values.yaml" in install
    assert "helm repo add dagster https://dagster-io.github.io/helm" in KUBERNETES_DOC
    assert f"kubectl apply -f {K8S_FILES[0].parent.relative_to(ROOT)}/" in KUBERNETES_DOC
