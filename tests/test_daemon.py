"""End to end under the real Dagster daemon, webserver and code server (`vbs serve`).

A file dropped into the inbox runs as a batch without anyone acting; an identical re-drop runs
nothing; a file still being written is not taken; a run whose process is killed with SIGKILL is
retried by the daemon and resumes from its checkpoint.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import dagster as dg
import pytest

from tests.conftest import (
    chat_line,
    drop_batch,
    drop_counting_batch,
    jsonl,
    read_jsonl,
    wait_for,
)

pytestmark = pytest.mark.slow


def test_servers_listen_on_loopback_only(platform):
    out = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout
    for port in (platform.port, platform.api_port):
        mine = [line for line in out.splitlines() if f":{port} " in line]
        assert mine and all("127.0.0.1:" in line for line in mine)


def test_slowly_written_file_waits_then_runs_to_completion(platform):
    lines = [
        chat_line(f"q{i}", "What is the capital of France?", temperature=0, max_tokens=16)
        for i in range(4)
    ]
    data = jsonl(lines)
    path = platform.inbox / "slow.jsonl"
    # A writer that appends for ~4 s: the sensor must not take the file half-written.
    with open(path, "wb") as fh:
        for i in range(0, len(data), len(data) // 8 + 1):
            fh.write(data[i : i + len(data) // 8 + 1])
            fh.flush()
            time.sleep(0.5)
            assert path.exists(), "the file was taken while still being written"
    batch_id = platform.wait_batch("slow.jsonl", timeout=30)
    row = platform.wait_status(batch_id, {"completed", "failed"}, timeout=180)
    assert row["status"] == "completed", row
    assert (row["request_total"], row["request_completed"]) == (4, 4)
    output = read_jsonl(platform.home / "bucket" / "batches" / batch_id / "output.jsonl")
    assert sorted(line["custom_id"] for line in output) == ["q0", "q1", "q2", "q3"]
    assert all(
        "Paris" in line["response"]["body"]["choices"][0]["message"]["content"] for line in output
    )
    run = platform.wait_run_finished(batch_id)
    assert run.status == dg.DagsterRunStatus.SUCCESS


def test_identical_redrop_starts_no_second_run(platform):
    batch_id = platform.wait_batch("slow.jsonl")
    data = (platform.home / "bucket" / "batches" / batch_id / "input.jsonl").read_bytes()
    platform.drop("slow-again.jsonl", data)
    wait_for(
        lambda: (platform.inbox / "duplicates" / "slow-again.jsonl").exists(),
        30,
        "the re-drop to be recognized",
    )
    time.sleep(3)  # a few more ticks: still nothing new
    assert len(platform.runs(batch_id)) == 1
    names = [r["original_filename"] for r in platform.resources["catalog"].batches.list()]
    assert "slow-again.jsonl" not in names


def _run_pids(instance, run_id: str) -> set[int]:
    """The processes executing a run, as Dagster's own engine events name them."""
    pids = set()
    for entry in instance.all_logs(run_id):
        pids.update(int(p) for p in re.findall(r"\(pid: (\d+)\)", entry.user_message or ""))
    return pids


def test_killed_run_is_retried_by_the_daemon_and_resumes(platform):
    lines = [
        chat_line(f"k{i:02d}", f"Count to {i}.", temperature=0, max_tokens=24) for i in range(24)
    ]
    platform.drop("kill.metadata.json", json.dumps({"chunk_size": 3}).encode())
    platform.drop("kill.jsonl", jsonl(lines))
    batch_id = platform.wait_batch("kill.jsonl", timeout=30)
    checkpoint = platform.home / "bucket" / "batches" / batch_id / "checkpoint"
    wait_for(lambda: len(list(checkpoint.glob("chunk-*.jsonl"))) >= 2, 180, "two chunks")
    (run,) = platform.runs(batch_id)
    pids = _run_pids(platform.instance, run.run_id)
    assert pids, "no process found for the run"
    done_before_kill = sum(
        len(p.read_text().splitlines()) for p in checkpoint.glob("chunk-*.jsonl")
    )
    for pid in pids:
        os.kill(pid, signal.SIGKILL)

    row = platform.wait_status(batch_id, {"completed", "failed"}, timeout=300)
    assert row["status"] == "completed", row
    platform.wait_run_finished(batch_id)
    runs = sorted(platform.runs(batch_id), key=lambda r: r.run_id != run.run_id)
    assert [r.status for r in runs] == [dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.SUCCESS]
    assert runs[1].tags.get("dagster/parent_run_id") == run.run_id

    folder = platform.home / "bucket" / "batches" / batch_id
    ids = [
        line["custom_id"]
        for name in ("output.jsonl", "errors.jsonl")
        for line in read_jsonl(folder / name)
    ]
    assert sorted(ids) == sorted(line["custom_id"] for line in lines)  # each exactly once
    records = platform.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("batch_output"), asset_partitions=[batch_id]),
        limit=1,
    ).records
    resumed = records[0].asset_materialization.metadata["resumed_requests"].value
    assert resumed >= done_before_kill >= 6


