"""Shared fixtures: a fresh VBS_HOME per test, the real prepared model, helpers to drop files."""

from __future__ import annotations

import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any
from unittest import mock

import dagster as dg
import pytest

from vbs_resources import build_resources, load_settings
from vbs_resources.model_store import prepare_default_model

MODEL = "SmolLM2-135M-Instruct"
# float32 everywhere in tests: bf16 on CPUs with native bf16 changes the tiny model's greedy
# answers (ENVIRONMENT.md), and the tests assert robust facts such as "Paris".
TEST_DTYPE = "float32"
API_KEY = "test-key-0123456789"
MAX_UPLOAD = 1_000_000
WEBHOOK_SECRET = "whsec_" + __import__("base64").b64encode(b"vbs-test-webhook-secret").decode()


# The longest files first: with two workers taking a file at a time (`make test`), the last
# file to start is then a short one, not a four-minute one.
LONGEST_FIRST = (
    "test_dagster_ui.py", "test_fine_tuning.py", "test_daemon.py", "test_corpus.py",
    "test_server_mode.py", "test_api.py", "test_training.py", "test_datasets.py",
    "test_conquests.py", "test_inference.py",
)  # fmt: skip


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: n for n, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


class WebhookReceiver:
    """A local HTTP endpoint that records what it receives; answers the first ``fail_first``
    requests with 500 to exercise retries."""

    def __init__(self, fail_first: int = 0) -> None:
        import http.server
        import threading

        self.received: list[tuple[dict[str, str], bytes]] = []
        self.fail_first = fail_first
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                failing = len(receiver.received) <= receiver.fail_first
                self.send_response(500 if failing else 200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self) -> list[tuple[dict[str, str], bytes]]:
        return list(self.received)

    def events_for(self, batch_id: str) -> list[tuple[dict[str, str], bytes]]:
        """The deliveries about one batch, read before any signature is checked: the receiver
        lives for the whole session, and an earlier test's event is past the 5-minute replay
        window that a verifier applies to every event it reads."""
        return [e for e in self.received if json.loads(e[1]).get("data", {}).get("id") == batch_id]

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="session")
def webhook_receiver():
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The real SmolLM2 folder (`make test` prepares it in ./.vbs before pytest starts)."""
    return prepare_default_model(load_settings().home)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "vbs"


# The tests' engines keep a 1 GiB KV cache (the default is 4 GiB): the small model's requests
# here need far less, and two workers' engines, runs and training share 23 GiB.
TEST_KVCACHE_GIB = "1"
# On a GPU the suite runs on one worker (the Makefile), and at most four engines hold the GPU at
# once: the pytest process's chat and embedding engines, a platform run's engine, and a warm
# server's. Each gets a share they fit in together (the small model needs well under 0.1 of
# any GPU vLLM supports); vLLM refuses to start an engine whose share is not free.
TEST_GPU_SHARES = {
    "VBS_GPU_MEMORY_UTILIZATION": "0.2",
    "VBS_EMBEDDING_GPU_MEMORY_UTILIZATION": "0.04",
}
# vLLM's cache (what it learned of a model class in a subprocess that imports vLLM again: 9 s of
# a platform's first engine start) is shared by the tests' platforms, as one machine's would be:
# the repository's own, under the VBS_HOME `make test` sets.
SHARED_VLLM_CACHE = str(
    Path(os.environ.get("VBS_HOME", Path(__file__).resolve().parent.parent / ".vbs")).absolute()
    / "cache"
    / "vllm"
)


def settings_for(home: Path, model_dir: Path | None = None, **env: str):
    """Settings of a test's own VBS_HOME (nothing read from the process environment)."""
    values = {
        "VBS_HOME": str(home),
        "VBS_DTYPE": TEST_DTYPE,
        "VBS_CPU_KVCACHE_GIB": TEST_KVCACHE_GIB,
        # The engine in each run unless a test asks for the warm servers (the default).
        "VBS_ENGINE": "in_process",
        **TEST_GPU_SHARES,
        **env,
    }
    if model_dir is not None:
        values["VBS_MODEL"] = str(model_dir)
    return load_settings(values)


