"""The Batch API against hostile clients: body caps before anything is read, strict JSON, locked
catalogs, host checks, unsafe settings, and the smaller contract points (file pagination,
deletion, input purposes, metrics). Against a real `python -m vbs_api.server` process on its own
VBS_HOME, with no Dagster behind it (nothing here needs a run)."""

import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from openai import OpenAI

from tests.conftest import chat_line, free_port, jsonl, wait_for
from vbs_resources import Catalog
from vbs_resources.lifecycle import BatchLifecycle

CAP = 1_000_000


class Server:
    def __init__(self, home: Path, port: int, proc: subprocess.Popen) -> None:
        self.home, self.port, self.proc = home, port, proc
        self.base = f"http://127.0.0.1:{port}"
        self.client = OpenAI(base_url=f"{self.base}/v1", api_key="unused", max_retries=0)
        self.catalog = Catalog(url=f"sqlite:///{home / 'catalog.db'}")
        self.process = psutil.Process(proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)

    def written(self) -> int:
        """Bytes the server process has written (to files and sockets) so far."""
        return self.process.io_counters().write_chars

    def stored_files(self) -> list[str]:
        folder = self.home / "bucket" / "files"
        return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _server_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VBS_")}
    return {**env, "VBS_HOME": str(home), "VBS_MAX_UPLOAD_BYTES": str(CAP), **extra}


def start_api_server(home: Path, **env: str) -> Server:
    """`python -m vbs_api.server` on ``home`` and a free port, up and healthy."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vbs_api.server", "--port", str(port)],
        env=_server_env(home, **env),
        start_new_session=True,
    )

    def healthy():
        try:
            return httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
        except httpx.HTTPError:
            assert proc.poll() is None
            return False

    wait_for(healthy, 60, "the API server")
    return Server(home, port, proc)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = start_api_server(tmp_path_factory.mktemp("api") / "vbs")
    yield server
    server.stop()


def raw_request(port: int, head: str, body_chunks=(), timeout: float = 10) -> bytes:
    """Send a request by hand (headers, then body pieces until the server stops reading) and
    return what the server answered."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        sock.sendall(head.encode())
        for chunk in body_chunks:
            try:
                sock.sendall(chunk)
            except OSError:
                break  # the server stopped reading and closed: what we want
        answer = b""
        try:
            while data := sock.recv(65536):
                answer += data
                if b"\r\n\r\n" in answer and len(answer) > 200:
                    break
        except OSError:
            pass
        return answer
    finally:
        sock.close()


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def test_a_declared_oversize_upload_is_refused_before_its_body(server):
    before_rss, before_written = server.process.memory_info().rss, server.written()
    head = (
        "POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        "Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: 1000000000\r\n\r\n"
    )
    started = time.monotonic()
    answer = raw_request(server.port, head)
    assert status_of(answer) == 413 and b"file_too_large" in answer
    assert time.monotonic() - started < 2  # answered at once, nothing of the body read
    assert server.process.memory_info().rss - before_rss < 20_000_000
    assert server.written() - before_written < 100_000
    assert server.stored_files() == []


def test_an_upload_without_a_length_is_cut_off_at_the_cap(server):
    """A chunked 30 MB upload against a 1 MB cap: refused once past the cap; no more than the
    cap ever reached the disk, and nothing stays behind."""
    before_rss, before_written = server.process.memory_info().rss, server.written()
    head = (
        "POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
        "Content-Type: multipart/form-data; boundary=xyz\r\n\r\n"
    )
    preamble = (
        b'--xyz\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n\r\n'
    )
    block = b"x" * 65536

    def chunks():
        yield b"%x\r\n%s\r\n" % (len(preamble), preamble)
        for _ in range(30 * 16):
            yield b"%x\r\n%s\r\n" % (len(block), block)

    answer = raw_request(server.port, head, chunks())
    assert status_of(answer) == 413
    assert server.written() - before_written < CAP + 300_000
    assert server.process.memory_info().rss - before_rss < 30_000_000
    assert server.stored_files() == []


def test_json_bodies_are_capped(server):
    big = json.dumps({"input_file_id": "file-x", "metadata": {"k": "v" * 2_000_000}}).encode()
    answer = httpx.post(f"{server.base}/v1/batches", content=big)
    assert answer.status_code == 413
    assert answer.json()["error"]["code"] == "request_too_large"
    # Without a declared length the body is cut off at the cap as well.
    streamed = httpx.post(f"{server.base}/v1/batches", content=iter([big[:500_000]] * 4))
    assert streamed.status_code == 413