# ---- the whole platform ----------------------------------------------------------------------


def test_the_whole_platform_killed_mid_batch_finishes_it_after_a_restart(
    tmp_path_factory, model_dir
):
    """Every process of `vbs serve` killed at once mid-batch (power loss), then `vbs serve` again
    on the same VBS_HOME: without anyone acting, the batch completes from its checkpoint, each
    custom_id exactly once. Then a stop (SIGTERM) is quick and leaves no process behind."""
    from tests.conftest import Platform, start_platform

    home = tmp_path_factory.mktemp("crash") / "vbs"
    process = start_platform(home, model_dir)
    platform = Platform(home, process.port, process.api_port, process.log, process)
    lines = [
        chat_line(f"p{i:02d}", f"Count to {i}.", temperature=0, max_tokens=24) for i in range(32)
    ]
    batch_id = drop_batch(platform, "power", lines, chunk_size=4)
    checkpoint = home / "bucket" / "batches" / batch_id / "checkpoint"
    wait_for(lambda: len(list(checkpoint.glob("chunk-*.jsonl"))) >= 2, 240, "two chunks")
    process.kill_everything()
    before = platform.batch(batch_id)
    assert before["status"] == "in_progress" and 8 <= before["request_completed"] < 32

    process.start()
    try:
        row = platform.wait_status(batch_id, {"completed", "failed", "cancelled"}, timeout=300)
        assert row["status"] == "completed", row
        ids = [
            line["custom_id"]
            for name in ("output.jsonl", "errors.jsonl")
            for line in read_jsonl(home / "bucket" / "batches" / batch_id / name)
        ]
        assert sorted(ids) == sorted(line["custom_id"] for line in lines)
        # The batch is completed inside the step; Dagster records the materialization after it.
        platform.wait_run_finished(batch_id, timeout=120)
        records = platform.instance.fetch_materializations(
            dg.AssetRecordsFilter(
                asset_key=dg.AssetKey("batch_output"), asset_partitions=[batch_id]
            ),
            limit=1,
        ).records
        resumed = records[0].asset_materialization.metadata["resumed_requests"].value
        assert resumed >= before["request_completed"]
        events = platform.resources["catalog"].events.of_subject(batch_id)
        assert [e["type"] for e in events] == ["batch.completed"]
    finally:
        seconds = process.stop()
    assert seconds < 15
    assert process.processes() == []
    leftovers = subprocess.run(["pgrep", "-f", str(home)], capture_output=True, text=True)
    assert leftovers.stdout.strip() == ""