def resources_for(home: Path, model_dir: Path | None = None, **env: str) -> dict[str, Any]:
    return build_resources(settings_for(home, model_dir, **env))


@pytest.fixture
def resources(home: Path, model_dir: Path) -> dict[str, Any]:
    return resources_for(home, model_dir)


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


@pytest.fixture(scope="session")
def postgres():
    """The session's PostgreSQL 15 (tests/postgres.py); each test asks it for a database."""
    from tests.postgres import PostgresServer

    server = PostgresServer(free_port())
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """The session's S3 server (tests/s3.py), and this process's AWS variables pointing at it
    (the processes the tests start inherit them); each test asks it for a bucket."""
    from tests.s3 import S3Server

    server = S3Server(free_port(), tmp_path_factory.mktemp("s3") / "moto.log")
    saved = {key: os.environ.get(key) for key in server.env}
    os.environ.update(server.env)
    try:
        yield server
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def new_database(request, tmp_path):
    """Makes new, empty databases (their URLs): once on SQLite (the embedded default) and once
    on the session's PostgreSQL."""
    if request.param == "postgres":
        return request.getfixturevalue("postgres").database
    made = iter(range(1_000_000))
    return lambda: f"sqlite:///{tmp_path / f'catalog-{next(made)}.db'}"


@pytest.fixture
def catalog_url(new_database) -> str:
    """A new catalog's URL, on each database of ``new_database``."""
    return new_database()


def chat_line(custom_id: str, content: str, **params: Any) -> dict[str, Any]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], **params}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def submit(resources: dict[str, Any], instance, lines_or_bytes, name: str = "jobs.jsonl") -> str:
    """Drop a file into the inbox and let the real sensor take it; returns the batch id."""
    from vbs_sensors.inbox import inbox_sensor

    data = lines_or_bytes if isinstance(lines_or_bytes, bytes) else jsonl(lines_or_bytes)
    with resources["bucket"].open(f"inbox/{name}", "wb") as fh:
        fh.write(data)
    cursor = None
    for _ in range(2):
        context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)
        result = inbox_sensor(context)
        cursor = context.cursor
    (request,) = result.run_requests
    instance.add_dynamic_partitions("batches", [request.partition_key])
    return request.partition_key


def materialize_batch(
    resources: dict[str, Any], instance, batch_id: str, chunk_size: int = 256, **kwargs
):
    from vbs_assets.inference import batch_output, error_rate, output_complete
    from vbs_assets.ingest import batch_input

    return dg.materialize(
        [batch_input, batch_output, output_complete, error_rate],
        partition_key=batch_id,
        instance=instance,
        resources=resources,
        run_config=dg.RunConfig(ops={"batch_output": {"config": {"chunk_size": chunk_size}}}),
        **kwargs,
    )


def metadata_of(result, asset: str) -> dict[str, Any]:
    (event,) = [
        e
        for e in result.get_asset_materialization_events()
        if e.asset_key.to_user_string() == asset
    ]
    return {k: v.value for k, v in event.materialization.metadata.items()}


# Ports come from below the kernel's ephemeral range (32768-60999 here), where no outgoing
# connection takes one between the check and the server's bind, from a slice of its own per
# xdist worker, and never twice in one process. Ports from ``bind(0)`` are ephemeral: CI once
# lost a replica's port to another connection in that gap.
_PORT_SLICE = 3000
_PORT_BASE = 20000
_handed: set[int] = set()


def _slice() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    index = int(worker[2:]) + 1 if worker.startswith("gw") and worker[2:].isdigit() else 0
    start = _PORT_BASE + (index % 4) * _PORT_SLICE
    return range(start, start + _PORT_SLICE)


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int) -> int:
    """The first of ``n`` consecutive free loopback ports (an engine port with its replicas)."""
    ports = _slice()
    for _ in range(len(ports)):
        first = random.randrange(ports.start, ports.stop - n)
        run = range(first, first + n)
        if not _handed.intersection(run) and all(_bindable(port) for port in run):
            _handed.update(run)
            return first
    raise RuntimeError(f"no {n} consecutive free ports in {ports.start}-{ports.stop - 1}")


