"""The production set-up against the embedded defaults, in one run on one machine: PostgreSQL
(catalog and Dagster storage) and an S3 bucket (moto's server mode) against SQLite and a local
folder.

For each: `vbs serve` is started on the set-up, and three 4-request batches are created one
after the other through the API with the official client; the seconds from ``batches.create``
to ``in_progress`` and to ``completed`` are printed for each (the first includes the first
run's start). Then the ingest (the ``batch_input`` asset's streaming validation into Parquet)
of a generated 100 MB, 25,000-line file, read from and written to each bucket: MB/s. The
servers are the test suite's own (tests/postgres.py, tests/s3.py; `make test` installs them).
Prints a table and one JSON line.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ingest import generate  # noqa: E402
from tests.conftest import chat_line, free_port, jsonl, start_platform  # noqa: E402
from tests.postgres import PostgresServer  # noqa: E402
from tests.s3 import S3Server  # noqa: E402
from vbs_assets.ingest import ingest_batch_file  # noqa: E402
from vbs_assets.validation import Limits  # noqa: E402
from vbs_resources import Bucket, build_resources, load_settings  # noqa: E402

BATCHES = 3
INGEST_LINES = 25_000


def batch_times(home: Path, model: Path, env: dict[str, str]) -> list[dict[str, float]]:
    from openai import OpenAI

    home.mkdir(parents=True, exist_ok=True)
    process = start_platform(home, model, **env)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{process.api_port}/v1", api_key="none")
        catalog = build_resources(load_settings({**env, "VBS_HOME": str(home)}))["catalog"]
        times = []
        for n in range(BATCHES):
            lines = [chat_line(f"b{n}-{i}", f"Name {i} colour.", max_tokens=8) for i in range(4)]
            upload = client.files.create(file=(f"b{n}.jsonl", jsonl(lines)), purpose="batch")
            started = time.monotonic()
            batch = client.batches.create(
                input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
            seen: dict[str, float] = {}
            while "completed" not in seen:
                status = catalog.batches.get(batch.id)["status"]
                seen.setdefault(status, time.monotonic() - started)
                if status in ("failed", "cancelled", "expired"):
                    raise RuntimeError(f"{batch.id} ended {status}")
                time.sleep(0.05)
            times.append({"in_progress_s": seen.get("in_progress", seen["completed"]),
                          "completed_s": seen["completed"]})  # fmt: skip
        return times
    finally:
        process.stop()


def ingest_mb_per_s(url: str, source: Path) -> float:
    bucket = Bucket(url=url)
    batch_id = f"batch_bench{os.urandom(6).hex()}"
    with open(source, "rb") as fh, bucket.atomic_writer(f"batches/{batch_id}/input.jsonl") as out:
        while data := fh.read(8 << 20):
            out.write(data)
    started = time.perf_counter()
    report = ingest_batch_file(bucket, batch_id, Limits())
    seconds = time.perf_counter() - started
    assert report.ok and report.request_count == INGEST_LINES, report.errors[:3]
    return source.stat().st_size / 1e6 / seconds


def main() -> None:
    import bench.ingest as ingest_bench

    model = Path(os.environ.get("VBS_MODEL", ROOT / ".vbs" / "models" / "SmolLM2-135M-Instruct"))
    work = Path(tempfile.mkdtemp(prefix="vbs-bench-production-"))
    postgres = PostgresServer(free_port())
    s3 = S3Server(free_port(), work / "moto.log")
    os.environ.update(s3.env)
    try:
        setups = {
            "sqlite+folder": {},
            "postgres+s3": {
                "VBS_CATALOG_URL": postgres.database("catalog"),
                "VBS_DAGSTER_STORAGE_URL": postgres.database("dagster"),
                "VBS_BUCKET_URL": s3.bucket_url(),
            },
        }
        ingest_bench.LINES, ingest_bench.TARGET_BYTES = INGEST_LINES, 100 * 1024 * 1024
        source = work / "ingest.jsonl"
        generate(source)
        results = {}
        for name, env in setups.items():
            times = batch_times(work / name / "vbs", model, env)
            url = env.get("VBS_BUCKET_URL", str(work / name / "ingest-bucket"))
            results[name] = {"batches": times, "ingest_mb_per_s": ingest_mb_per_s(url, source)}
    finally:
        postgres.stop()
        s3.stop()
    print(f"{'set-up':<15} {'batch':>5} {'to in_progress s':>17} {'to completed s':>15}")
    for name, result in results.items():
        for n, t in enumerate(result["batches"]):
            print(f"{name:<15} {n + 1:>5} {t['in_progress_s']:>17.2f} {t['completed_s']:>15.2f}")
    for name, result in results.items():
        print(f"{name:<15} ingest {result['ingest_mb_per_s']:.1f} MB/s")
    print(json.dumps({"bench": "production", "results": results}))


if __name__ == "__main__":
    main()
