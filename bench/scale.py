"""OpenAI's largest batch: 50,000 chat requests (``max_tokens`` 1) dropped into the inbox of a
fresh `vbs serve`, against a 1,000-request batch made of the same requests' first lines.

The platform is the test suite's (``tests.conftest.start_platform``: the embedded defaults,
SQLite and a local bucket, the small model, float32, a 1 GiB CPU KV cache, and the engine in
each run, ``VBS_ENGINE=in_process``, not the warm servers that are vbs's default). Each batch is
written to ``inbox/.<name>.part`` and renamed into ``inbox/`` as a user drops one; the small
batch runs first, then the large one, on the same platform, each in its own Dagster run.
Requests: ``"Say {i}."`` to the served base model, ``max_tokens`` 1, ``temperature`` 0. The
chunk size is ``batch_output``'s default (256), or ``--chunk-size`` through the drop's
``.metadata.json`` sidecar.

What is measured, for each batch:

1. Peak RSS of the run. ``batch_job`` runs in one process (``in_process_executor``) and the
   vLLM engine runs inside it (``configure_vllm_env`` sets ``VLLM_ENABLE_V1_MULTIPROCESSING=0``),
   so the run is the run worker's process tree: every process below the code location's
   ``dagster api grpc`` server (how ``vbs_cli.serve.run_workers`` finds runs; only this
   benchmark's run is there while it runs) but the server's own ``multiprocessing`` resource
   tracker. That is the run worker (a ``multiprocessing`` spawn of the server), the
   ``vllm.model_executor.models.registry`` subprocess vLLM starts while it loads the model,
   and Dagster's compute-log tailers (``tail -F`` and ``watch_orphans.py``). A thread samples that tree every 0.2 s from before
   the drop until the run's processes have exited: ``peak_rss_mb`` is the highest sum of RSS
   over the tree (shared pages of several processes count once per process), and
   ``worker_hwm_mb`` the largest ``VmHWM`` (the kernel's own peak RSS of one process, exact up
   to the last sample before it exited) read from ``/proc/<pid>/status``. The figure compared is
   ``peak_rss_mb`` of the large batch less that of the small one (target: at most 300 MB).
2. The share of the batch's wall time spent in vbs's own work rather than in the engine::

       vbs_s      = batch_input step + batch_output step - engine_start_s - engine_s
       wall_s     = from the rename into the inbox to the catalog first reading "completed"
       overhead   = vbs_s / wall_s                                     (target: at most 3%)

   Step times are the STEP_START to STEP_SUCCESS timestamps of the run's events in Dagster's
   event log; ``engine_start_s`` (loading vLLM and the model) and ``engine_s`` (time spent
   waiting on the engine for each chunk's results) are ``batch_output``'s materialization
   metadata (``vbs_assets.runner.RunReport``). So ``vbs_s`` is validation and Parquet writing
   (``batch_input``), and claiming, checkpoints, catalog updates, merging the output files,
   the results lake and metadata (``batch_output``). ``engine_s`` also holds what the runner
   does while pulling the next chunk (reading it from ``requests.parquet``) and vLLM's own
   request handling (chat template, protocol models); ``wall_s`` also holds the inbox
   sensor's pick-up (two ticks), the run queue and the run process's start (Dagster's), printed
   apart as ``platform_s``. The polling is every 0.2 s; ``batch_output`` ends a moment after
   the batch reads "completed" (its metadata and preview), which ``vbs_s`` includes.

Also printed: the seconds between consecutive chunks (first five, last five, longest), from
the runner's ``chunk N:`` log messages, to show whether a large batch slows down as it goes;
and the timeline after the drop (``seen_<status>``: when the polling first read that status).

``--engine double`` runs the same in server mode (``VBS_ENGINE=server``) against
``VLLMServerDouble`` (tests/vllm_double.py; 20 ms a request, 256 at once): the run then holds
vbs's own work alone (its RSS is vbs's, not vLLM's), and an engine that fast shows vbs's share
of the wall at its largest. On this project's 2-core machines the real CPU engine answers
10-20 one-token requests a second, so its 50,000-request run takes about an hour.

Prints each batch's figures and timeline, then the comparison, and ends with one JSON line.
Run it small with ``--requests 3000 --small 300``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import MODEL, Platform, PlatformProcess, start_platform, wait_for  # noqa: E402
from vbs_assets.inference import InferenceConfig  # noqa: E402
from vbs_resources import layout as L  # noqa: E402

SAMPLE_S = 0.2
RSS_TARGET_MB = 300
OVERHEAD_TARGET = 0.03


def request_lines(n: int) -> bytes:
    """``n`` chat requests, ``"Say {i}."``, one token each, as a JSONL file's bytes."""
    out = []
    for i in range(n):
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"Say {i}."}],
            "max_tokens": 1,
            "temperature": 0,
        }
        line = {"custom_id": f"r{i:05d}", "method": "POST", "url": "/v1/chat/completions"}
        out.append(json.dumps({**line, "body": body}) + "\n")
    return "".join(out).encode()