def uploaded(server, name="jobs.jsonl"):
    return server.client.files.create(file=(name, jsonl([chat_line("a", "hi")])), purpose="batch")


@pytest.mark.parametrize(
    "body, param",
    [
        ('"metadata": {"k": "\\ud800"}', "metadata.k"),
        ('"metadata": {"\\udfff": "v"}', None),
        ('"metadata": {"k": 5}', "metadata.k"),
        ('"chunk_size": NaN', None),
        ('"chunk_size": "7"', "chunk_size"),
        ('"chunk_size": 1' + "0" * 5000, None),
        ('"metadata": {}, "metadata": {"k": "v"}', "metadata"),
        ('"metadata": ' + "[" * 100_000 + "]" * 100_000, None),
        ('"completion_window": "1h"', "completion_window"),
        ('"endpoint": "/v1/images"', "endpoint"),
        ('"extra": 1', "extra"),
    ],
    ids=[
        "surrogate-value",
        "surrogate-key",
        "non-string-value",
        "nan",
        "string-number",
        "huge-integer",
        "duplicate-key",
        "deep-nesting",
        "bad-window",
        "bad-endpoint",
        "unknown-field",
    ],
)
def test_hostile_batch_bodies_are_400_and_write_nothing(server, body, param):
    file_id = uploaded(server).id
    before = server.catalog.batches.list(limit=1000)
    fields = {"endpoint": '"/v1/chat/completions"', "completion_window": '"24h"'}
    given = [name for name in fields if f'"{name}"' in body]
    text = ", ".join(
        [f'"input_file_id": "{file_id}"', body]
        + [f'"{name}": {value}' for name, value in fields.items() if name not in given]
    )
    text = "{" + text + "}"
    answer = httpx.post(
        f"{server.base}/v1/batches", content=text, headers={"content-type": "application/json"}
    )
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    if param is not None:
        assert error["param"] == param, error
    assert len(error["message"]) < 400
    assert server.catalog.batches.list(limit=1000) == before
    assert not (server.home / "bucket" / "batches").exists() or before
    assert httpx.get(f"{server.base}/v1/batches").status_code == 200


def test_an_output_file_is_not_a_batch_input(server):
    server.catalog.files.create(
        "file-output-0123456789", filename="x.jsonl", purpose="batch_output", size=1, path="x"
    )
    with pytest.raises(Exception) as info:
        server.client.batches.create(
            input_file_id="file-output-0123456789",
            endpoint="/v1/chat/completions",
            completion_window="24h",
        )
    assert info.value.status_code == 400 and info.value.body["param"] == "input_file_id"


def test_files_list_paginates_with_limit_after_and_order(server):
    made = [uploaded(server, f"page{i}.jsonl").id for i in range(5)]
    everything = [f.id for f in server.client.files.list(limit=10_000).data]
    assert set(made) <= set(everything)
    first = httpx.get(f"{server.base}/v1/files", params={"limit": 2}).json()
    assert len(first["data"]) == 2 and first["has_more"] is True
    assert first["last_id"] == first["data"][-1]["id"]
    rest = httpx.get(
        f"{server.base}/v1/files", params={"limit": 10_000, "after": first["last_id"]}
    ).json()
    assert [f["id"] for f in first["data"] + rest["data"]] == everything
    assert rest["has_more"] is False
    ascending = httpx.get(f"{server.base}/v1/files", params={"order": "asc"}).json()
    assert [f["id"] for f in ascending["data"]] == everything[::-1]
    assert httpx.get(f"{server.base}/v1/files", params={"limit": 0}).status_code == 400


def test_deleting_a_file_removes_its_bytes(server):
    file = uploaded(server, "gone.jsonl")
    path = server.home / "bucket" / "files" / f"{file.id}.jsonl"
    assert path.exists()
    assert server.client.files.delete(file.id).deleted
    assert not path.exists()
    assert httpx.get(f"{server.base}/v1/files/{file.id}").status_code == 404


