"""End to end under the real Dagster daemon and webserver (`vbs serve` = `dagster dev`).

A file dropped into the inbox runs as a batch without anyone acting; an identical re-drop runs
nothing; a file still being written is not taken; a run whose process is killed with SIGKILL is
retried by the daemon and resumes from its checkpoint.
"""

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pytest

from tests.conftest import chat_line, jsonl, read_jsonl
from vbs_cli.main import serve_command
from vbs_resources import build_resources

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class Platform:
    def __init__(self, home: Path, port: int, proc: subprocess.Popen, log: Path) -> None:
        self.home, self.port, self.proc, self.log = home, port, proc, log
        self.inbox = home / "bucket" / "inbox"
        self.resources = build_resources({"VBS_HOME": str(home)})
        self.instance = dg.DagsterInstance.from_config(str(home / "dagster"))

    def drop(self, name: str, data: bytes) -> None:
        """Write under a temporary name, then rename: the documented atomic drop."""
        tmp = self.inbox / f".{name}.part"
        tmp.write_bytes(data)
        tmp.rename(self.inbox / name)

    def runs(self, batch_id: str):
        return self.instance.get_runs(dg.RunsFilter(tags={"vbs/batch_id": batch_id}))

    def batch(self, batch_id: str):
        return self.resources["catalog"].get_batch(batch_id)

    def wait_batch(self, name: str, timeout: float = 60) -> str:
        catalog = self.resources["catalog"]

        def find():
            rows = [r for r in catalog.list_batches() if r["original_filename"] == name]
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


@pytest.fixture(scope="module")
def platform(tmp_path_factory, model_dir):
    home = tmp_path_factory.mktemp("platform") / "vbs"
    (home / "bucket" / "inbox").mkdir(parents=True)
    port = free_port()
    command, env = serve_command(home, "127.0.0.1", port)
    env["VBS_MODEL"] = str(model_dir)
    log = home / "dagster-dev.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}/server_info"

    def up():
        try:
            return urllib.request.urlopen(url, timeout=2).status == 200
        except OSError:
            assert proc.poll() is None, log.read_text()[-3000:]
            return False

    wait_for(up, 90, "the Dagster webserver")
    platform = Platform(home, port, proc, log)
    yield platform
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def test_servers_listen_on_loopback_only(platform):
    out = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout
    mine = [line for line in out.splitlines() if f":{platform.port} " in line]
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
    assert len(platform.resources["catalog"].list_batches()) == 1


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