def _cmdline(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def _hwm_mb(pid: int) -> float:
    """The process's peak RSS as the kernel keeps it (``VmHWM``), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@dataclass
class TreeSampler:
    """Samples the processes below the code location's gRPC server (the run workers and
    whatever they start) every ``interval`` seconds, from a thread."""

    platform: PlatformProcess
    interval: float = SAMPLE_S
    peak_rss_mb: float = 0.0
    peak_processes: int = 0
    samples: int = 0
    hwm_mb: dict[int, float] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _servers: list[psutil.Process] = field(default_factory=list)

    def run_processes(self) -> list[psutil.Process]:
        if not self._servers or not all(p.is_running() for p in self._servers):
            self._servers = [
                p for p in self.platform.processes() if "dagster api grpc" in _cmdline(p)
            ]
        found = []
        for server in self._servers:
            try:
                found += server.children(recursive=True)
            except psutil.Error:
                pass
        # The server's multiprocessing resource tracker starts with its first run and lives as
        # long as the server: it is no run's.
        return [p for p in found if "multiprocessing.resource_tracker" not in _cmdline(p)]

    def _sample(self) -> None:
        total, alive = 0, 0
        for process in self.run_processes():
            try:
                total += process.memory_info().rss
            except psutil.Error:
                continue
            alive += 1
            if process.pid not in self.names:
                self.names[process.pid] = _cmdline(process)[:120]
            hwm = _hwm_mb(process.pid)
            self.hwm_mb[process.pid] = max(self.hwm_mb.get(process.pid, 0.0), hwm)
        self.samples += 1
        if total / 2**20 > self.peak_rss_mb:
            self.peak_rss_mb, self.peak_processes = total / 2**20, alive

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def worker_hwm_mb(self) -> float:
        return max(self.hwm_mb.values(), default=0.0)


def step_seconds(logs: list[Any]) -> dict[str, float]:
    """Each step's seconds from its STEP_START to its STEP_SUCCESS (or STEP_FAILURE) event."""
    started: dict[str, float] = {}
    seconds: dict[str, float] = {}
    for entry in logs:
        event = entry.dagster_event
        if event is None or event.step_key is None:
            continue
        kind = event.event_type_value
        if kind == "STEP_START":
            started[event.step_key] = entry.timestamp
        elif kind in ("STEP_SUCCESS", "STEP_FAILURE") and event.step_key in started:
            seconds[event.step_key] = entry.timestamp - started[event.step_key]
    return seconds


def chunk_seconds(logs: list[Any]) -> dict[str, float]:
    """Seconds between consecutive ``chunk N:`` progress messages of ``batch_output`` (one
    chunk through the engine and into the checkpoint): the first and last five on average, and
    the longest. A batch whose chunks slow down as it goes shows it here."""
    times = [
        e.timestamp
        for e in logs
        if e.step_key == "batch_output" and (e.user_message or "").startswith("chunk ")
    ]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    if not gaps:
        return {}
    return {
        "chunks": len(times),
        "first5_s": round(sum(gaps[:5]) / len(gaps[:5]), 2),
        "last5_s": round(sum(gaps[-5:]) / len(gaps[-5:]), 2),
        "max_s": round(max(gaps), 2),
    }