def test_polls_stay_fast_while_an_upload_waits_for_the_write_lock(server):
    """Another process holds SQLite's write lock for 3 s; an upload waits for it in a worker
    thread while polls of a batch keep being answered from the event loop."""
    BatchLifecycle(server.catalog).create("batch_lockpoll01", source="api", input_file_id="f")
    holder = sqlite3.connect(server.home / "catalog.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    results = {}

    def upload():
        results["file"] = uploaded(server, "during-lock.jsonl")

    thread = threading.Thread(target=upload)
    thread.start()
    latencies = []
    with httpx.Client() as http:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            started = time.perf_counter()
            assert http.get(f"{server.base}/v1/batches/batch_lockpoll01").status_code == 200
            latencies.append(time.perf_counter() - started)
    assert thread.is_alive()  # the upload is still waiting for the lock
    holder.execute("COMMIT")
    holder.close()
    thread.join(30)
    assert results["file"].id.startswith("file-")
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    assert len(latencies) > 50 and p99 < 0.1, (len(latencies), p99)


def test_without_keys_only_loopback_host_names_are_answered(server):
    """A web page on this machine cannot read the API through DNS rebinding."""
    url = f"{server.base}/v1/files"
    assert httpx.get(url, headers={"host": "evil.example"}).status_code == 400
    assert httpx.get(url, headers={"host": f"evil.example:{server.port}"}).status_code == 400
    assert httpx.get(url, headers={"host": f"localhost:{server.port}"}).status_code == 200
    assert httpx.get(url).status_code == 200


@pytest.mark.parametrize(
    "env, message",
    [
        ({"VBS_API_KEYS": ","}, "VBS_API_KEYS"),
        ({"VBS_API_KEYS": "key-one, ,key-two"}, "VBS_API_KEYS"),
        ({"VBS_API_HOST": "0.0.0.0"}, "without authentication"),
        ({"VBS_WEBHOOK_URLS": "file:///etc/passwd"}, "VBS_WEBHOOK_URLS"),
    ],
)
def test_unsafe_settings_stop_the_server_at_start(tmp_path, env, message):
    proc = subprocess.run(
        [sys.executable, "-m", "vbs_api.server", "--port", str(free_port())],
        env=_server_env(tmp_path, **env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_keys_or_an_explicit_opt_out_allow_a_public_address():
    from vbs_resources import load_settings

    assert load_settings({"VBS_API_HOST": "0.0.0.0", "VBS_API_KEYS": "k1,k2"}).api_keys
    opted = load_settings({"VBS_API_HOST": "0.0.0.0", "VBS_API_INSECURE_NO_AUTH": "true"})
    assert opted.api_keys is None
    shown = repr(load_settings({"VBS_API_KEYS": "k-secret", "VBS_WEBHOOK_SECRET": "w-secret"}))
    assert "k-secret" not in shown and "w-secret" not in shown


def test_metrics_count_every_status_and_forget_the_ones_left(server):
    lifecycle = BatchLifecycle(server.catalog)
    lifecycle.create("batch_metrics001", source="api", input_file_id="f")
    lifecycle.request_cancel("batch_metrics001")

    def gauge(status):
        text = httpx.get(f"{server.base}/metrics").text
        line = next(
            x for x in text.splitlines() if x.startswith(f'vbs_batches{{status="{status}"}}')
        )
        return float(line.split()[-1])

    assert gauge("cancelling") >= 1
    lifecycle.finish("batch_metrics001", "cancelled")
    assert gauge("cancelling") == 0 and gauge("cancelled") >= 1
    assert gauge("expired") == 0  # every status is shown, also one no batch was ever in


def _scrape(server) -> dict[str, float]:
    """``/metrics`` as {sample with labels: value}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{server.base}/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def test_metrics_show_the_gpu_pool_durations_throughput_and_jobs(server):
    """A batch that waits, runs and completes with 400 output tokens, and a fine-tuning job
    queued: each figure moves as the catalog does."""
    lifecycle = BatchLifecycle(server.catalog)
    before = _scrape(server)
    assert before["vbs_fine_tuning_jobs{status=succeeded}"] >= 0
    assert {"vbs_deployments{status=running}", "vbs_pool_running{pool=gpu}"} <= before.keys()
    lifecycle.create("batch_metrics002", source="api", input_file_id="f")
    waiting = _scrape(server)
    assert waiting["vbs_pool_waiting{pool=gpu}"] == before["vbs_pool_waiting{pool=gpu}"] + 1
    lifecycle.start("batch_metrics002")
    running = _scrape(server)
    assert running["vbs_pool_running{pool=gpu}"] == before["vbs_pool_running{pool=gpu}"] + 1
    lifecycle.finalizing("batch_metrics002")
    lifecycle.finish("batch_metrics002", "completed", request_completed=4,
                     usage={"input_tokens": 40, "output_tokens": 400, "total_tokens": 440})  # fmt: skip
    after = _scrape(server)
    for phase in ("total", "running"):
        key = f"vbs_batch_duration_seconds_count{{phase={phase},status=completed}}"
        assert after[key] == before.get(key, 0) + 1
        # It took under a second: counted in the first bucket and every one above.
        low = f"vbs_batch_duration_seconds_bucket{{le=1.0,phase={phase},status=completed}}"
        assert after[low] == before.get(low, 0) + 1
    assert after["vbs_engine_output_tokens_per_second{}"] > 0
    assert after["vbs_pool_running{pool=gpu}"] == before["vbs_pool_running{pool=gpu}"]
    server.catalog.fine_tuning.insert(
        {"id": "ftjob-metrics0001", "model": "m", "training_file": "f", "dataset_version": "v",
         "backend": "hf", "hyperparameters": {}, "seed": 1, "status": "queued",
         "created_at": 1},
        "queued",
    )  # fmt: skip
    queued = _scrape(server)
    assert (
        queued["vbs_fine_tuning_jobs{status=queued}"]
        == after["vbs_fine_tuning_jobs{status=queued}"] + 1
    )
    assert queued["vbs_pool_waiting{pool=gpu}"] == after["vbs_pool_waiting{pool=gpu}"] + 1


def test_inbox_problems_are_listed(server):
    server.catalog.inbox.set_problems({"link.jsonl": ("symlink", "link.jsonl is a symbolic link")})
    data = httpx.get(f"{server.base}/v1/inbox").json()["data"]
    assert [(p["name"], p["kind"]) for p in data] == [("link.jsonl", "symlink")]
    env = {**_server_env(server.home), "VBS_API_URL": f"{server.base}/v1"}
    cli = subprocess.run(
        [sys.executable, "-m", "vbs_cli.main", "inbox"], env=env, capture_output=True, text=True
    )
    assert cli.returncode == 1 and "link.jsonl is a symbolic link" in cli.stdout
    server.catalog.inbox.set_problems({})


def test_a_truncated_upload_is_refused_and_leaves_nothing(server):
    body = (
        b'--xyz\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="cut.jsonl"\r\n\r\n'
        + jsonl([chat_line("a", "hi")])  # and no closing boundary
    )
    answer = httpx.post(
        f"{server.base}/v1/files",
        content=body,
        headers={"content-type": "multipart/form-data; boundary=xyz"},
    )
    assert answer.status_code == 400 and "closing boundary" in answer.json()["error"]["message"]
    assert not [n for n in server.stored_files() if n.startswith(".")]


def test_every_get_route_only_reads(server):
    """Each GET route of the app, called with ids of a real batch, file, conquest, dataset,
    fine-tuning job (with events and a deployment) and model: the catalog's bytes are the same
    after as before (a GET never writes, not even to follow a run)."""
    from starlette.routing import Route

    from vbs_api.app import create_app
    from vbs_resources import load_settings
    from vbs_resources.training import Hyperparameters
    from vbs_resources.training.jobs import create_job
    from vbs_resources.training.lifecycle import FineTuningLifecycle

    catalog = server.catalog
    file = server.client.files.create(file=("g.jsonl", jsonl([chat_line("g", "hi")])),
                                      purpose="batch")  # fmt: skip
    batch_id = "batch_getonly00001"
    BatchLifecycle(catalog).create(batch_id, source="api", input_file_id=file.id)
    conquest_id = "cq_getonly"
    catalog.conquests.add([{
        "id": conquest_id, "type": "support_reply", "type_version": "1", "status": "COMPLETED",
        "result": None, "input_data": {"messages": []}, "prompt": [], "prediction": "p",
        "error": None, "model": "m", "batch_id": batch_id, "custom_id": "c", "created_at": 1,
        "updated_at": 1.0,
    }])  # fmt: skip
    version = "support_reply-0123456789abcdef"
    catalog.datasets.record({
        "version": version, "type": "support_reply", "type_version": "1", "path": "d",
        "train_count": 1, "eval_count": 1, "icl_count": 0,
        "conquest_ids": {"train": [], "eval": []}, "options": {}, "run_id": None,
        "created_at": 1, "built_at": 1.0,
    })  # fmt: skip
    lifecycle = FineTuningLifecycle(catalog)
    job = create_job(lifecycle, model="SmolLM2-135M-Instruct", dataset_version=version,
                     training_file=version, backend="hf", hyperparameters=Hyperparameters())  # fmt: skip
    lifecycle.queued(job["id"], "run-getonly")  # a run Dagster has never heard of
    ids = {"batch_id": batch_id, "file_id": file.id, "conquest_id": conquest_id,
           "version": version, "job_id": job["id"], "model_id": "SmolLM2-135M-Instruct"}  # fmt: skip
    settings = load_settings({"VBS_HOME": str(server.home)})
    app = create_app(settings)
    paths = sorted(
        route.path
        for route in app.routes
        if isinstance(route, Route) and "GET" in (route.methods or ()) and route.path != "/docs"
    )
    from fastapi.testclient import TestClient

    db = server.home / "catalog.db"
    with TestClient(app, base_url="http://127.0.0.1") as client:
        for _ in range(2):
            for path in paths:
                url = path.replace("{model_id:path}", ids["model_id"])
                for name, value in ids.items():
                    url = url.replace("{" + name + "}", value)
                before = "\n".join(sqlite3.connect(db).iterdump())
                answer = client.get(url)
                assert answer.status_code < 500, (url, answer.text[:200])
                assert "\n".join(sqlite3.connect(db).iterdump()) == before, url
    assert {p.split("{")[0] for p in paths} >= {"/v1/batches/", "/v1/fine_tuning/jobs/",
                                               "/v1/conquests/", "/v1/datasets/", "/v1/files/"}  # fmt: skip
    assert catalog.fine_tuning.get(job["id"])["status"] == "queued"  # not "followed" by a read


def test_a_batch_created_while_its_file_is_deleted_is_a_404_leaving_nothing(server):
    """40 creates, each racing the deletion of its fresh upload: every answer is a batch or a
    404 naming the file (one was a 500 before, leaving an empty batches/<id>/ behind), and every
    folder under batches/ belongs to a batch that exists."""
    import concurrent.futures

    client = httpx.Client(base_url=f"{server.base}/v1", timeout=60)
    uploads = [
        client.post("/files", files={"file": (f"r{n}.jsonl", jsonl([chat_line("a", "hi")]))},
                    data={"purpose": "batch"}).json()["id"]
        for n in range(40)
    ]  # fmt: skip
    body = {"endpoint": "/v1/chat/completions", "completion_window": "24h"}

    def race(file_id: str) -> tuple[int, int]:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            created = pool.submit(client.post, "/batches", json={**body, "input_file_id": file_id})
            deleted = pool.submit(client.delete, f"/files/{file_id}")
            return created.result().status_code, deleted.result().status_code

    answers = [race(file_id) for file_id in uploads]
    assert {created for created, _ in answers} <= {200, 404}, answers
    assert {deleted for _, deleted in answers} <= {200, 404}, answers
    folders = {p.name for p in (server.home / "bucket" / "batches").iterdir()}
    assert folders <= {b["id"] for b in server.catalog.batches.list(limit=1000)}
    # Deterministically: the file's bytes gone between its lookup and the copy.
    file_id = client.post("/files", files={"file": ("gone.jsonl", jsonl([chat_line("a", "hi")]))},
                          data={"purpose": "batch"}).json()["id"]  # fmt: skip
    (server.home / "bucket" / server.catalog.files.get(file_id)["path"]).unlink()
    before = {p.name for p in (server.home / "bucket" / "batches").iterdir()}
    gone = client.post("/batches", json={**body, "input_file_id": file_id})
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "input_file_id"
    assert {p.name for p in (server.home / "bucket" / "batches").iterdir()} == before


def test_a_batch_without_a_completion_window_is_refused_as_openai_refuses_it(server):
    file = server.client.files.create(file=("w.jsonl", jsonl([chat_line("a", "hi")])),
                                      purpose="batch")  # fmt: skip
    answer = httpx.post(f"{server.base}/v1/batches",
                        json={"input_file_id": file.id, "endpoint": "/v1/chat/completions"})  # fmt: skip
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "completion_window"