def free_port() -> int:
    return free_ports(1)


def start_short_fine_tune(client: Any, suffix: str) -> Any:
    """A fine-tuning job through the API (the official client): 32 marker examples uploaded, 3
    steps of the hf backend; the job as created."""
    from tests.test_training import marker_examples

    training = client.files.create(
        file=("m.jsonl", jsonl(marker_examples(32))), purpose="fine-tune"
    )
    return client.fine_tuning.jobs.create(
        model=MODEL, training_file=training.id, suffix=suffix,
        hyperparameters={"batch_size": 8, "learning_rate_multiplier": 5, "n_epochs": 1},
        extra_body={"max_steps": 3, "backend": "hf"},
    )  # fmt: skip


def marker_job(
    client: Any, examples: int, suffix: str, extra_body: dict, seed: int = 7, n_epochs: int = 3
) -> tuple[Any, bytes, Any]:
    """``examples`` marker examples uploaded and a fine-tuning job on them (batches of 8 at
    5 x 2e-4): the file, its bytes, the job as created."""
    from tests.test_training import marker_examples

    data = jsonl(marker_examples(examples))
    uploaded = client.files.create(file=("zebra.jsonl", data), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=MODEL, training_file=uploaded.id, suffix=suffix, seed=seed,
        hyperparameters={"batch_size": 8, "learning_rate_multiplier": 5, "n_epochs": n_epochs},
        extra_body=extra_body,
    )  # fmt: skip
    return uploaded, data, job


def wait_job_ended(client: Any, job_id: str, timeout: float = 600) -> Any:
    """The fine-tuning job once it has ended (succeeded, failed or cancelled)."""
    return wait_for(
        lambda: (j := client.fine_tuning.jobs.retrieve(job_id)).status
        in ("succeeded", "failed", "cancelled") and j,
        timeout, "the job to end",
    )  # fmt: skip


def http_ok(url: str, timeout: float = 2) -> bool:
    """Whether ``url`` answers 200 now (a server's ``/health`` while it comes up)."""
    try:
        return urllib.request.urlopen(url, timeout=timeout).status == 200
    except OSError:
        return False


def healthy(url: str) -> bool:
    """Whether the server at ``url`` (vLLM, the router, the API) answers ``/health`` now."""
    return http_ok(f"{url}/health")


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


STORAGE_ENV = ("VBS_CATALOG_URL", "VBS_DAGSTER_STORAGE_URL", "VBS_BUCKET_URL")


class Platform:
    def __init__(
        self, home: Path, port: int, api_port: int, log: Path, process: Any = None
    ) -> None:
        self.home, self.port, self.api_port, self.log = home, port, api_port, log
        self.process = process
        self.api_url = f"http://127.0.0.1:{api_port}/v1"
        self.inbox = home / "bucket" / "inbox"
        # The platform's own storage settings (a catalog or Dagster storage on PostgreSQL).
        env = {k: v for k, v in (process.env if process else {}).items() if k in STORAGE_ENV}
        # What a `vbs` command needs to find this platform's state.
        self.env = {"VBS_HOME": str(home), **env}
        self.resources = resources_for(home, **env)
        # dagster.yaml names the variable; vbs serve hands its children the URL as normalized.
        normalized = settings_for(home, **env).child_environment()
        dagster_env = {k: normalized[k] for k in ("VBS_DAGSTER_STORAGE_URL",) if k in normalized}
        with mock.patch.dict(os.environ, dagster_env):
            self.instance = dg.DagsterInstance.from_config(str(home / "dagster"))

    @property
    def bucket(self):
        return self.resources["bucket"]

    def drop(self, name: str, data: bytes) -> None:
        """Write under a temporary name, then rename: the documented atomic drop (on S3 one PUT:
        an object appears whole)."""
        if not self.bucket.is_local:
            self.bucket.write_bytes(f"inbox/{name}", data)
            return
        tmp = self.inbox / f".{name}.part"
        tmp.write_bytes(data)
        tmp.rename(self.inbox / name)

    def read_jsonl(self, rel: str) -> list[dict[str, Any]]:
        """A JSONL file of the platform's bucket (a folder or S3)."""
        return [json.loads(line) for line in self.bucket.read_text(rel).splitlines()]

    def runs(self, batch_id: str):
        return self.instance.get_runs(dg.RunsFilter(tags={"vbs/batch_id": batch_id}))

    def graphql(self, query: str, **variables: Any) -> dict:
        """The webserver's GraphQL API, as the Dagster UI calls it."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/graphql",
            data=json.dumps({"query": query, "variables": variables}).encode(),
            headers={"content-type": "application/json"},
        )
        body = json.loads(urllib.request.urlopen(request, timeout=60).read())
        assert not body.get("errors"), body["errors"]
        return body["data"]

    def batch(self, batch_id: str):
        return self.resources["catalog"].batches.get(batch_id)

    def wait_batch(self, name: str, timeout: float = 60) -> str:
        catalog = self.resources["catalog"]

        def find():
            rows = [r for r in catalog.batches.list() if r["original_filename"] == name]
            return rows[0]["id"] if rows else None

        return wait_for(find, timeout, f"a batch for {name}")

    def wait_run_finished(self, batch_id: str, timeout: float = 60):
        """The batch's latest run once it has finished (its checks run after the asset)."""
        return wait_for(
            lambda: (runs := self.runs(batch_id)) and runs[0].is_finished and runs[0],
            timeout,
            f"the run of {batch_id} to finish",
        )

    def wait_status(self, batch_id: str, statuses: set[str], timeout: float) -> dict:
        return wait_for(
            lambda: (row := self.batch(batch_id)) and row["status"] in statuses and row,
            timeout,
            f"{batch_id} to reach {statuses}",
        )


