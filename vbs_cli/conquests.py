"""``vbs conquests types|submit``: the conquest types this deployment knows (checked as they
load), and records of a type sent as a batch through the Batch API."""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path
from typing import Any

from vbs_cli.client import add_api_url, openai_client, print_json, wait_for
from vbs_resources import Settings
from vbs_resources import layout as L
from vbs_resources.curation import (
    ConquestTypeFileError,
    ConquestTypes,
    TaskRegistry,
    load_type_file,
)
from vbs_resources.curation.records import check_records
from vbs_resources.curation.registry import SHIPPED

# Errors shown for a refused records file (all are counted).
SHOWN_ERRORS = 20


def add_commands(sub: Any) -> None:
    conquests = sub.add_parser("conquests", help="conquest types and curated conquests")
    conquests_sub = conquests.add_subparsers(dest="conquests_command", required=True)
    types = conquests_sub.add_parser(
        "types", help="list the conquest types (checking each file), or check one file"
    )
    types.add_argument(
        "path", nargs="?", help="a type file or folder (VBS_CONQUEST_TYPES_DIR if omitted)"
    )
    types.add_argument("--json", action="store_true", help="one JSON object per line (default)")
    for name, text in (
        ("exclude", "keep a conquest out of every dataset and of Label Studio"),
        ("include", "take an excluded conquest back"),
    ):
        change = conquests_sub.add_parser(name, help=text)
        change.add_argument("conquest_id")
        if name == "exclude":
            change.add_argument("--reason", required=True, help="why (kept in its history)")
        add_api_url(change)
    submit = conquests_sub.add_parser(
        "submit", help="check records of a type, render their prompts and create a batch"
    )
    submit.add_argument("type", help="the conquest type's id")
    submit.add_argument("records", type=Path, help="JSONL, one record per line")
    submit.add_argument("--model", help="the model to answer (the base model if omitted)")
    submit.add_argument("--max-tokens", type=int, default=512, help="per answer (512)")
    submit.add_argument("--temperature", type=float, help="sampling temperature (the model's)")
    submit.add_argument("--wait", action="store_true", help="show progress until it ends")
    add_api_url(submit)


def _submit(args: argparse.Namespace, settings: Settings) -> int:
    try:
        conquest_type = (
            ConquestTypes(
                folder=str(settings.conquest_types_dir) if settings.conquest_types_dir else None
            )
            .registry()
            .get(args.type)
        )
    except (ConquestTypeFileError, KeyError) as exc:
        print(f"vbs: {exc.args[0]}", file=sys.stderr)
        return 2
    try:
        with open(args.records, "rb") as fh:
            good, errors = check_records(conquest_type, fh)
    except OSError as exc:
        print(f"vbs: {args.records}: {exc.strerror}", file=sys.stderr)
        return 2
    if errors or not good:
        problem = f"{len(errors)} bad record(s)" if errors else "no records"
        print(f"vbs: {args.records}: {problem}; nothing was submitted", file=sys.stderr)
        for message in errors[:SHOWN_ERRORS]:
            print(f"  {message}", file=sys.stderr)
        if len(errors) > SHOWN_ERRORS:
            print(f"  ... and {len(errors) - SHOWN_ERRORS} more", file=sys.stderr)
        return 2
    sampling: dict[str, Any] = {"max_tokens": args.max_tokens}
    if args.temperature is not None:
        sampling["temperature"] = args.temperature
    model = args.model or settings.served_model_name
    batch_lines, record_lines = io.BytesIO(), io.BytesIO()
    for custom_id, data, _ in good:
        body = {"model": model, "messages": conquest_type.prompt(data), **sampling}
        line = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions"}
        batch_lines.write(json.dumps({**line, "body": body}, ensure_ascii=False).encode() + b"\n")
        record = {"custom_id": custom_id, **data}
        record_lines.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")
    client = openai_client(args, settings)
    stem = args.records.stem
    batch_file = client.files.create(
        file=(f"{stem}.{conquest_type.id}.jsonl", batch_lines.getvalue()), purpose="batch"
    )
    records_file = client.files.create(
        file=(f"{stem}.records.jsonl", record_lines.getvalue()), purpose="user_data"
    )
    batch = client.batches.create(
        input_file_id=batch_file.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={
            L.META_CONQUEST_TYPE: conquest_type.id,
            L.META_CONQUEST_TYPE_VERSION: conquest_type.version,
            L.META_CONQUEST_RECORDS: records_file.id,
        },
    )
    print(batch.id, flush=True)
    if not args.wait:
        return 0
    return 0 if wait_for(client, batch.id) == "completed" else 1


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.conquests_command == "submit":
        return _submit(args, settings)
    if args.conquests_command in ("exclude", "include"):
        from urllib.parse import quote

        client = openai_client(args, settings)
        body = {"reason": args.reason} if args.conquests_command == "exclude" else {}
        path = f"/conquests/{quote(args.conquest_id, safe='')}/{args.conquests_command}"
        print_json(client.post(path, body=body, cast_to=object))
        return 0
    path = Path(args.path or settings.conquest_types_dir or SHIPPED)
    try:
        if path.is_dir():
            loaded = TaskRegistry().load_folder(path)
        else:
            loaded = [load_type_file(path)]
    except (ConquestTypeFileError, OSError) as exc:
        print(f"vbs: {exc}", file=sys.stderr)
        return 2
    for conquest_type in loaded:
        summary = {
            "id": conquest_type.id,
            "name": conquest_type.name,
            "version": conquest_type.version,
            "dataSources": [s.id for s in conquest_type.data_sources],
            "questions": [q.id for q in conquest_type.questions],
        }
        print(json.dumps(summary, ensure_ascii=False))
    return 0
