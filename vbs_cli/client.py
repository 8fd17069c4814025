"""``vbs submit`` / ``vbs batches`` / ``vbs results``: the Batch API through the openai client."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

TERMINAL = {"completed", "failed", "expired", "cancelled"}


def _client(args: argparse.Namespace) -> Any:
    from openai import OpenAI

    key = os.environ.get("VBS_API_KEY") or "none"
    return OpenAI(base_url=args.api_url, api_key=key, max_retries=2)


def add_commands(sub: Any) -> None:
    default_url = os.environ.get("VBS_API_URL", "http://127.0.0.1:8000/v1")
    submit = sub.add_parser("submit", help="upload a batch file and create a batch")
    submit.add_argument("file", type=Path)
    submit.add_argument("--endpoint", default="/v1/chat/completions")
    submit.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    submit.add_argument("--wait", action="store_true", help="show progress until it ends")
    batches = sub.add_parser("batches", help="list batches, newest first")
    batches.add_argument("--limit", type=int, default=20)
    results = sub.add_parser("results", help="print a batch's output (and errors) JSONL")
    results.add_argument("batch_id")
    results.add_argument("--errors", action="store_true", help="print the error file instead")
    for parser in (submit, batches, results):
        parser.add_argument("--api-url", default=default_url)


def run(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.command == "batches":
        for b in client.batches.list(limit=args.limit).data:
            counts = b.request_counts
            done = f"{counts.completed + counts.failed}/{counts.total}" if counts else "-"
            print(f"{b.id}  {b.status:<11}  {done:>11}  {b.endpoint}")
        return 0
    if args.command == "results":
        batch = client.batches.retrieve(args.batch_id)
        file_id = batch.error_file_id if args.errors else batch.output_file_id
        if file_id is None:
            print(f"{batch.id} is {batch.status}: no results yet", file=sys.stderr)
            return 1
        sys.stdout.write(client.files.content(file_id).text)
        return 0
    metadata = dict(pair.split("=", 1) for pair in args.metadata)
    with open(args.file, "rb") as fh:
        uploaded = client.files.create(file=(args.file.name, fh), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint=args.endpoint,
        completion_window="24h",
        metadata=metadata or None,
    )
    print(batch.id, flush=True)
    if not args.wait:
        return 0
    return 0 if _wait(client, batch.id) == "completed" else 1


def _wait(client: Any, batch_id: str) -> str:
    from tqdm import tqdm

    bar = tqdm(total=None, unit="req", desc=batch_id[:18], file=sys.stderr)
    while True:
        batch = client.batches.retrieve(batch_id)
        counts = batch.request_counts
        if counts and counts.total:
            bar.total = counts.total
            bar.n = counts.completed + counts.failed
        bar.set_postfix_str(batch.status)
        bar.refresh()
        if batch.status in TERMINAL:
            bar.close()
            print(f"{batch_id} {batch.status}", file=sys.stderr)
            for error in (batch.errors.data if batch.errors else [])[:10]:
                print(f"  line {error.line}: {error.code}: {error.message}", file=sys.stderr)
            return batch.status
        time.sleep(1)
