"""Dispatch at fleet size: vbs's server engine through the real vLLM router (``vllm-router``)
in front of N replicas of ``VLLMServerDouble`` (tests/vllm_double.py, a test double of a vLLM
server with a latency model), N = 1, 2, 4, 8, 16.

What it measures is vbs's side: whether the runs' dispatch (``VLLMServerEngine.run_chunks``,
as a batch's run calls it, chunk after chunk) and the router keep N replicas as busy as one.
The double answers each request after ``ttft + tpot x (max_tokens - 1)`` seconds, at most
``max_seqs`` at once per replica. Defaults: Llama 3.1 8B in BF16 on one H100, about 12,500
output tok/s at 256 sequences (the figure compiled from published vLLM benchmarks at
morphllm.com/vllm-benchmarks; vLLM's v0.6.0 blog reports the same order for Llama 8B on one
H100), that is a TPOT of about 20 ms at 256 sequences, TTFT 50 ms. A batch of 12 waves of
``max_seqs`` requests per replica (49,152 at 16 replicas, about OpenAI's largest batch): fewer
waves measure the batch's start and end more than its middle. The whole bench takes about 35
minutes; ``--replicas 1 16`` about 10.

Prints, per N: requests/s, output tok/s, the ratio to N x one replica (target >= 0.9) and to
the latency model's own limit, the CPU seconds vbs's side spent (and per request), the rig's
(double and router), and a bare aiohttp client's rate on the same fleet at the same
concurrency: on a 2-core machine the rig itself saturates first, so ``vs bare`` is vbs's own
share of any shortfall. Then, at 4 replicas, the router's policies on one model's batch,
and ``consistent_hash`` keyed on the model name (an ``X-Session-ID`` header naming it: adapter
affinity). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.api import wait_http  # noqa: E402
from tests.conftest import free_ports  # noqa: E402

MODEL = "SmolLM2-135M-Instruct"  # the served name, as the real legs serve it


class Fleet:
    """The double's N replicas (one process) and the router in front."""

    def __init__(self, n: int, args: argparse.Namespace, policy: str) -> None:
        first = free_ports(n + 2)
        self.router_port, metrics = first, first + 1
        replica_ports = list(range(first + 2, first + 2 + n))
        double = [sys.executable, "-m", "tests.vllm_double", "--model", MODEL]
        double += ["--ttft-s", str(args.ttft_s), "--tpot-s", str(args.tpot_s)]
        double += ["--max-seqs", str(args.max_seqs), "--ports", *map(str, replica_ports)]
        self.procs = [subprocess.Popen(double, cwd=ROOT, start_new_session=True)]
        for port in replica_ports:
            wait_http(f"http://127.0.0.1:{port}/health")
        router = [str(Path(sys.executable).parent / "vllm-router")]
        router += ["--host", "127.0.0.1", "--port", str(self.router_port), "--policy", policy]
        router += ["--worker-urls", *(f"http://127.0.0.1:{p}" for p in replica_ports)]
        router += ["--prometheus-port", str(metrics), "--log-level", "warning"]
        self.procs.append(subprocess.Popen(router, start_new_session=True))
        self.url = f"http://127.0.0.1:{self.router_port}"
        wait_http(f"{self.url}/health")
        self.replica_ports = replica_ports

    def answered(self) -> list[int]:
        counts = []
        for port in self.replica_ports:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
            counts.append(int(float(text.strip().splitlines()[-1].split()[-1])))
        return counts

    def cpu_seconds(self) -> float:
        """CPU time of the test rig (the double's process, the router) so far."""
        import psutil

        total = 0.0
        for proc in self.procs:
            times = psutil.Process(proc.pid).cpu_times()
            total += times.user + times.system
        return total

    def stop(self) -> None:
        for proc in self.procs:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def dispatch(
    url: str, args: argparse.Namespace, requests: int, session_header: bool
) -> tuple[float, float]:
    """Seconds for ``requests`` requests through vbs's server engine, in chunks as a run, and
    the CPU seconds this process (vbs's side) spent on them."""
    from vbs_resources.engine import EngineRequest, VLLMEngine, VLLMServerEngine
    from vbs_resources.engine.vllm_server import _Client

    class Engine(VLLMServerEngine):
        def _client(self, url: str | None = None) -> _Client:
            client = super()._client(url)
            if session_header:  # consistent_hash keyed on the model: adapter affinity
                client.headers = {**client.headers, "X-Session-ID": MODEL}
            return client

    local = VLLMEngine(model="/unused", served_model_name=MODEL)
    engine = Engine(url=url, local=local, concurrency=args.max_seqs)
    engine.start("/v1/chat/completions")

    def body(i: int) -> dict:
        # Bodies differ as a batch's do (consistent_hash without a header hashes the body).
        content = f"Question {i}: say hi."
        return {"model": MODEL, "messages": [{"role": "user", "content": content}],
                "max_tokens": args.max_tokens, "ignore_eos": True}  # fmt: skip

    chunks = [
        [EngineRequest(f"r{i}", body(i)) for i in range(start, min(start + args.chunk, requests))]
        for start in range(0, requests, args.chunk)
    ]
    started, cpu = time.perf_counter(), time.process_time()
    done = sum(len(results) for results in engine.run_chunks("/v1/chat/completions", chunks))
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    assert done == requests, (done, requests)
    return seconds, cpu


