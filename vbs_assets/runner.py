"""The batch runner: a batch's requests through the engine, in checkpointed chunks.

Plain code with no Dagster in it; ``batch_output`` is a thin wrapper that hands it resources and
turns its report into metadata, and the reconciler sensor uses ``finish`` to end a batch whose
run cannot (terminated from Dagster, failed for good).

Each finished chunk is written whole (temporary file, then rename) to
``batches/<id>/checkpoint/chunk-NNNNN.jsonl`` before the next starts, so a run that dies, and the
retry the daemon launches for it, resumes after the last finished chunk: no request is run twice
for the same input, and no ``custom_id`` is written twice or dropped. The checkpoint is tied to
the input's sha256 and removed once the final files are in place.

A batch in a terminal status is never changed: running it again reports what it has.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow.parquet as pq

from vbs_resources import Bucket, Catalog, EngineRequest, EngineResult, InferenceEngine
from vbs_resources import layout as L
from vbs_resources.lake import write_results
from vbs_resources.lifecycle import BatchLifecycle
from vbs_resources.process_memory import release_memory
from vbs_resources.registry import ModelRegistry
from vbs_resources.wire import (
    TERMINAL_STATUSES,
    BatchError,
    BatchErrorEntry,
    BatchRequestOutput,
    BatchResponse,
)


class RunRefused(Exception):
    """This run cannot proceed; the batch's record was left as it was."""


def output_line(result: EngineResult) -> BatchRequestOutput:
    """The OpenAI batch output line of one request's result."""
    return BatchRequestOutput(
        id=L.new_request_line_id(),
        custom_id=result.custom_id,
        response=BatchResponse(
            status_code=result.status_code, request_id=L.new_request_id(), body=result.body
        ),
        error=None,
    )


def expired_line(custom_id: str) -> BatchRequestOutput:
    """OpenAI's line for a request that did not run before the completion window closed."""
    return BatchRequestOutput(
        id=L.new_request_line_id(),
        custom_id=custom_id,
        response=None,
        error=BatchError(
            code="batch_expired",
            message="This request could not be executed before the completion window expired.",
        ),
    )


