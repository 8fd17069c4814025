"""``vbs submit`` / ``vbs batches`` / ``vbs results`` / ``vbs inbox``: the Batch API through the
official openai client."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from vbs_resources import Settings
from vbs_resources.wire import TERMINAL_STATUSES

COMMANDS = ("submit", "batches", "results", "inbox", "webhooks")


def openai_client(args: argparse.Namespace, settings: Settings) -> Any:
    """The official openai client, on the API of ``--api-url`` or ``VBS_API_URL``."""
    from openai import OpenAI

    key = settings.client_api_key or "none"
    return OpenAI(base_url=args.api_url or settings.api_url, api_key=key, max_retries=2)


def add_commands(sub: Any) -> None:
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
    inbox = sub.add_parser("inbox", help="files in the inbox that cannot be taken, and why")
    hooks = sub.add_parser("webhooks", help="webhook events: pending, delivered, given up")
    hooks.add_argument(
        "--status", choices=("pending", "delivered", "given_up"), help="only these events"
    )
    hooks.add_argument("--limit", type=int, default=50)
    hooks.add_argument("--redeliver", metavar="EVENT_ID", help="send one again (not delivered)")
    for parser in (batches, inbox, hooks):
        add_json(parser)
    for parser in (submit, batches, results, inbox, hooks):
        add_api_url(parser)


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="one JSON object per line")


def print_json(value: Any) -> None:
    """One JSON line of an API object (an openai type or a plain dict)."""
    found = value.model_dump() if hasattr(value, "model_dump") else value
    print(json.dumps(found, ensure_ascii=False, default=str), flush=True)


def add_api_url(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api-url", help="the API's /v1 URL (VBS_API_URL)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    client = openai_client(args, settings)
    if args.command == "batches":
        for b in client.batches.list(limit=args.limit).data:
            if args.json:
                print_json(b)
                continue
            counts = b.request_counts
            done = f"{counts.completed + counts.failed}/{counts.total}" if counts else "-"
            print(f"{b.id}  {b.status:<11}  {done:>11}  {b.endpoint}")
        return 0
    if args.command == "inbox":
        problems = client.get("/inbox", cast_to=object)["data"]
        for problem in problems:
            if args.json:
                print_json(problem)
            else:
                print(f"{problem['name']}: {problem['message']}")
        if not problems and not args.json:
            print("the inbox has no problems")
        return 1 if problems else 0
    if args.command == "webhooks":
        return _webhooks(client, args)
    if args.command == "results":
        batch = client.batches.retrieve(args.batch_id)
        file_id = batch.error_file_id if args.errors else batch.output_file_id
        if file_id is None:
            print(f"{batch.id} is {batch.status}: no results yet", file=sys.stderr)
            return 1
        sys.stdout.write(client.files.content(file_id).text)
        return 0
    try:
        metadata = dict(pair.split("=", 1) for pair in args.metadata)
    except ValueError:
        print("vbs: --metadata takes KEY=VALUE", file=sys.stderr)
        return 2
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
    return 0 if wait_for(client, batch.id) == "completed" else 1


def _webhooks(client: Any, args: argparse.Namespace) -> int:
    from urllib.parse import quote

    if args.redeliver:
        again = client.post(
            f"/webhooks/events/{quote(args.redeliver, safe='')}/redeliver", body={}, cast_to=object
        )
        print_json(again)
        return 0
    params = {"limit": args.limit, **({"status": args.status} if args.status else {})}
    events = client.get("/webhooks/events", options={"params": params}, cast_to=object)["data"]
    for event in events:
        if args.json:
            print_json(event)
            continue
        why = (
            f"  {event['last_error']}"
            if event["last_error"] and event["status"] != "delivered"
            else ""
        )
        print(f"{event['id']}  {event['status']:<9}  {event['type']:<26}  {event['subject_id']}"
              f"  rounds {event['rounds']}{why}")  # fmt: skip
    return 0


def wait_for(client: Any, batch_id: str) -> str:
    """Show a batch's progress until it ends; its last status."""
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
        if batch.status in TERMINAL_STATUSES:
            bar.close()
            print(f"{batch_id} {batch.status}", file=sys.stderr)
            for error in (batch.errors.data if batch.errors else [])[:10]:
                where = f"line {error.line}: " if error.line else ""
                print(f"  {where}{error.code}: {error.message}", file=sys.stderr)
            return batch.status
        time.sleep(1)
