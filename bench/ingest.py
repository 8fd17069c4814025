"""Ingestion benchmark: validate a generated 200 MB, 50,000-line batch file into Parquet.

Runs the same code as the ``batch_input`` asset (streaming validation + Parquet writer) and
prints ``mb_per_s`` and ``peak_rss_mb`` (growth of the peak RSS over the process before the
run). Targets: >= 50 MB/s, peak RSS growth < 300 MB. Ends with one JSON line.
"""

import json
import resource
import sys
import tempfile
import time
from pathlib import Path

from vbs_assets.ingest import ingest_batch_file
from vbs_assets.validation import Limits
from vbs_resources import Bucket

LINES = 50_000
TARGET_BYTES = 200 * 1024 * 1024 - 64 * 1024  # just under OpenAI's 200 MB limit


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def generate(path: Path) -> int:
    per_line = TARGET_BYTES // LINES
    skeleton = {
        "custom_id": "",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": "SmolLM2-135M-Instruct",
            "messages": [
                {"role": "system", "content": "You are a careful assistant."},
                {"role": "user", "content": ""},
            ],
            "max_tokens": 64,
            "temperature": 0.2,
        },
    }
    filler = "lorem ipsum dolor sit amet " * (per_line // 27 + 1)
    with open(path, "w") as fh:
        for i in range(LINES):
            skeleton["custom_id"] = f"request-{i:06d}"
            base = len(json.dumps(skeleton))
            skeleton["body"]["messages"][1]["content"] = filler[: max(0, per_line - base - 1)]
            fh.write(json.dumps(skeleton) + "\n")
            skeleton["body"]["messages"][1]["content"] = ""
    return path.stat().st_size


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        bucket = Bucket(url=tmp)
        batch_id = "batch_benchingest0001"
        source = Path(bucket.path(f"batches/{batch_id}/input.jsonl"))
        source.parent.mkdir(parents=True)
        size = generate(source)
        before = rss_mb()
        started = time.perf_counter()
        report = ingest_batch_file(bucket, batch_id, Limits())
        seconds = time.perf_counter() - started
        peak_growth = rss_mb() - before
        assert report.ok and report.request_count == LINES, report.errors[:3]
        parquet_mb = Path(bucket.path(f"batches/{batch_id}/requests.parquet")).stat().st_size / 1e6
    result = {
        "bench": "ingest",
        "lines": LINES,
        "mb": round(size / 1e6, 1),
        "seconds": round(seconds, 2),
        "mb_per_s": round(size / 1e6 / seconds, 1),
        "peak_rss_mb": round(peak_growth, 1),
        "parquet_mb": round(parquet_mb, 1),
        "target_mb_per_s": 50,
        "target_peak_rss_mb": 300,
    }
    print(f"validated {size / 1e6:.0f} MB in {seconds:.1f}s", file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