def drop_batch(platform: Platform, name: str, lines, chunk_size: int | None = None) -> str:
    """A batch file (and its chunk size) dropped into the platform's inbox; its batch id."""
    if chunk_size:
        platform.drop(f"{name}.metadata.json", json.dumps({"chunk_size": chunk_size}).encode())
    platform.drop(f"{name}.jsonl", jsonl(lines))
    return platform.wait_batch(f"{name}.jsonl", timeout=60)


def drop_counting_batch(
    platform: Platform, name: str, n: int, chunk_size: int, timeout: float
) -> tuple[str, list[dict[str, Any]]]:
    """A batch of ``n`` "Count to i." requests in chunks of ``chunk_size``, dropped into the
    inbox; (its id, its lines) once two chunks are checkpointed: a batch to interrupt mid-way."""
    lines = [
        chat_line(f"{name}-{i:02d}", f"Count to {i}.", temperature=0, max_tokens=24)
        for i in range(n)
    ]
    batch_id = drop_batch(platform, name, lines, chunk_size=chunk_size)
    folder = f"batches/{batch_id}/checkpoint"

    def chunks() -> int:
        return len([e for e in platform.bucket.list_files(folder) if e.name.startswith("chunk-")])

    wait_for(lambda: chunks() >= 2, timeout, "two chunks")
    return batch_id, lines


def _up(url: str, proc: subprocess.Popen, log: Path):
    def check():
        try:
            return urllib.request.urlopen(url, timeout=2).status == 200
        except OSError:
            assert proc.poll() is None, log.read_text()[-3000:]
            return False

    return check