def raw_dispatch(url: str, args: argparse.Namespace, requests: int, concurrency: int) -> float:
    """Seconds for the same requests from a bare aiohttp client at the same concurrency: the
    ceiling of this rig (the double, the router and the client share this machine's cores)."""
    import asyncio

    import aiohttp

    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
    body["max_tokens"] = args.max_tokens

    async def run() -> float:
        connector = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            gate = asyncio.Semaphore(concurrency)

            async def one() -> None:
                async with gate, session.post(f"{url}/v1/chat/completions", json=body) as r:
                    await r.read()
                    assert r.status == 200, r.status

            started = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(requests)))
            return time.perf_counter() - started

    return asyncio.run(run())


def real_replicas(args: argparse.Namespace) -> list[dict]:
    """Real vLLM (this machine's CPU build) through `vbs engine serve --replicas N`, N = 1 and
    2, the same requests: the replicas share this machine's cores, so this shows that the
    router spreads the work and answers every request, not a speed-up."""
    model = ROOT / ".vbs" / "models" / "SmolLM2-135M-Instruct"
    rows = []
    for n in (1, 2):
        first = free_ports(n + 2)
        with tempfile.TemporaryDirectory(prefix="vbs-bench-replicas-") as tmp:
            env = dict(os.environ, VBS_HOME=str(Path(tmp) / "vbs"), VBS_MODEL=str(model),
                       VBS_ENGINE_PORT=str(first), VBS_CPU_KVCACHE_GIB="1",
                       VBS_SERVED_MODEL_NAME=MODEL)  # fmt: skip
            command = [sys.executable, "-m", "vbs_cli.main", "engine", "serve"]
            command += ["--replicas", str(n)]
            log = open(Path(tmp) / "engine.log", "wb")
            proc = subprocess.Popen(command, env=env, stdout=log, stderr=log, cwd=ROOT,
                                    start_new_session=True)  # fmt: skip
            try:
                url = f"http://127.0.0.1:{first}"
                wait_http(f"{url}/health", 600)
                if n > 1:  # the router is up once every replica answered
                    wait_http(f"{url}/readiness", 60)
                real = argparse.Namespace(
                    **{
                        **vars(args),
                        "max_seqs": args.real_concurrency,
                        "max_tokens": args.real_max_tokens,
                        "chunk": 256,
                    }
                )
                seconds, _ = dispatch(url, real, args.real_requests, session_header=False)
                ports = range(first + 1, first + n + 1) if n > 1 else [first]
                answered = []
                for port in ports:
                    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read()
                    answered.append(sum(
                        float(line.rsplit(" ", 1)[1]) for line in text.decode().splitlines()
                        if line.startswith("vllm:request_success_total")
                    ))  # fmt: skip
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        rate = args.real_requests * args.real_max_tokens / seconds
        rows.append({"replicas": n, "seconds": round(seconds, 2), "tok_s": round(rate, 1),
                     "answered": [int(a) for a in answered]})  # fmt: skip
        print(f"  {n} real replica(s): {args.real_requests} requests of {args.real_max_tokens} "
              f"tokens in {seconds:.2f} s, {rate:.1f} tok/s, answered per replica "
              f"{rows[-1]['answered']}")  # fmt: skip
    rows[1]["vs_one"] = round(rows[1]["tok_s"] / rows[0]["tok_s"], 3)
    print(f"  two real replicas / one: {rows[1]['vs_one']}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument(
        "--waves",
        type=int,
        default=12,
        help="requests: waves x max_seqs x N (12: 49,152 at 16 replicas, OpenAI's largest batch)",
    )
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--ttft-s", type=float, default=0.05)
    parser.add_argument("--tpot-s", type=float, default=0.02)
    parser.add_argument("--max-seqs", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=256, help="the run's chunk size")
    parser.add_argument("--policy-replicas", type=int, default=4)
    parser.add_argument("--policies-only", action="store_true")
    parser.add_argument("--real", action="store_true", help="only the real CPU replicas' legs")
    parser.add_argument("--real-requests", type=int, default=128)
    parser.add_argument("--real-max-tokens", type=int, default=32)
    parser.add_argument("--real-concurrency", type=int, default=64)
    args = parser.parse_args()
    if args.real:
        print("real vLLM replicas (CPU build), `vbs engine serve --replicas N`:")
        print(json.dumps({"bench": "replicas_real", "rows": real_replicas(args)}))
        return

    wave_s = args.ttft_s + args.tpot_s * (args.max_tokens - 1)
    print(f"double: TTFT {args.ttft_s * 1000:.0f} ms, TPOT {args.tpot_s * 1000:.0f} ms, "
          f"{args.max_seqs} sequences, {args.max_tokens} tokens per request: one replica's "
          f"limit {args.max_seqs / wave_s:.1f} req/s, "
          f"{args.max_seqs * args.max_tokens / wave_s:.0f} tok/s; chunks of {args.chunk}, "
          f"{len(os.sched_getaffinity(0))} cores")  # fmt: skip
    rows, one = [], None
    print(f"{'replicas':>8} {'requests':>9} {'seconds':>8} {'req/s':>8} {'tok/s':>9} "
          f"{'vs N x 1':>8} {'vs limit':>8} {'vbs cpu':>8} {'us/req':>8} {'rig cpu':>9} "
          f"{'bare/s':>9} {'vs bare':>8}  answered per replica")  # fmt: skip
    for n in [] if args.policies_only else args.replicas:
        fleet = Fleet(n, args, "round_robin")
        try:
            requests = args.waves * args.max_seqs * n
            others = fleet.cpu_seconds()
            seconds, cpu = dispatch(fleet.url, args, requests, session_header=False)
            others = fleet.cpu_seconds() - others
            answered = fleet.answered()
            bare = raw_dispatch(fleet.url, args, requests, n * args.max_seqs)
        finally:
            fleet.stop()
        rate = requests / seconds
        one = one if one is not None else rate / n
        limit = n * args.max_seqs / wave_s
        row = {"replicas": n, "requests": requests, "seconds": round(seconds, 2),
               "req_s": round(rate, 1), "tok_s": round(rate * args.max_tokens),
               "vs_n_x_one": round(rate / (n * one), 3), "vs_limit": round(rate / limit, 3),
               "answered": answered, "vbs_cpu_s": round(cpu, 2),
               "vbs_cpu_us_per_request": round(cpu / requests * 1e6),
               "double_and_router_cpu_s": round(others, 2),
               "bare_client_req_s": round(requests / bare, 1),
               "vs_bare_client": round(bare / seconds, 3)}  # fmt: skip
        rows.append(row)
        print(f"{n:>8} {requests:>9} {seconds:>8.2f} {rate:>8.1f} {row['tok_s']:>9} "
              f"{row['vs_n_x_one']:>8.3f} {row['vs_limit']:>8.3f} {cpu:>8.2f} "
              f"{cpu / requests * 1e6:>8.0f} {others:>9.2f} {requests / bare:>9.1f} "
              f"{bare / seconds:>8.3f}  {answered}")  # fmt: skip

    n = args.policy_replicas
    policies = []
    print(f"\nrouter policies, {n} replicas, one model's batch:")
    for policy, header in (
        ("round_robin", False),
        ("power_of_two", False),
        ("cache_aware", False),
        ("consistent_hash", False),
        ("consistent_hash", True),
    ):
        fleet = Fleet(n, args, policy)
        try:
            requests = args.waves * args.max_seqs * n
            seconds, _ = dispatch(fleet.url, args, requests, session_header=header)
            answered = fleet.answered()
        finally:
            fleet.stop()
        name = policy + (" (X-Session-ID: model)" if header else "")
        rate = requests / seconds
        policies.append({"policy": name, "req_s": round(rate, 1), "answered": answered,
                         "vs_limit": round(rate / (n * args.max_seqs / wave_s), 3)})  # fmt: skip
        print(f"  {name:38s} {rate:8.1f} req/s  vs limit {policies[-1]['vs_limit']:.3f}  "
              f"answered per replica {answered}")  # fmt: skip
    print(json.dumps({"bench": "replicas", "rows": rows, "policies": policies,
                      "target_vs_n_x_one": 0.9}))  # fmt: skip


if __name__ == "__main__":
    main()
