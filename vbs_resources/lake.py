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

import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import sqlalchemy as sa

from vbs_resources import layout as L
from vbs_resources.bucket import Bucket
from vbs_resources.catalog import Catalog, annotations, conquests

if TYPE_CHECKING:
    import duckdb
    import polars as pl

log = logging.getLogger("vbs.lake")

# A result line larger than this (a huge answer) is refused by DuckDB's reader, not truncated.
_MAX_LINE_BYTES = 256 * 1024 * 1024

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

_LINE_COLUMNS = "{'custom_id': 'VARCHAR', 'response': 'JSON', 'error': 'JSON'}"

_RESULTS_SQL = f"""
WITH lines AS (
  SELECT custom_id, response, error,
         TRY_CAST(response->>'$.status_code' AS INTEGER) AS status_code,
         response->'$.body' AS body
  FROM read_json($files, format = 'newline_delimited', columns = {_LINE_COLUMNS},
                 maximum_object_size = {_MAX_LINE_BYTES})
)
SELECT
  $batch_id::VARCHAR AS batch_id,
  custom_id,
  response->>'$.request_id' AS request_id,
  body->>'$.model' AS model,
  body->>'$.object' AS object,
  -- An "error": null in a body (a pass-through server's) is no error.
  CASE WHEN status_code BETWEEN 200 AND 299 AND error IS NULL AND body->>'$.error' IS NULL
       THEN 'completed' ELSE 'failed' END AS status,
  status_code,
  body->>'$.choices[0].finish_reason' AS finish_reason,
  TRY_CAST(body->>'$.usage.prompt_tokens' AS BIGINT) AS prompt_tokens,
  TRY_CAST(body->>'$.usage.completion_tokens' AS BIGINT) AS completion_tokens,
  TRY_CAST(body->>'$.usage.total_tokens' AS BIGINT) AS total_tokens,
  COALESCE(body->>'$.choices[0].message.content', body->>'$.choices[0].text') AS text,
  COALESCE(body->>'$.error.code', error->>'$.code') AS error_code,
  COALESCE(body->>'$.error.message', error->>'$.message') AS error_message,
  COALESCE(body->>'$.error.param', error->>'$.param') AS error_param,
  -- A created time out of range (a server's odd answer) falls back to the batch's end.
  COALESCE(TRY(to_timestamp(TRY_CAST(body->>'$.created' AS DOUBLE))),
           to_timestamp($ended_at::DOUBLE)) AS created_at
FROM lines
"""


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
    result files."""
    import pyarrow.parquet as pq

    names = [n for n in (L.OUTPUT, L.ERRORS) if bucket.exists(L.batch_file(batch_id, n))]
    if not names:
        return None
    con = connect()
    try:
        files = [_uri(con, bucket, L.batch_file(batch_id, n)) for n in names]
        reader = con.sql(
            _RESULTS_SQL,
            params={"files": files, "batch_id": batch_id, "ended_at": ended_at or time.time()},
        ).to_arrow_reader(8192)
        rows = 0
        with bucket.atomic_writer(results_path(batch_id)) as fh:
            with pq.ParquetWriter(fh, reader.schema, compression="zstd") as writer:
                for part in reader:
                    writer.write_batch(part)
                    rows += part.num_rows
        return rows
    finally:
        con.close()


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