def test_a_registered_adapter_answers_its_own_lines_in_a_mixed_batch(platform, model_dir, tmp_path):
    """An adapter made here (PEFT format, nonzero weights) registered with `vbs models add`,
    then one batch through the inbox naming the base model and the adapter on the same prompts:
    each line is answered by the model it names, and says so. Retired, it is model_not_found."""
    from tests.adapters import make_adapter

    adapter = make_adapter(tmp_path / "support-v3", model_dir)
    env = {**os.environ, **platform.env, "VBS_MODEL": str(model_dir)}

    def vbs_models(*args):
        command = [sys.executable, "-m", "vbs_cli.main", "models", *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)

    added = vbs_models("add", "support-v3", "--adapter", str(adapter))
    assert added.returncode == 0, added.stderr
    prompts = ["What is the capital of France?", "Name a color.", "Say hello."]
    lines = []
    for i, prompt in enumerate(prompts):
        lines.append(chat_line(f"base-{i}", prompt, temperature=0, max_tokens=16))
        adapted = chat_line(f"lora-{i}", prompt, temperature=0, max_tokens=16)
        adapted["body"]["model"] = "support-v3"
        lines.append(adapted)
    batch_id = drop_batch(platform, "mixed", lines)
    row = platform.wait_status(batch_id, {"completed", "failed"}, timeout=300)
    assert row["status"] == "completed" and row["request_completed"] == 6, row
    output = {
        x["custom_id"]: x["response"]["body"]
        for x in read_jsonl(platform.home / "bucket" / "batches" / batch_id / "output.jsonl")
    }
    for i in range(len(prompts)):
        assert output[f"base-{i}"]["model"] == "SmolLM2-135M-Instruct"
        assert output[f"lora-{i}"]["model"] == "support-v3"
    answers = [
        (output[f"base-{i}"]["choices"][0]["message"]["content"],
         output[f"lora-{i}"]["choices"][0]["message"]["content"])
        for i in range(len(prompts))
    ]  # fmt: skip
    assert "Paris" in answers[0][0]
    assert sum(base != lora for base, lora in answers) >= 2, answers

    assert vbs_models("retire", "support-v3").returncode == 0
    retired_batch = drop_batch(platform, "retired", [lines[1]])
    row = platform.wait_status(retired_batch, {"completed", "failed"}, timeout=300)
    [error] = read_jsonl(platform.home / "bucket" / "batches" / retired_batch / "errors.jsonl")
    assert error["response"]["body"]["error"]["code"] == "model_not_found"


def test_a_dead_code_server_comes_back_by_itself(platform):
    """The code location's gRPC server killed (it once died of threads blocked on a FIFO):
    `dagster dev` left the location in error and every sensor stopped until a manual reload.
    `vbs serve` now sees the error and reloads the location; a file dropped after the kill is
    taken and answered."""
    import psutil

    from vbs_api.launch import BatchLauncher

    servers = platform.process.running("api grpc")
    assert servers
    for server in servers:
        server.kill()
    psutil.wait_procs(servers, timeout=10)
    launcher = BatchLauncher(f"http://127.0.0.1:{platform.port}")
    wait_for(lambda: launcher.location_error() is not None, 60, "Dagster to see the location die",
             interval=1)  # fmt: skip
    wait_for(lambda: launcher.location_error() is None, 90, "the location to come back",
             interval=1)  # fmt: skip
    batch_id = drop_batch(platform, "after-code-server", [chat_line("c", "Hi.", max_tokens=4)])
    assert platform.wait_status(batch_id, {"completed", "failed"}, timeout=240)["status"] == (
        "completed"
    )
    assert "reloading it" in platform.log.read_text()


# ---- Dagster's production processes, each killed alone ----------------------------------------


def serve_status(platform) -> dict:
    return json.loads((platform.home / "serve-status.json").read_text())["processes"]


def kill_alone(platform, name: str) -> None:
    """``kill -9`` of one process `vbs serve` runs; returns once it runs again."""
    before = serve_status(platform)[name]
    os.kill(before["pid"], signal.SIGKILL)
    wait_for(
        lambda: (now := serve_status(platform)[name])["restarts"] == before["restarts"] + 1
        and now["state"] == "running" and now["pid"] != before["pid"],
        60, f"{name} to be restarted",
    )  # fmt: skip


def test_vbs_serve_runs_dagsters_production_processes(platform):
    """The code location's gRPC server, the webserver and the daemon, each a process of its own
    (no `dagster dev`), the webserver and daemon loading the location from the code server."""
    import psutil

    status = serve_status(platform)
    assert {"code-server", "webserver", "daemon", "api"} <= status.keys()
    lines = {n: " ".join(psutil.Process(s["pid"]).cmdline()) for n, s in status.items()}
    assert (
        "code-server start" in lines["code-server"]
        and "--location-name vbs" in lines["code-server"]
    )
    assert "dagster-webserver" in lines["webserver"] and "dagster-daemon run" in lines["daemon"]
    assert platform.process.running("dagster dev") == []
    workspace = (platform.home / "dagster" / "workspace.yaml").read_text()
    assert "grpc_server" in workspace and "location_name: vbs" in workspace


