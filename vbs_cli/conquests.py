"""``vbs conquests types``: the conquest types this deployment knows, checked as they load."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from vbs_resources import Settings
from vbs_resources.curation import ConquestTypeFileError, TaskRegistry, load_type_file
from vbs_resources.curation.registry import SHIPPED


def add_commands(sub: Any) -> None:
    conquests = sub.add_parser("conquests", help="conquest types and curated conquests")
    conquests_sub = conquests.add_subparsers(dest="conquests_command", required=True)
    types = conquests_sub.add_parser(
        "types", help="list the conquest types (checking each file), or check one file"
    )
    types.add_argument(
        "path", nargs="?", help="a type file or folder (VBS_CONQUEST_TYPES_DIR if omitted)"
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
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