def output_metadata(logs: list[Any]) -> dict[str, Any]:
    """``batch_output``'s materialization metadata in this run."""
    for entry in logs:
        materialization = entry.asset_materialization
        if materialization and materialization.asset_key.to_user_string() == "batch_output":
            return {k: v.value for k, v in materialization.metadata.items()}
    raise RuntimeError("the run materialized no batch_output")


def run_batch(
    platform: Platform, process: PlatformProcess, n: int, chunk_size: int, timeout: float
) -> dict[str, Any]:
    """Drops an ``n``-request batch, waits for it and its run's processes to end; its figures."""
    name = f"scale-{n}"
    data = request_lines(n)
    sampler = TreeSampler(process)
    sampler.start()
    if chunk_size != InferenceConfig().chunk_size:
        platform.drop(f"{name}.metadata.json", json.dumps({"chunk_size": chunk_size}).encode())
    dropped = time.time()
    platform.drop(f"{name}.jsonl", data)
    try:
        batch_id = platform.wait_batch(f"{name}.jsonl", timeout=120)
        seen: dict[str, float] = {}

        def ended() -> bool:
            status = platform.batch(batch_id)["status"]
            seen.setdefault(status, time.time())
            return status in ("completed", "failed", "cancelled", "expired")

        wait_for(ended, timeout, f"{batch_id} to end", interval=SAMPLE_S)
        run = platform.wait_run_finished(batch_id, timeout=120)
        logs = platform.instance.all_logs(run.run_id)
        # The run's process has exited (its last samples are in) once no process is below
        # the code server.
        wait_for(lambda: not sampler.run_processes(), 120, "the run's processes to exit")
    finally:
        sampler.stop()
    if not sampler.names:
        raise RuntimeError("no run process was found below the code server to sample")
    row = platform.batch(batch_id)
    if row["status"] != "completed":
        raise RuntimeError(f"{batch_id} ended {row['status']}: {row.get('errors')}")
    runs = platform.runs(batch_id)
    record = platform.instance.get_run_record_by_id(run.run_id)
    steps = step_seconds(logs)
    meta = output_metadata(logs)
    output_lines = platform.bucket.read_text(L.batch_file(batch_id, L.OUTPUT)).count("\n")
    wall = seen["completed"] - dropped
    engine_start, engine = meta["engine_start_seconds"], meta["engine_seconds"]
    vbs = steps["batch_input"] + steps["batch_output"] - engine_start - engine
    step_total = steps["batch_input"] + steps["batch_output"]
    return {
        "requests": n,
        "batch_id": batch_id,
        "runs": len(runs),
        "completed": row["request_completed"],
        "failed": row["request_failed"],
        "output_lines": output_lines,
        "completion_tokens": meta["completion_tokens"],
        "engine": meta.get("engine"),
        "peak_rss_mb": round(sampler.peak_rss_mb, 1),
        "peak_rss_processes": sampler.peak_processes,
        "worker_hwm_mb": round(sampler.worker_hwm_mb, 1),
        "processes_seen": sorted(set(sampler.names.values())),
        "samples": sampler.samples,
        "wall_s": round(wall, 2),
        "batch_input_s": round(steps["batch_input"], 2),
        "batch_output_s": round(steps["batch_output"], 2),
        "check_steps_s": {
            k: round(v, 2) for k, v in steps.items() if k not in ("batch_input", "batch_output")
        },
        "engine_start_s": engine_start,
        "engine_s": engine,
        "runner_wall_s": meta["wall_seconds"],
        "vbs_s": round(vbs, 2),
        "platform_s": round(wall - step_total, 2),
        "overhead": round(vbs / wall, 4),
        "chunk_gaps": chunk_seconds(logs),
        "timeline_s": {
            "run_created": round(record.create_timestamp.timestamp() - dropped, 2),
            "run_started": round((record.start_time or dropped) - dropped, 2),
            **{f"seen_{s}": round(t - dropped, 2) for s, t in seen.items()},
            "run_ended": round((record.end_time or dropped) - dropped, 2),
        },
    }