def test_the_webserver_and_the_api_killed_alone_come_back_and_launch_batches(platform):
    """Each killed alone in turn (`/health` counts the restart); the API then creates a batch,
    which it launches through the restarted webserver, and the batch completes."""
    import httpx
    from openai import OpenAI

    from tests.conftest import API_KEY

    for name in ("webserver", "api"):
        kill_alone(platform, name)
    wait_for(_up(platform), 60, "the API and the webserver")
    client = OpenAI(base_url=platform.api_url, api_key=API_KEY, max_retries=2)
    upload = client.files.create(file=("a.jsonl", jsonl([chat_line("w", "Hi.", max_tokens=4)])),
                                 purpose="batch")  # fmt: skip
    batch = client.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    row = platform.wait_status(batch.id, {"completed", "failed"}, timeout=240)
    assert row["status"] == "completed", row
    health = httpx.get(f"http://127.0.0.1:{platform.api_port}/health", timeout=10).json()
    assert health["processes"]["webserver"]["restarts"] >= 1
    assert health["processes"]["api"]["restarts"] >= 1


def _up(platform):
    import httpx

    def check() -> bool:
        try:
            api = httpx.get(f"http://127.0.0.1:{platform.api_port}/health", timeout=5)
            web = httpx.get(f"http://127.0.0.1:{platform.port}/server_info", timeout=5)
        except httpx.HTTPError:
            return False
        return api.status_code == 200 and web.status_code == 200

    return check


def test_the_daemon_killed_alone_comes_back_and_the_inbox_is_taken(platform):
    kill_alone(platform, "daemon")
    batch_id = drop_batch(platform, "after-daemon", [chat_line("d", "Hi.", max_tokens=4)])
    row = platform.wait_status(batch_id, {"completed", "failed"}, timeout=240)
    assert row["status"] == "completed", row


def test_the_code_server_killed_with_a_run_in_flight_loses_nothing(platform):
    """``kill -9`` of the code server while a batch runs in it: its run dies with it (what is
    left of its session is killed), the code server is restarted, the reconciler reports the
    run failed, Dagster retries it from its checkpoint, and every line is answered once."""
    batch_id, lines = drop_counting_batch(platform, "code-server-kill", 16, 2, timeout=240)
    [first] = platform.runs(batch_id)
    kill_alone(platform, "code-server")
    row = platform.wait_status(batch_id, {"completed", "failed"}, timeout=400)
    assert row["status"] == "completed", row
    ids = [
        line["custom_id"]
        for name in ("output.jsonl", "errors.jsonl")
        for line in read_jsonl(platform.home / "bucket" / "batches" / batch_id / name)
    ]
    assert sorted(ids) == sorted(line["custom_id"] for line in lines)
    runs = {r.run_id: r for r in platform.runs(batch_id)}
    assert runs[first.run_id].status == dg.DagsterRunStatus.FAILURE
    assert len(runs) == 2


def test_a_fifo_and_a_socket_in_the_inbox_leave_the_platform_serving(platform):
    """On the running platform (the real daemon's sensor): a FIFO and a socket beside a valid
    file. The valid file is answered, the two are reported, and the sensors keep ticking."""
    import socket

    fifo, sock = platform.inbox / "stuck.jsonl", platform.inbox / "sock.jsonl"
    os.mkfifo(fifo)
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock))
    try:
        batch_id = drop_batch(platform, "beside-a-fifo", [chat_line("f", "Hi.", max_tokens=4)])
        row = platform.wait_status(batch_id, {"completed", "failed"}, timeout=240)
        assert row["status"] == "completed"
        catalog = platform.resources["catalog"]
        reported = wait_for(
            lambda: {p["name"]: p["kind"] for p in catalog.inbox.problems()}.items()
            >= {("stuck.jsonl", "not_a_regular_file"), ("sock.jsonl", "not_a_regular_file")},
            60, "the two to be reported",
        )  # fmt: skip
        assert reported
    finally:
        server.close()
        fifo.unlink()
        sock.unlink()
