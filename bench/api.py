"""Batch API benchmark against a fresh `vbs serve` (Dagster daemon + API, embedded defaults).

1. Seconds from ``batches.create`` to ``in_progress`` and to ``completed`` for a 4-request chat
   batch (target: under 5 s to ``in_progress``).
2. p50/p99 latency of ``batches.retrieve`` under 50 concurrent clients for 20 s (target p99 <
   50 ms), with the official async client.
Ends with one JSON line.
"""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from openai import AsyncOpenAI, OpenAI

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(url, timeout=2).status == 200:
                return
        except OSError:
            time.sleep(0.5)
    sys.exit(f"{url} did not come up")


async def retrieve_load(base_url: str, batch_id: str, clients: int, seconds: float) -> list[float]:
    client = AsyncOpenAI(base_url=base_url, api_key=KEY, max_retries=0)
    latencies: list[float] = []
    stop = time.monotonic() + seconds

    async def worker() -> None:
        while time.monotonic() < stop:
            started = time.perf_counter()
            await client.batches.retrieve(batch_id)
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(worker() for _ in range(clients)))
    await client.close()
    return latencies


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "vbs"
        port, api_port = free_port(), free_port()
        model = ROOT / ".vbs/models/SmolLM2-135M-Instruct"
        env = dict(os.environ, VBS_HOME=str(home), VBS_MODEL=str(model), VBS_API_KEYS=KEY)
        command = [sys.executable, "-m", "vbs_cli.main", "serve", "--port", str(port)]
        command += ["--api-port", str(api_port)]
        log = open(Path(tmp) / "serve.log", "wb")
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=log, start_new_session=True)
        try:
            wait_http(f"http://127.0.0.1:{port}/server_info", 120)
            wait_http(f"http://127.0.0.1:{api_port}/health", 60)
            base_url = f"http://127.0.0.1:{api_port}/v1"
            client = OpenAI(base_url=base_url, api_key=KEY)
            lines = [
                {
                    "custom_id": f"r{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": {
                        "model": "SmolLM2-135M-Instruct",
                        "messages": [{"role": "user", "content": f"Say hello {i}."}],
                        "max_tokens": 16,
                    },
                }
                for i in range(4)
            ]
            data = "".join(json.dumps(x) + "\n" for x in lines).encode()
            file = client.files.create(file=("bench.jsonl", data), purpose="batch")
            started = time.perf_counter()
            batch = client.batches.create(
                input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            to_in_progress = to_completed = None
            while to_completed is None and time.perf_counter() - started < 300:
                status = client.batches.retrieve(batch.id).status
                elapsed = time.perf_counter() - started
                if status in ("in_progress", "finalizing", "completed") and to_in_progress is None:
                    to_in_progress = elapsed
                if status in ("completed", "failed", "cancelled", "expired"):
                    to_completed = elapsed
                    break
                time.sleep(0.1)
            latencies = sorted(asyncio.run(retrieve_load(base_url, batch.id, 50, 20.0)))
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)

    def pct(p: float) -> float:
        return round(1000 * latencies[min(len(latencies) - 1, int(p * len(latencies)))], 1)

    print(
        json.dumps(
            {
                "bench": "api",
                "create_to_in_progress_s": round(to_in_progress or -1, 2),
                "create_to_completed_s": round(to_completed or -1, 2),
                "retrieve_requests": len(latencies),
                "retrieve_rps": round(len(latencies) / 20.0, 1),
                "retrieve_p50_ms": pct(0.50),
                "retrieve_p99_ms": pct(0.99),
                "target_in_progress_s": 5,
                "target_p99_ms": 50,
            }
        )
    )


if __name__ == "__main__":
    main()
