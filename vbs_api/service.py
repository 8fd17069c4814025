"""What the Batch API does, apart from HTTP: files and batches over the catalog, the bucket and
the batch lifecycle. Plain synchronous code (the routers call it from worker threads, never on
the event loop); nothing here talks to vLLM or runs a batch.

A created batch is put where the inbox sensor would put a dropped one (its input and options in
``batches/<id>/``), recorded through the lifecycle, and its run launched through Dagster at
once. Everything is checked before anything is written, so a refused request leaves no trace.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from vbs_api.errors import APIError
from vbs_api.launch import BatchLauncher, LaunchFailed, LaunchUnavailable
from vbs_resources import Bucket, Catalog
from vbs_resources import layout as L
from vbs_resources.catalog import batch_object, file_object
from vbs_resources.curation import ConquestTypeFileError, ConquestTypes
from vbs_resources.curation.records import check_records, requested_messages, tie_records
from vbs_resources.lifecycle import BatchLifecycle
from vbs_resources.wire import (
    ENDPOINTS,
    TERMINAL_STATUSES,
    BatchErrorEntry,
    BatchObject,
    BatchOptions,
    CreateBatchRequest,
    FileObject,
)

log = logging.getLogger("vbs.api")


# How long a client at its limit of batches in flight is told to wait before asking again.
BATCH_LIMIT_RETRY_S = 30


class BatchService:
    def __init__(
        self,
        bucket: Bucket,
        catalog: Catalog,
        lifecycle: BatchLifecycle,
        launcher: BatchLauncher | None = None,
        conquest_types: ConquestTypes | None = None,
        max_in_flight: int | None = None,
    ) -> None:
        self.bucket, self.catalog, self.lifecycle = bucket, catalog, lifecycle
        self.launcher = launcher
        self.conquest_types = conquest_types or ConquestTypes()
        self.max_in_flight = max_in_flight
        self._caller_locks: dict[str, threading.Lock] = {}

    # ---- files -------------------------------------------------------------------------------

    def file_row(self, file_id: str) -> dict[str, Any]:
        row = self.catalog.files.get(file_id)
        if row is None:
            raise APIError(404, f"No such File object: {file_id[:100]}", param="id")
        return row

    def register_upload(
        self, file_id: str, filename: str, purpose: str, size: int, sha256: str
    ) -> FileObject:
        row = self.catalog.files.create(
            file_id,
            filename=filename,
            purpose=purpose,
            size=size,
            path=L.uploaded_file(file_id),
            sha256=sha256,
        )
        return file_object(row)

    def delete_file(self, file_id: str) -> dict[str, Any]:
        """The file's row and its bytes; a batch made from it keeps its own copy. A dropped
        file's bytes are its batch's input: only the record goes."""
        row = self.catalog.files.delete(file_id)
        if row is None:
            raise APIError(404, f"No such File object: {file_id[:100]}", param="id")
        if not row["path"].endswith(f"/{L.INPUT}"):
            self.bucket.remove(row["path"])
        return {"id": file_id, "object": "file", "deleted": True}

    # ---- batches ----------------------------------------------------------------------------

    def batch_row(self, batch_id: str) -> dict[str, Any]:
        row = self.catalog.batches.get(batch_id)
        if row is None:
            raise APIError(404, f"No such Batch object: {batch_id[:100]}", param="id")
        return row

    def create_batch(self, request: CreateBatchRequest, caller: str | None = None) -> BatchObject:
        """A new batch of ``request``, recorded as ``caller``'s (an API key's hash). With
        ``max_in_flight``, a caller at the limit gets 429: counted and created under one lock
        per caller, so concurrent creates cannot pass the limit together (in this process)."""
        if self.max_in_flight is None or caller is None:
            return self._create_batch(request, caller)
        with self._caller_locks.setdefault(caller, threading.Lock()):
            unfinished = self.catalog.batches.unfinished_by(caller)
            if unfinished >= self.max_in_flight:
                raise APIError(
                    429,
                    f"This API key has {unfinished} unfinished batches, the most it may have at "
                    "once; create more once some have ended.",
                    code="batch_limit_exceeded",
                    headers={"retry-after": str(BATCH_LIMIT_RETRY_S)},
                )
            return self._create_batch(request, caller)

    def _create_batch(self, request: CreateBatchRequest, caller: str | None) -> BatchObject:
        if request.endpoint not in ENDPOINTS:
            raise APIError(
                400, f"Unsupported endpoint; use one of {', '.join(ENDPOINTS)}.", param="endpoint"
            )
        if request.completion_window != "24h":
            raise APIError(400, "completion_window must be '24h'.", param="completion_window")
        source = self.file_row(request.input_file_id)
        if source["purpose"] != "batch":
            raise APIError(
                400,
                f"File {source['id']} has purpose '{source['purpose']}'; a batch's input must be "
                "a file uploaded with purpose 'batch'.",
                param="input_file_id",
            )
        self._check_conquest_metadata(request.metadata or {}, source)
        options = BatchOptions(metadata=request.metadata or {}, chunk_size=request.chunk_size)
        batch_id = L.new_batch_id()
        # Input and options first, then the record: a crash in between leaves an unknown folder,
        # never a batch without its input.
        try:
            self.bucket.copy(source["path"], L.batch_file(batch_id, L.INPUT))
            self.bucket.write_bytes(
                L.batch_file(batch_id, L.SIDECAR),
                json.dumps(
                    {**options.model_dump(exclude_none=True), "batch_id": batch_id}
                ).encode(),
            )
        except FileNotFoundError:
            # The file was deleted while the batch was being made: nothing is left behind.
            self.bucket.remove_tree(L.batch_folder(batch_id))
            raise APIError(
                404, f"No such File object: {source['id']}", param="input_file_id"
            ) from None
        except OSError:
            self.bucket.remove_tree(L.batch_folder(batch_id))
            raise
        self.lifecycle.create(
            batch_id,
            source="api",
            input_file_id=source["id"],
            original_filename=source["filename"],
            input_sha256=source.get("sha256"),
            endpoint=request.endpoint,
            metadata=options.metadata,
            options=options.model_dump(exclude_none=True, exclude={"metadata"}),
            created_by=caller,
        )
        self._launch(batch_id, options, source["filename"])
        return batch_object(self.batch_row(batch_id))

    def _check_conquest_metadata(self, metadata: dict[str, str], source: dict[str, Any]) -> None:
        """A batch to be curated names a known conquest type, and a records file of its own:
        every record strict JSON of the type, and tied to the request sent for its custom_id."""
        type_id = metadata.get(L.META_CONQUEST_TYPE)
        if type_id is None:
            return
        try:
            registry = self.conquest_types.registry()
        except ConquestTypeFileError as exc:
            log.error(f"the conquest types do not load: {exc}")
            raise APIError(500, "The server's conquest types do not load; see its log.") from None
        if type_id not in registry:
            message = f"Unknown conquest type {type_id[:100]!r}; known: " + ", ".join(
                t.id for t in registry.all()
            )
            raise APIError(400, message, param=f"metadata.{L.META_CONQUEST_TYPE}")
        records = metadata.get(L.META_CONQUEST_RECORDS)
        if records is None:
            return
        param = f"metadata.{L.META_CONQUEST_RECORDS}"
        row = self.catalog.files.get(records) if L.is_file_id(records) else None
        if row is None or row["purpose"] != "user_data":
            raise APIError(
                400,
                f"{records[:100]} is not a file uploaded with purpose 'user_data'.",
                param=param,
            )
        conquest_type = registry.get(type_id)
        with self.bucket.open(row["path"], "rb") as fh:
            good, errors = check_records(conquest_type, fh)
        if not errors:
            with self.bucket.open(source["path"], "rb") as fh:
                errors = tie_records(conquest_type, good, requested_messages(fh))
        if errors:
            shown = "; ".join(errors[:5]) + (f"; and {len(errors) - 5} more" if errors[5:] else "")
            raise APIError(
                400,
                f"The records file {records} does not fit the {type_id} batch: {shown}",
                param=param,
                code="invalid_records",
            )

    def _launch(self, batch_id: str, options: BatchOptions, filename: str) -> None:
        if self.launcher is None:
            return  # the reconciler sensor starts it
        try:
            run_id = self.launcher.launch(
                batch_id, options.run_config(), L.batch_run_tags(batch_id, filename)
            )
        except LaunchUnavailable:
            log.warning(f"{batch_id}: Dagster is unreachable; the reconciler will start it")
            return
        except LaunchFailed as exc:
            self.lifecycle.fail(
                batch_id, [BatchErrorEntry(code="launch_failed", message=str(exc)[:500])]
            )
            return
        log.info(f"{batch_id}: run {run_id} queued")

    def cancel_batch(self, batch_id: str) -> BatchObject:
        before = self.batch_row(batch_id)["status"]
        if before in TERMINAL_STATUSES:
            raise APIError(400, f"Cannot cancel a batch that is {before}.", param="batch_id")
        after = self.lifecycle.request_cancel(batch_id)
        if after in TERMINAL_STATUSES and after != "cancelled":
            # It ended between the read and the cancel: the cancel came too late.
            raise APIError(400, f"Cannot cancel a batch that is {after}.", param="batch_id")
        return batch_object(self.batch_row(batch_id))