def report(result: dict[str, Any]) -> None:
    """One batch's figures, readable."""
    print(f"--- {result['requests']} requests ({result['batch_id']}, {result['runs']} run(s))")
    print(
        f"  completed {result['completed']}, failed {result['failed']}, "
        f"output lines {result['output_lines']}, completion tokens {result['completion_tokens']}, "
        f"engine {result['engine']}"
    )
    print(
        f"  peak RSS {result['peak_rss_mb']:.0f} MB over {result['peak_rss_processes']} "
        f"process(es) ({result['samples']} samples); worker VmHWM {result['worker_hwm_mb']:.0f} MB"
    )
    for command in result["processes_seen"]:
        print(f"    {command}")
    print(
        f"  wall (drop -> completed) {result['wall_s']:.1f}s = platform {result['platform_s']:.1f}s "
        f"+ batch_input {result['batch_input_s']:.2f}s + batch_output {result['batch_output_s']:.1f}s"
    )
    own = result["batch_output_s"] - result["engine_start_s"] - result["engine_s"]
    print(
        f"  batch_output = engine start {result['engine_start_s']:.1f}s + engine "
        f"{result['engine_s']:.1f}s + vbs {own:.2f}s"
    )
    print(
        f"  vbs's own work {result['vbs_s']:.2f}s = {100 * result['overhead']:.2f}% of the wall; "
        f"checks after it {result['check_steps_s']}"
    )
    print(f"  seconds between chunks {result['chunk_gaps']}")
    print(f"  timeline (s after the drop) {result['timeline_s']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--small", type=int, default=1_000)
    parser.add_argument("--chunk-size", type=int, default=InferenceConfig().chunk_size)
    parser.add_argument(
        "--model",
        default=os.environ.get("VBS_MODEL", str(ROOT / ".vbs" / "models" / MODEL)),
        help="the model folder (`vbs model prepare` puts it in the default place)",
    )
    parser.add_argument(
        "--engine",
        choices=("in_process", "double"),
        default="in_process",
        help="in_process: the real vLLM engine in the run; double: server mode against "
        "VLLMServerDouble (tests/vllm_double.py, 20 ms a request, 256 at once), so that the "
        "run holds vbs's work alone and a fast engine shows vbs's share at its largest",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="vbs-bench-scale-") as tmp:
        home = Path(tmp) / "vbs"
        env: dict[str, str] = {}
        double = None
        if args.engine == "double":
            import subprocess

            from tests.conftest import free_port

            port = free_port()
            double = subprocess.Popen(
                [sys.executable, "-m", "tests.vllm_double", "--model", MODEL, "--ttft-s", "0.02",
                 "--ports", str(port)], cwd=ROOT, start_new_session=True,
            )  # fmt: skip
            env = {"VBS_ENGINE": "server", "VBS_ENGINE_URL": f"http://127.0.0.1:{port}"}
        process = start_platform(home, Path(args.model), **env)
        try:
            platform = Platform(home, process.port, process.api_port, process.log, process)
            results = []
            for n in (args.small, args.requests):
                timeout = 1800 + 0.5 * n
                results.append(run_batch(platform, process, n, args.chunk_size, timeout))
                report(results[-1])
        finally:
            process.stop()
            if double is not None:
                double.kill()
                double.wait()

    small, large = results
    growth = large["peak_rss_mb"] - small["peak_rss_mb"]
    print(
        f"peak RSS {large['requests']} - {small['requests']} requests: {growth:+.0f} MB "
        f"(target within {RSS_TARGET_MB} MB); worker VmHWM "
        f"{large['worker_hwm_mb'] - small['worker_hwm_mb']:+.0f} MB"
    )
    print(
        f"vbs's own share of the {large['requests']}-request batch's wall: "
        f"{100 * large['overhead']:.2f}% (target at most {100 * OVERHEAD_TARGET:.0f}%)"
    )
    summary = {
        "bench": "scale",
        "engine": args.engine,
        "chunk_size": args.chunk_size,
        "max_tokens": 1,
        "peak_rss_growth_mb": round(growth, 1),
        "worker_hwm_growth_mb": round(large["worker_hwm_mb"] - small["worker_hwm_mb"], 1),
        "overhead": large["overhead"],
        "target_rss_growth_mb": RSS_TARGET_MB,
        "target_overhead": OVERHEAD_TARGET,
        "small": small,
        "large": large,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
