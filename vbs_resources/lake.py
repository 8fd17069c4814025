"""The results lake: analytics over what batches produced, with DuckDB and Polars.

Every batch that ends with results gets ``batches/<id>/results.parquet``: one row per output or
error line, flat (custom_id, model, status, finish reason, token counts, the answer's text, the
error). Conquests are made from it (DuckDB, joined with ``requests.parquet``); the dataset
builder reads the catalog's gold conquests with Polars; ``vbs query`` reads all of it through
one DuckDB connection whose views are:

- ``results``: every batch's ``results.parquet``;
- ``conquests`` and ``annotations``: the catalog's tables (the newest edit of each conquest's
  curation), read when the connection is made. The catalog stays the one place they are written:
  DuckDB allows one writer process per file, and the catalog has many.

DuckDB and Polars are imported inside the functions that use them: Dagster loads this module on
every sensor tick.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq
import sqlalchemy as sa

from vbs_resources import layout as L
from vbs_resources.bucket import Bucket
from vbs_resources.catalog import Catalog, annotations, conquests

if TYPE_CHECKING:
    import duckdb
    import polars as pl

log = logging.getLogger("vbs.lake")

# results.parquet, one row per output or error line. Named for what people ask of it.
RESULT_COLUMNS = {
    "batch_id": "VARCHAR",
    "custom_id": "VARCHAR",
    "request_id": "VARCHAR",
    "model": "VARCHAR",
    "object": "VARCHAR",  # chat.completion, text_completion, list (embeddings), ...
    "status": "VARCHAR",  # completed or failed
    "status_code": "INTEGER",
    "finish_reason": "VARCHAR",
    "prompt_tokens": "BIGINT",
    "completion_tokens": "BIGINT",
    "total_tokens": "BIGINT",
    "text": "VARCHAR",  # the first choice's answer; none for embeddings and errors
    "error_code": "VARCHAR",
    "error_message": "VARCHAR",
    "error_param": "VARCHAR",
    "created_at": "TIMESTAMP WITH TIME ZONE",  # the answer's, or the batch's end
}

# Rows written to results.parquet at once, so that writing it holds the same memory whatever
# the batch's size. (DuckDB's JSON file reader, used before, held most of the file: +151 MB of
# peak RSS for a 50,000-line output, +233 MB for 200,000 lines; this writer +63 MB for both.)
_ROWS_PER_GROUP = 4096
_INT32 = 2**31
_INT64 = 2**63
_EMPTY: dict[str, Any] = {}


def _text(value: Any) -> str | None:
    """A JSON value as text, as SQL's ``->>`` gives it: a string as it is, anything else as
    JSON, a null as None."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _integer(value: Any, limit: int) -> int | None:
    """A JSON integer in [-limit, limit); anything else (text, a float, too large) is None."""
    if type(value) is int and -limit <= value < limit:
        return value
    return None


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else _EMPTY


def _first_of(value: Any) -> dict[str, Any]:
    return _object(value[0]) if isinstance(value, list) and value else _EMPTY


def _timestamp(value: Any, default: dt.datetime) -> dt.datetime:
    """A Unix time as a UTC datetime; ``default`` when it is none, or not one."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return dt.datetime.fromtimestamp(value, dt.UTC)
        except (OverflowError, OSError, ValueError):
            pass
    return default


def result_row(batch_id: str, line: dict[str, Any], ended_at: dt.datetime) -> dict[str, Any]:
    """One output or error line as a row of ``results.parquet``; ``ended_at`` is the batch's
    end, the row's time when its answer has none."""
    response = _object(line.get("response"))
    error = line.get("error")
    body = _object(response.get("body"))
    choice = _first_of(body.get("choices"))
    usage = _object(body.get("usage"))
    body_error = body.get("error")  # a null one (a pass-through server's) is no error
    failure = _object(body_error) or _object(error)
    status_code = _integer(response.get("status_code"), _INT32)
    completed = status_code is not None and 200 <= status_code < 300
    text = _object(choice.get("message")).get("content")
    return {
        "batch_id": batch_id,
        "custom_id": _text(line.get("custom_id")),
        "request_id": _text(response.get("request_id")),
        "model": _text(body.get("model")),
        "object": _text(body.get("object")),
        "status": "completed" if completed and error is None and body_error is None else "failed",
        "status_code": status_code,
        "finish_reason": _text(choice.get("finish_reason")),
        "prompt_tokens": _integer(usage.get("prompt_tokens"), _INT64),
        "completion_tokens": _integer(usage.get("completion_tokens"), _INT64),
        "total_tokens": _integer(usage.get("total_tokens"), _INT64),
        "text": _text(choice.get("text") if text is None else text),
        "error_code": _text(failure.get("code")),
        "error_message": _text(failure.get("message")),
        "error_param": _text(failure.get("param")),
        "created_at": _timestamp(body.get("created"), ended_at),
    }