class PlatformProcess:
    """`vbs serve` (Dagster webserver + daemon, and the HTTP API) on loopback ports, as a user
    starts it; stopped as a user stops it, or killed as a power loss kills it."""

    def __init__(self, home: Path, env: dict[str, str], port: int, api_port: int) -> None:
        self.home, self.env, self.port, self.api_port = home, env, port, api_port
        self.log = home.parent / "vbs-serve.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120) -> None:
        command = [sys.executable, "-m", "vbs_cli.main", "serve", "--port", str(self.port)]
        command += ["--api-port", str(self.api_port)]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                command, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        wait_for(_up(f"http://127.0.0.1:{self.port}/server_info", self.proc, self.log), timeout,
                 "the Dagster webserver")  # fmt: skip
        wait_for(_up(f"http://127.0.0.1:{self.api_port}/health", self.proc, self.log), 60,
                 "the API server")  # fmt: skip

    def processes(self):
        import psutil

        if self.proc is None or self.proc.poll() is not None:
            return []
        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]

    def running(self, marker: str) -> list:
        """The live processes of the platform whose command line holds ``marker`` (one that
        exits, or is a zombie not yet reaped, while it is looked at is left out)."""
        import psutil

        found = []
        for process in self.processes():
            try:
                if marker in " ".join(process.cmdline()):
                    found.append(process)
            except psutil.Error:
                continue
        return found

    def stop(self, timeout: float = 60) -> float:
        """SIGTERM to `vbs serve`, as Ctrl-C or a service manager does; returns the seconds."""
        started = time.monotonic()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout)
        return time.monotonic() - started

    def kill_everything(self) -> None:
        """Every process of the platform dies at the same instant (power loss, OOM killer)."""
        import psutil

        processes = self.processes()
        for process in processes:
            try:
                process.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(processes, timeout=10)
        self.proc.wait(10)


def start_platform(home: Path, model_dir: Path, **env: str) -> PlatformProcess:
    """`vbs serve` on ``home``; without its own Label Studio unless ``env`` says otherwise (the
    tests that curate share the session's, ``label_studio``)."""
    if "VBS_BUCKET_URL" not in env:
        (home / "bucket" / "inbox").mkdir(parents=True, exist_ok=True)
    full_env = dict(
        os.environ,
        VBS_HOME=str(home),
        VBS_MODEL=str(model_dir),
        VBS_DTYPE=TEST_DTYPE,
        VBS_CPU_KVCACHE_GIB=TEST_KVCACHE_GIB,
        VBS_LABEL_STUDIO_START="false",
        VBS_CODE_SERVER_PORT=str(free_port()),
        # The engine in each run unless a test asks for the warm servers (the default).
        VBS_ENGINE="in_process",
        # Dagster's run-retry consumer looks for failed runs every 5 s by default.
        DAGSTER_EVENT_LOG_CONSUMER_DAEMON_INTERVAL_SECONDS="1",
        VLLM_CACHE_ROOT=SHARED_VLLM_CACHE,
        **TEST_GPU_SHARES,
    )
    full_env.update(env)
    platform = PlatformProcess(home, full_env, free_port(), free_port())
    platform.start()
    return platform


class LabelStudioServer:
    """A real Label Studio, started the way `vbs serve` starts it."""

    def __init__(self, home: Path) -> None:
        from vbs_resources.curation.label_studio import LabelStudio, label_studio_command

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command, extra = label_studio_command(home, "127.0.0.1", self.port, None, None)
        self.token = (home / "token").read_text().strip()
        self.log = home / "label-studio.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("VBS_")}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                command, env={**env, **extra}, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.client = LabelStudio(url=self.url, token=self.token)

        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Label Studio exited: {self.log.read_text()[-2000:]}")
            return self.client.healthy()

        wait_for(up, 240, "Label Studio")

    def stop(self) -> None:
        import signal

        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    server = LabelStudioServer(tmp_path_factory.mktemp("label-studio"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def platform(tmp_path_factory, model_dir, webhook_receiver, label_studio):
    """The shared platform of the end-to-end tests, with API keys, webhooks and the session's
    Label Studio, on the embedded defaults (SQLite). The same platform on PostgreSQL is
    test_production.py's, with an S3 bucket (`make test-production`)."""
    home = tmp_path_factory.mktemp("platform") / "vbs"
    process = start_platform(
        home,
        model_dir,
        VBS_API_KEYS=f"{API_KEY},second-key",
        VBS_MAX_UPLOAD_BYTES=str(MAX_UPLOAD),
        VBS_WEBHOOK_URLS=webhook_receiver.url,
        VBS_WEBHOOK_SECRET=WEBHOOK_SECRET,
        VBS_LABEL_STUDIO_URL=label_studio.url,
        VBS_LABEL_STUDIO_TOKEN=label_studio.token,
        # Training holds one core: the suite's other worker runs beside it.
        VBS_TRAINER_THREADS="1",
    )
    try:
        yield Platform(home, process.port, process.api_port, process.log, process)
    finally:
        process.stop()