@dataclass
class Progress:
    """Counts over all finished chunks, whether computed by this run or an earlier one."""

    done: set[str] = field(default_factory=set)
    completed: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    chunks: int = 0

    def add(self, line: dict[str, Any]) -> None:
        """Count one output line as written (a checkpoint's, read back)."""
        response = line["response"] or {}
        self._count(line["custom_id"], response.get("status_code"), response.get("body"))

    def add_result(self, result: EngineResult) -> None:
        """Count the line ``output_line(result)`` makes, without serializing it again."""
        self._count(result.custom_id, result.status_code, result.body)

    def _count(self, custom_id: str, status_code: int | None, body: dict[str, Any] | None) -> None:
        self.done.add(custom_id)
        if status_code is not None and 200 <= status_code < 300:
            self.completed += 1
            usage = (body or {}).get("usage") or {}
            self.prompt_tokens += usage.get("prompt_tokens", 0)
            self.completion_tokens += usage.get("completion_tokens", 0)
        else:
            self.failed += 1

    @property
    def usage(self) -> dict[str, Any]:
        return {
            "input_tokens": self.prompt_tokens,
            "output_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        }

    def counts(self) -> dict[str, Any]:
        return {
            "request_completed": self.completed,
            "request_failed": self.failed,
            "usage": self.usage,
        }


class Checkpoint:
    """A batch's finished chunks in the bucket, tied to the sha256 of the input they answer."""

    def __init__(self, bucket: Bucket, batch_id: str) -> None:
        self.bucket, self.batch_id = bucket, batch_id

    def _chunk_names(self) -> list[tuple[int, str]]:
        found = []
        for entry in self.bucket.list_files(L.checkpoint_folder(self.batch_id)):
            index = L.chunk_index(entry.name)
            if index is not None:
                found.append((index, entry.name))
        return sorted(found)

    def read(self, sha256: str | None) -> Progress | None:
        """Progress from a checkpoint of the same input, None when there is none (changes
        nothing)."""
        manifest = L.batch_file(self.batch_id, L.CHECKPOINT_MANIFEST)
        if not sha256 or not self.bucket.exists(manifest):
            return None
        if json.loads(self.bucket.read_text(manifest)).get("sha256") != sha256:
            return None
        progress = Progress()
        for index, name in self._chunk_names():
            for line in self.lines(name):
                progress.add(line)
            progress.chunks = max(progress.chunks, index + 1)
        return progress

    def load(self, sha256: str) -> Progress:
        """Progress from a checkpoint of the same input; a stale or absent one is started afresh."""
        progress = self.read(sha256)
        if progress is not None:
            return progress
        self.bucket.remove_tree(L.checkpoint_folder(self.batch_id))
        manifest = L.batch_file(self.batch_id, L.CHECKPOINT_MANIFEST)
        self.bucket.write_bytes(manifest, json.dumps({"sha256": sha256}).encode())
        return Progress()

    def lines(self, name: str) -> Iterator[dict[str, Any]]:
        path = f"{L.checkpoint_folder(self.batch_id)}/{name}"
        with self.bucket.open(path, "rb") as fh:
            for raw in fh:
                yield json.loads(raw)

    def write(self, index: int, lines: list[BatchRequestOutput]) -> None:
        data = "".join(line.model_dump_json() + "\n" for line in lines).encode()
        self.bucket.write_bytes(L.chunk_file(self.batch_id, index), data)

    def merge(self, chunks: bool = True) -> None:
        """The chunks, in order, into ``output.jsonl`` (successes) and ``errors.jsonl``; with
        ``chunks`` False (no valid checkpoint) both files are empty."""
        bucket, batch_id = self.bucket, self.batch_id
        with (
            bucket.atomic_writer(L.batch_file(batch_id, L.OUTPUT)) as out,
            bucket.atomic_writer(L.batch_file(batch_id, L.ERRORS)) as err,
        ):
            for _, name in self._chunk_names() if chunks else []:
                path = f"{L.checkpoint_folder(batch_id)}/{name}"
                with bucket.open(path, "rb") as fh:
                    for raw in fh:
                        response = json.loads(raw)["response"]
                        ok = response is not None and 200 <= response["status_code"] < 300
                        (out if ok else err).write(raw)

    def remove(self) -> None:
        self.bucket.remove_tree(L.checkpoint_folder(self.batch_id))


def pending_requests(
    bucket: Bucket, batch_id: str, done: set[str], chunk_size: int
) -> Iterator[list[EngineRequest]]:
    """The batch's requests not in ``done``, in chunks, in file order."""
    path = L.batch_file(batch_id, L.REQUESTS)
    if not bucket.exists(path):
        return
    with bucket.open(path, "rb") as fh:
        parquet = pq.ParquetFile(fh)
        chunk: list[EngineRequest] = []
        for record_batch in parquet.iter_batches(batch_size=4096, columns=["custom_id", "body"]):
            for custom_id, body in zip(
                record_batch.column("custom_id").to_pylist(),
                record_batch.column("body").to_pylist(),
                strict=True,
            ):
                if custom_id in done:
                    continue
                chunk.append(EngineRequest(custom_id, json.loads(body)))
                if len(chunk) == chunk_size:
                    yield chunk
                    chunk = []
        if chunk:
            yield chunk


def register_result_files(bucket: Bucket, catalog: Catalog, batch_id: str) -> dict[str, str]:
    """Give output.jsonl and errors.jsonl file ids, so the Files API can serve them."""
    ids = {}
    for name, column, kind in (
        (L.OUTPUT, "output_file_id", "output"),
        (L.ERRORS, "error_file_id", "errors"),
    ):
        path = L.batch_file(batch_id, name)
        file_id = L.result_file_id(batch_id, kind)
        catalog.files.create(
            file_id,
            filename=f"{batch_id}_{name}",
            purpose="batch_output",
            size=bucket.size(path),
            path=path,
        )
        ids[column] = file_id
    return ids


def write_lake(bucket: Bucket, batch_id: str) -> None:
    """The batch's ``results.parquet``. It is derived from the final files, so a write that
    fails must not keep the batch from ending: whoever reads the lake writes it then."""
    try:
        rows = write_results(bucket, batch_id)
    except Exception:  # noqa: BLE001 - anything DuckDB or the bucket raise
        logging.getLogger("vbs.lake").exception(f"{batch_id}: results.parquet not written")
        # One from an earlier attempt would be trusted as current: it goes.
        with contextlib.suppress(Exception):
            bucket.remove(L.batch_file(batch_id, L.RESULTS))
    else:
        logging.getLogger("vbs.lake").info(f"{batch_id}: results.parquet, {rows} rows")


def stop_reason(row: dict[str, Any], now: float | None = None) -> str | None:
    """'cancelled' once a cancel was requested, 'expired' past the completion window."""
    if row["status"] == "cancelling":
        return "cancelled"
    if row.get("expires_at") and (now or time.time()) > row["expires_at"]:
        return "expired"
    return None


def finish(
    bucket: Bucket,
    catalog: Catalog,
    lifecycle: BatchLifecycle,
    batch_id: str,
    status: str,
    sha256: str | None,
    progress: Progress | None = None,
    errors: list[BatchErrorEntry] | None = None,
) -> bool:
    """End an unfinished batch as ``status`` (``completed``, ``cancelled``, ``expired``, or
    ``failed`` with ``errors``) with every result its checkpoint holds (``progress``, when the
    caller has it loaded already); for ``expired`` the requests that never ran get
    ``batch_expired`` lines. True when this call ended it."""
    row = catalog.batches.get(batch_id)
    if row is None or row["status"] in TERMINAL_STATUSES:
        return False  # ended meanwhile, by its run: its files are final, never touched again
    checkpoint = Checkpoint(bucket, batch_id)
    if progress is None:
        progress = checkpoint.read(sha256)
    valid = progress is not None
    progress = progress or Progress()
    if status == "expired":
        missing = [
            expired_line(request.custom_id)
            for chunk in pending_requests(bucket, batch_id, progress.done, 4096)
            for request in chunk
        ]
        if missing:
            if not valid:
                checkpoint.load(sha256 or "")  # a fresh checkpoint for the expired lines
                valid = True
            checkpoint.write(progress.chunks, missing)
            for line in missing:
                progress.add(line.model_dump())
    checkpoint.merge(chunks=valid)
    file_ids = register_result_files(bucket, catalog, batch_id)
    write_lake(bucket, batch_id)
    if status == "failed":
        ended = lifecycle.fail(batch_id, errors or [], **file_ids, **progress.counts())
    else:
        ended = lifecycle.finish(batch_id, status, **file_ids, **progress.counts())
    if ended:
        checkpoint.remove()
    return ended


@dataclass
class RunReport:
    """What a run of a batch did, for the asset's metadata."""

    batch_id: str
    status: str
    total: int
    completed: int
    failed: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    resumed: int = 0
    new_completion_tokens: int = 0
    engine_start_seconds: float = 0.0
    engine_seconds: float = 0.0
    wall_seconds: float = 0.0
    sha256: str = ""
    # True when the batch had ended before this run: nothing was computed or written.
    recorded: bool = False

    @property
    def output_tokens_per_s(self) -> float:
        return round(self.new_completion_tokens / max(self.engine_seconds, 1e-9), 1)


class BatchRunner:
    """Runs one batch for one Dagster run (``run_id``); ``run_is_active`` tells whether another
    run that holds the batch is still going (then this run refuses, rather than race it)."""

    def __init__(
        self,
        bucket: Bucket,
        catalog: Catalog,
        lifecycle: BatchLifecycle,
        engine: InferenceEngine,
        run_id: str,
        run_is_active: Callable[[str], bool],
        log: logging.Logger | Any = None,
    ) -> None:
        self.bucket, self.catalog, self.lifecycle, self.engine = bucket, catalog, lifecycle, engine
        self.run_id, self.run_is_active = run_id, run_is_active
        self.log = log or logging.getLogger(__name__)

    def claim(self, row: dict[str, Any]) -> None:
        holder = row.get("run_id")
        if holder not in (None, self.run_id) and self.run_is_active(holder):
            raise RunRefused(f"run {holder} is processing {row['id']}")
        if not self.catalog.batches.claim(row["id"], self.run_id, holder):
            raise RunRefused(f"another run took {row['id']} first")

    def run(self, batch_id: str, chunk_size: int) -> RunReport:
        row = self.catalog.batches.get(batch_id)
        if row is None:
            raise RunRefused(f"{batch_id} is not in the catalog")
        if row["status"] in TERMINAL_STATUSES:
            return self.recorded(row)
        sha256 = row.get("input_sha256")
        if not sha256 or not self.bucket.exists(L.batch_file(batch_id, L.REQUESTS)):
            raise RunRefused(f"{batch_id} has not been validated: materialize batch_input first")
        self.claim(row)
        started = time.perf_counter()
        total = row["request_total"]
        endpoint = row.get("endpoint") or "/v1/chat/completions"
        checkpoint = Checkpoint(self.bucket, batch_id)
        progress = checkpoint.load(sha256)
        resumed = len(progress.done)
        if resumed:
            self.log.info(f"resuming {batch_id}: {resumed}/{total} requests already done")
        stop = stop_reason(row)
        if stop is None:
            self.lifecycle.start(batch_id)
        self.lifecycle.record(batch_id, **progress.counts())
        report = RunReport(batch_id, "", total, 0, 0, resumed=resumed, sha256=sha256)

        if stop is None:
            # What the engine serves is what the registry has available now: an adapter
            # registered a moment ago is served by this run, a retired one is not.
            registry = ModelRegistry(self.catalog)
            registry.register_configured(self.engine.configured_models())
            engine_started = time.perf_counter()
            self.engine.start(endpoint, registry.snapshot())
            report.engine_start_seconds = time.perf_counter() - engine_started
            self.log.info(
                f"engine ready in {report.engine_start_seconds:.1f}s "
                f"({self.engine.describe()['engine']})"
            )
        stop = stop or self._stop(batch_id)  # a cancel that came while the engine started
        chunks = pending_requests(self.bucket, batch_id, progress.done, chunk_size)
        # The engine may run the coming chunks while one is written (a server's replicas stay
        # busy); results still come, and are checkpointed, one whole chunk at a time in order.
        answered = self.engine.run_chunks(endpoint, chunks)
        try:
            while stop is None:
                chunk_started = time.perf_counter()
                results = next(answered, None)
                report.engine_seconds += time.perf_counter() - chunk_started
                if results is None:
                    break
                lines = [output_line(r) for r in results]
                checkpoint.write(progress.chunks, lines)
                progress.chunks += 1
                for result in results:
                    progress.add_result(result)
                report.new_completion_tokens += sum(r.completion_tokens for r in results)
                del lines, results
                # What the chunk freed goes back to the system: without this an in-process
                # engine's RSS grew ~250 MB over 40 chunks (glibc keeps freed pages).
                release_memory(collect=False)
                if not self.lifecycle.record(batch_id, **progress.counts()):
                    raise RunRefused(f"{batch_id} was ended by someone else while it ran")
                done = len(progress.done)
                self.log.info(
                    f"chunk {progress.chunks}: {done}/{total} requests "
                    f"({100 * done / max(total, 1):.0f}%), {progress.failed} failed, "
                    f"{report.output_tokens_per_s:.0f} output tok/s"
                )
                stop = self._stop(batch_id)
        finally:
            # What is still in flight is dropped: its chunks were not written.
            close = getattr(answered, "close", None)
            if close is not None:
                close()
        if stop:
            self.log.warning(f"{batch_id} {stop}: keeping {len(progress.done)}/{total} results")
        else:
            self.lifecycle.finalizing(batch_id)
        status = stop or "completed"
        ended = finish(
            self.bucket, self.catalog, self.lifecycle, batch_id, status, sha256, progress
        )
        final = self.catalog.batches.get(batch_id) or row
        if not ended and final["status"] == "cancelling":
            # A cancel arrived after the last chunk: it wins, with every result kept.
            finish(
                self.bucket, self.catalog, self.lifecycle, batch_id, "cancelled", sha256, progress
            )
            final = self.catalog.batches.get(batch_id) or row
        report.status = final["status"]
        report.completed, report.failed = final["request_completed"], final["request_failed"]
        usage = final.get("usage") or {}
        report.prompt_tokens = usage.get("input_tokens", 0)
        report.completion_tokens = usage.get("output_tokens", 0)
        report.wall_seconds = time.perf_counter() - started
        return report

    def _stop(self, batch_id: str) -> str | None:
        row = self.catalog.batches.get(batch_id)
        if row is None or row["status"] in TERMINAL_STATUSES:
            raise RunRefused(f"{batch_id} was ended by someone else while it ran")
        if row.get("run_id") != self.run_id:
            raise RunRefused(f"run {row.get('run_id')} took over {batch_id}")
        return stop_reason(row)

    def recorded(self, row: dict[str, Any]) -> RunReport:
        """The report of a batch that ended before this run: what it has, nothing recomputed."""
        usage = row.get("usage") or {}
        return RunReport(
            row["id"],
            row["status"],
            row["request_total"],
            row["request_completed"],
            row["request_failed"],
            prompt_tokens=usage.get("input_tokens", 0),
            completion_tokens=usage.get("output_tokens", 0),
            sha256=row.get("input_sha256") or "",
            recorded=True,
        )