def results_schema() -> pa.Schema:
    """``RESULT_COLUMNS`` as Arrow types (what DuckDB reads back as those SQL types)."""
    types = {
        "VARCHAR": pa.string(),
        "INTEGER": pa.int32(),
        "BIGINT": pa.int64(),
        "TIMESTAMP WITH TIME ZONE": pa.timestamp("us", tz="UTC"),
    }
    return pa.schema([(name, types[kind]) for name, kind in RESULT_COLUMNS.items()])


def connect() -> duckdb.DuckDBPyConnection:
    """A fresh in-memory DuckDB connection (UTC, so timestamps read the same everywhere)."""
    import duckdb

    con = duckdb.connect(":memory:")
    con.execute("SET TimeZone = 'UTC'")
    return con


def _uri(con: duckdb.DuckDBPyConnection, bucket: Bucket, rel: str) -> str:
    """Where DuckDB finds ``rel``: a local path, or the bucket's fsspec filesystem, registered
    with DuckDB for object stores."""
    if not bucket.is_local:
        protocol = bucket.fs.protocol
        protocol = protocol[0] if isinstance(protocol, tuple | list) else protocol
        if not con.filesystem_is_registered(protocol):
            con.register_filesystem(bucket.fs)
    return bucket.uri(rel)


def results_path(batch_id: str) -> str:
    return L.batch_file(batch_id, L.RESULTS)


def write_results(bucket: Bucket, batch_id: str, ended_at: float | None = None) -> int | None:
    """Write ``results.parquet`` from the batch's final output and error files (replacing one
    written before: it is derived, never edited); the rows written, or None for a batch with no
    result files. A line at a time in, ``_ROWS_PER_GROUP`` rows at a time out."""
    paths = [L.batch_file(batch_id, n) for n in (L.OUTPUT, L.ERRORS)]
    paths = [p for p in paths if bucket.exists(p)]
    if not paths:
        return None
    ended = dt.datetime.fromtimestamp(ended_at or time.time(), dt.UTC)
    schema = results_schema()
    rows: list[dict[str, Any]] = []
    written = 0
    with (
        bucket.atomic_writer(results_path(batch_id)) as fh,
        pq.ParquetWriter(fh, schema, compression="zstd") as writer,
    ):
        for path in paths:
            with bucket.open(path, "rb") as lines:
                for raw in lines:
                    if not raw.strip():
                        continue
                    rows.append(result_row(batch_id, json.loads(raw), ended))
                    if len(rows) == _ROWS_PER_GROUP:
                        writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                        written, rows = written + len(rows), []
        if rows or not written:  # an empty batch's file still has the columns
            writer.write_table(pa.Table.from_pylist(rows, schema=schema))
            written += len(rows)
    return written


def ensure_results(bucket: Bucket, batch_id: str, ended_at: float | None = None) -> bool:
    """``results.parquet`` for a batch that ended before the lake existed, or whose write
    failed; True when the batch has one now."""
    if bucket.exists(results_path(batch_id)):
        return True
    return write_results(bucket, batch_id, ended_at) is not None


_ANSWERS_SQL = """
SELECT r.custom_id, r.status, r.model, r.text, r.error_code, r.error_message, r.error_param,
       {body} AS body
FROM read_parquet($results) r {join}
ORDER BY r.custom_id
"""


def batch_answers(bucket: Bucket, batch_id: str, ended_at: float | None = None) -> Iterator[dict]:
    """Each result of a batch (from its ``results.parquet``, written first if missing) with
    the request body it answered (JSON text, from ``requests.parquet``), by custom_id."""
    if not ensure_results(bucket, batch_id, ended_at):
        return
    con = connect()
    try:
        requests = L.batch_file(batch_id, L.REQUESTS)
        params = {"results": _uri(con, bucket, results_path(batch_id))}
        if bucket.exists(requests):
            params["requests"] = _uri(con, bucket, requests)
            sql = _ANSWERS_SQL.format(
                body="q.body", join="LEFT JOIN read_parquet($requests) q USING (custom_id)"
            )
        else:
            sql = _ANSWERS_SQL.format(body="NULL::VARCHAR", join="")
        cursor = con.execute(sql, params)
        names = [d[0] for d in cursor.description]
        while rows := cursor.fetchmany(4096):
            yield from (dict(zip(names, row, strict=True)) for row in rows)
    finally:
        con.close()


