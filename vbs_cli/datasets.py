"""``vbs datasets build|list``: curated datasets. ``build`` launches ``curated_dataset`` for a
type through the running Dagster (as materializing it in the UI does) and prints the version it
built as one JSON line; ``list`` reads the catalog."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from vbs_resources import Settings, build_resources
from vbs_resources import layout as L
from vbs_resources.curation.datasets import failed_checks

FINISHED = {"SUCCESS", "FAILURE", "CANCELED"}


def add_commands(sub: Any) -> None:
    datasets = sub.add_parser("datasets", help="curated datasets: build a version, list them")
    datasets_sub = datasets.add_subparsers(dest="datasets_command", required=True)
    build = datasets_sub.add_parser(
        "build", help="build a type's dataset through Dagster (every type if --type is omitted)"
    )
    build.add_argument("--type", dest="type_id", help="the conquest type")
    build.add_argument("--min-rating", type=int, help="gold threshold (VBS_GOLD_MIN_RATING)")
    build.add_argument("--eval-fraction", type=float, help="(VBS_DATASET_EVAL_FRACTION)")
    build.add_argument(
        "--min-examples", type=int, help="the min_examples check's bar (VBS_DATASET_MIN_EXAMPLES)"
    )
    build.add_argument("--dagster-url", help="the Dagster webserver (VBS_DAGSTER_URL)")
    build.add_argument("--timeout", type=float, default=600, help="seconds to wait (600)")
    listing = datasets_sub.add_parser("list", help="dataset versions, the latest build first")
    listing.add_argument("--json", action="store_true", help="one JSON object per line (default)")
    listing.add_argument("--type", dest="type_id", help="one conquest type's")
    listing.add_argument("--limit", type=int, default=20)


def summary(row: dict[str, Any]) -> dict[str, Any]:
    """A dataset version as the one JSON line ``build`` and ``list`` print."""
    return {
        "version": row["version"],
        "type": row["type"],
        "type_version": row["type_version"],
        "train": row["train_count"],
        "eval": row["eval_count"],
        "icl": row["icl_count"],
        "path": row["path"],
        "run_id": row["run_id"],
        "checks_passed": not failed_checks(row),
    }


def _build(args: argparse.Namespace, settings: Settings, catalog: Any, type_id: str) -> int:
    from vbs_api.launch import BatchLauncher, LaunchFailed, LaunchUnavailable

    launcher = BatchLauncher(args.dagster_url or settings.resolved_dagster_url)
    chosen = (
        ("min_rating", args.min_rating),
        ("eval_fraction", args.eval_fraction),
        ("min_examples", args.min_examples),
    )
    config = {k: v for k, v in chosen if v is not None}
    run_config = {"ops": {L.CURATED_DATASET: {"config": config}}}
    try:
        run_id = launcher.launch(
            type_id, run_config, {}, job=L.DATASET_JOB, partitions=L.CONQUEST_TYPE_PARTITIONS
        )
        print(f"{type_id}: run {run_id} launched", file=sys.stderr)
        deadline = time.monotonic() + args.timeout
        status = launcher.run_status(run_id)
        while status not in FINISHED:
            if time.monotonic() > deadline:
                print(f"vbs: run {run_id} is still {status}", file=sys.stderr)
                return 1
            time.sleep(1)
            status = launcher.run_status(run_id)
    except (LaunchFailed, LaunchUnavailable) as exc:
        print(f"vbs: {exc}", file=sys.stderr)
        return 1
    # This run's own build (another build of the same data may have run alongside).
    build = catalog.datasets.build_of_run(run_id)
    row = catalog.datasets.get(build["version"]) if build else None
    line: dict[str, Any] = summary(row) if row else {"type": type_id}
    line = {**line, "run_id": run_id, "run_status": status}
    if build:
        line["checks"] = {name: check["passed"] for name, check in build["checks"].items()}
    print(json.dumps(line, ensure_ascii=False), flush=True)
    if status != "SUCCESS" or (build and not build["passed"]):
        if build and not build["passed"]:
            failed = failed_checks({"checks": build["checks"]})
            why = "blocking checks failed: " + "; ".join(failed)
        else:
            why = "the build failed"
        print(f"vbs: {type_id}: {why}; see run {run_id} in the Dagster UI", file=sys.stderr)
        return 1
    return 0


def _check_options(args: argparse.Namespace) -> str | None:
    """What is wrong with the build's options, before anything is launched."""
    if args.eval_fraction is not None and not 0 <= args.eval_fraction < 1:
        return f"--eval-fraction must be at least 0 and below 1, not {args.eval_fraction}"
    if args.min_rating is not None and not 1 <= args.min_rating <= 5:
        return f"--min-rating must be 1 to 5, not {args.min_rating}"
    if args.min_examples is not None and not 0 <= args.min_examples <= 1_000_000:
        return f"--min-examples must be 0 to 1000000, not {args.min_examples}"
    return None


def run(args: argparse.Namespace, settings: Settings) -> int:
    resources = build_resources(settings)
    catalog = resources["catalog"]
    if args.datasets_command == "list":
        for row in catalog.datasets.list(type_id=args.type_id, limit=args.limit):
            print(json.dumps(summary(row), ensure_ascii=False))
        return 0
    from vbs_resources.curation import ConquestTypeFileError

    problem = _check_options(args)
    if problem:
        print(f"vbs: {problem}", file=sys.stderr)
        return 2
    try:
        known = [t.id for t in resources["conquest_types"].registry().all()]
    except ConquestTypeFileError as exc:
        print(f"vbs: the conquest types do not load: {exc}", file=sys.stderr)
        return 2
    if args.type_id and args.type_id not in known:
        # Checked here: a launch would add a Dagster partition for any string.
        shown = ", ".join(known) or "none"
        print(f"vbs: unknown conquest type {args.type_id[:64]!r} (known: {shown})", file=sys.stderr)
        return 2
    types = [args.type_id] if args.type_id else known
    failed = 0
    for type_id in types:
        failed += _build(args, settings, catalog, type_id) != 0
    return 1 if failed else 0
