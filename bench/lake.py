"""Results lake benchmark: what ``results.parquet`` costs a batch that ends, and what reading
the lake costs.

Generates the final files of a 50,000-line chat batch (about 2 % error lines, answers of about
600 characters, as ``batch_output`` writes them), then times, in one run:

- ``write_results``: DuckDB reads output.jsonl and errors.jsonl into results.parquet (this runs
  once per batch, when it ends);
- ``batch_answers`` joined with requests.parquet, as the ``conquests`` asset reads them;
- a grouped query over the ``results`` view (tokens per model per day), as ``vbs query`` runs it.

Prints the lines per second of each and the peak RSS growth; ends with one JSON line.
"""

import json
import resource
import sys
import tempfile
import time

import pyarrow as pa
import pyarrow.parquet as pq

from vbs_resources import Bucket, Catalog
from vbs_resources import layout as L
from vbs_resources.lake import batch_answers, open_lake, write_results

LINES = 50_000
BATCH = "batch_benchlake0001"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def generate(bucket: Bucket) -> int:
    answer = "Thanks for writing in! " * 26
    out, err, requests = [], [], []
    for n in range(LINES):
        custom_id = f"req-{n:06d}"
        body = {"model": "SmolLM2-135M-Instruct", "max_tokens": 64,
                "messages": [{"role": "user", "content": f"Ticket {n}: where is my order?"}]}  # fmt: skip
        requests.append({"custom_id": custom_id, "body": json.dumps(body)})
        if n % 50 == 0:
            error = {"code": "context_length_exceeded", "message": "too long", "param": "messages"}
            line = {"id": f"l{n}", "custom_id": custom_id, "response": {
                "status_code": 400, "request_id": f"r{n}", "body": {"error": error}}, "error": None}  # fmt: skip
            err.append(json.dumps(line))
            continue
        choice = {"index": 0, "message": {"role": "assistant", "content": f"{answer}#{n}"},
                  "finish_reason": "stop"}  # fmt: skip
        usage = {"prompt_tokens": 40, "completion_tokens": 64, "total_tokens": 104}
        response = {"id": f"c{n}", "object": "chat.completion", "created": 1764000000 + n,
                    "model": "SmolLM2-135M-Instruct", "choices": [choice], "usage": usage}  # fmt: skip
        line = {"id": f"l{n}", "custom_id": custom_id,
                "response": {"status_code": 200, "request_id": f"r{n}", "body": response},
                "error": None}  # fmt: skip
        out.append(json.dumps(line))
    bucket.write_bytes(L.batch_file(BATCH, L.OUTPUT), ("\n".join(out) + "\n").encode())
    bucket.write_bytes(L.batch_file(BATCH, L.ERRORS), ("\n".join(err) + "\n").encode())
    with bucket.open(L.batch_file(BATCH, L.REQUESTS), "wb") as fh:
        pq.write_table(pa.Table.from_pylist(requests), fh)
    return bucket.size(L.batch_file(BATCH, L.OUTPUT)) + bucket.size(L.batch_file(BATCH, L.ERRORS))


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        bucket = Bucket(url=f"{tmp}/bucket")
        catalog = Catalog(url=f"sqlite:///{tmp}/catalog.db")
        size = generate(bucket)
        base = rss_mb()

        started = time.perf_counter()
        rows = write_results(bucket, BATCH)
        write_s = time.perf_counter() - started
        write_rss = rss_mb() - base

        started = time.perf_counter()
        answers = sum(1 for _ in batch_answers(bucket, BATCH))
        read_s = time.perf_counter() - started

        lake = open_lake(bucket, catalog)
        started = time.perf_counter()
        per_day = lake.sql(
            "SELECT model, date_trunc('day', created_at) AS day, sum(completion_tokens) "
            "FROM results GROUP BY ALL"
        ).fetchall()
        query_s = time.perf_counter() - started
        figures = {
            "lines": rows,
            "jsonl_mb": round(size / 1e6, 1),
            "parquet_mb": round(bucket.size(L.batch_file(BATCH, L.RESULTS)) / 1e6, 2),
            "write_lines_per_s": round(rows / write_s),
            "write_s": round(write_s, 2),
            "write_peak_rss_mb": round(write_rss, 1),
            "conquest_read_lines_per_s": round(answers / read_s),
            "query_ms": round(query_s * 1000, 1),
            "query_rows": len(per_day),
        }
    print(f"results.parquet: {rows} lines ({figures['jsonl_mb']} MB of JSONL) in "
          f"{figures['write_s']} s, peak RSS +{figures['write_peak_rss_mb']} MB", file=sys.stderr)  # fmt: skip
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