def catalog_frame(catalog: Catalog, query: sa.Select) -> pl.DataFrame:
    """A catalog query as a Polars frame (JSON columns as JSON text, for DuckDB's ``->>``)."""
    import polars as pl

    with catalog.engine.connect() as conn:
        return pl.read_database(query, connection=conn, infer_schema_length=None)


def _readable(*columns: sa.ColumnElement) -> list[sa.ColumnElement]:
    """``columns`` as DuckDB reads them: JSON columns as JSON text (for ``->>``), the rest as
    they are."""
    return [sa.cast(c, sa.Text).label(c.key) if isinstance(c.type, sa.JSON) else c for c in columns]


# Every conquest with its newest annotation (an inner join: annotated ones only).
_ANNOTATED = conquests.join(annotations, annotations.c.conquest_id == conquests.c.id)


def conquests_query() -> sa.Select:
    """The catalog's conquests."""
    return sa.select(*_readable(*conquests.c))


def annotations_query() -> sa.Select:
    return sa.select(*_readable(*annotations.c))


def gold_query(type_id: str, min_rating: int) -> sa.Select:
    """A type's gold conquests (a gold star, or a rating of ``min_rating`` or more, on a
    completed answer that no operator excluded) with their newest annotation."""
    fields = ("is_gold_star", "rating", "feedback", "improvement_notes", "answers")
    return (
        sa.select(
            *_readable(
                conquests.c.id,
                conquests.c.created_at,
                conquests.c.input_data,
                conquests.c.prediction,
                *(annotations.c[n] for n in fields),
            )
        )
        .select_from(_ANNOTATED)
        .where(
            conquests.c.type == type_id,
            conquests.c.status == "COMPLETED",
            conquests.c.excluded_at.is_(None),
            annotations.c.is_gold_star.is_(True) | (annotations.c.rating >= min_rating),
        )
    )


def rating_counts(catalog: Catalog, type_id: str) -> dict[str, int]:
    """How the type's annotated conquests were rated ("1" to "5", and "none")."""
    query = (
        sa.select(annotations.c.rating, sa.func.count())
        .select_from(_ANNOTATED)
        .where(conquests.c.type == type_id)
        .group_by(annotations.c.rating)
    )
    counts = {str(n): 0 for n in range(1, 6)} | {"none": 0}
    for rating, count in catalog_frame(catalog, query).iter_rows():
        counts["none" if rating is None else str(rating)] = count
    return counts


def open_lake(bucket: Bucket, catalog: Catalog) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the views ``results``, ``conquests`` and ``annotations``."""
    import duckdb

    con = connect()
    for entry in bucket.list_entries(L.BATCHES):
        # Batches that ended before the lake existed, or whose write failed: written now.
        if entry.is_dir and L.is_batch_id(entry.name):
            try:
                ensure_results(bucket, entry.name)
            except Exception:  # noqa: BLE001 - one batch's files must not hide the others
                log.exception(f"{entry.name}: results.parquet not written")
    pattern = _uri(con, bucket, L.every_batch_file(L.RESULTS))
    try:
        con.execute(
            "CREATE VIEW results AS SELECT * FROM read_parquet("
            + _literal(pattern)
            + ", union_by_name = true)"
        )
        con.execute("SELECT 1 FROM results LIMIT 0")
    except duckdb.IOException:  # no batch has results yet
        con.execute("DROP VIEW IF EXISTS results")
        columns = ", ".join(f"NULL::{kind} AS {name}" for name, kind in RESULT_COLUMNS.items())
        con.execute(f"CREATE VIEW results AS SELECT {columns} WHERE false")
    for name, query in (("conquests", conquests_query()), ("annotations", annotations_query())):
        con.register(f"_{name}", catalog_frame(catalog, query).to_arrow())
        con.execute(f"CREATE VIEW {name} AS SELECT * FROM _{name}")
    return con


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
