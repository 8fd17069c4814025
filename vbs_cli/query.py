"""``vbs query "SQL"``: DuckDB over the results lake (``results``, ``conquests``,
``annotations``), printed as a table, JSON lines or CSV."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vbs_resources import Settings, build_resources


def add_commands(sub: Any) -> None:
    query = sub.add_parser(
        "query", help="run DuckDB SQL over the lake's views: results, conquests, annotations"
    )
    query.add_argument("sql", help='e.g. "SELECT model, sum(completion_tokens) FROM results '
                       'GROUP BY model"')  # fmt: skip
    query.add_argument("--format", choices=("table", "json", "csv"), default="table")
    query.add_argument("--max-rows", type=int, default=100, help="rows a table shows (100)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    import duckdb
    import polars as pl

    from vbs_resources.lake import open_lake

    resources = build_resources(settings)
    lake = open_lake(resources["bucket"], resources["catalog"])
    try:
        relation = lake.sql(args.sql)
        if relation is None:  # a statement with no rows to show
            return 0
        frame = relation.pl()
    except duckdb.Error as exc:
        print(f"vbs query: {exc}", file=sys.stderr)
        return 2
    finally:
        lake.close()
    if args.format == "json":
        sys.stdout.write(frame.write_ndjson())
    elif args.format == "csv":
        sys.stdout.write(frame.write_csv())
    else:
        with pl.Config(
            tbl_rows=args.max_rows, tbl_cols=-1, fmt_str_lengths=80, tbl_width_chars=200
        ):
            print(frame)
    return 0
