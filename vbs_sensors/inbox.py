"""The inbox sensor: a complete ``*.jsonl`` dropped into ``inbox/`` becomes a batch run.

When is a file complete? Either it was written under another name (one starting with ``.`` or
ending in ``.part``/``.tmp``, e.g. ``jobs.jsonl.part``) and renamed into place, which is atomic;
or its size and modification time (and its sidecar's) are unchanged between two ticks, about
five seconds apart (Dagster's sensor daemon evaluates sensors at most every 5 s). A file still
growing is left for a later tick. An optional sidecar ``<name>.metadata.json`` (written *before*
the ``.jsonl``) carries the OpenAI batch ``metadata`` and options. The suffix is matched in any
letter case (``JOBS.JSONL``).

The batch id is derived from the content (file and sidecar), so the same bytes dropped again
are recognized: the sensor says so, moves the copy to ``inbox/duplicates/`` and starts nothing;
a drop can never name, and so never take over, another batch. The file's own sha256 is recorded
when it is taken, and ``batch_input`` refuses a file that changed since (an appending writer
that kept its handle open).

Whatever cannot be taken (an invalid sidecar, a sub-folder, a symbolic link, anything that is not
a regular file, such as a FIFO, a socket or a device, which is never opened; a file that cannot
be moved, a sidecar without its file) is a problem: shown in the tick, logged once when it
appears or changes, kept in the catalog for ``GET /v1/inbox`` and ``vbs inbox``, and tried
again on every tick, so fixing the cause is enough. The cursor (what each file looked like on
the previous tick) is stored by Dagster and survives daemon restarts.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import time
from dataclasses import dataclass, field

import dagster as dg
from pydantic import ValidationError

from vbs_assets.jobs import batch_job
from vbs_assets.partitions import batch_runs
from vbs_resources import Bucket, Catalog, Webhooks
from vbs_resources import layout as L
from vbs_resources.bucket import BucketEntry
from vbs_resources.lifecycle import BatchLifecycle
from vbs_resources.strict_json import JSONError
from vbs_resources.strict_json import loads as strict_loads
from vbs_resources.wire import BatchOptions

MAX_SIDECAR_BYTES = 64 * 1024
# How long one tick takes files (hashing, moving) before it leaves the rest for the next one.
TICK_BUDGET_S = 20.0


class InboxProblem(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind, self.message = kind, message


@dataclass
class Tick:
    """What one evaluation found and decided."""

    seen: dict[str, list[object]] = field(default_factory=dict)
    problems: dict[str, tuple[str, str]] = field(default_factory=dict)
    waiting: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    run_requests: list[dg.RunRequest] = field(default_factory=list)


def _signature(*entries: BucketEntry | None) -> list[object]:
    return [[e.size, e.modified] for e in entries if e is not None]


def _free_name(bucket: Bucket, folder: str, name: str) -> str:
    candidate, n = f"{folder}/{name}", 1
    while bucket.exists(candidate):
        stem, ext = posixpath.splitext(name)
        candidate, n = f"{folder}/{stem}.{n}{ext}", n + 1
    return candidate


def _options(bucket: Bucket, sidecar: BucketEntry | None) -> tuple[BatchOptions, bytes]:
    if sidecar is None:
        return BatchOptions(), b""
    if sidecar.size > MAX_SIDECAR_BYTES:
        raise InboxProblem(
            "invalid_sidecar", f"{sidecar.name} is larger than {MAX_SIDECAR_BYTES} bytes"
        )
    raw = bucket.read_bytes(L.inbox_path(sidecar.name))
    try:
        return BatchOptions.model_validate(strict_loads(raw)), raw
    except JSONError as exc:
        where = f" at '{exc.path}'" if exc.path else ""
        raise InboxProblem(
            "invalid_sidecar", f"{sidecar.name} is not valid JSON{where}: {exc.message}"
        ) from None
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise InboxProblem(
            "invalid_sidecar", f"{sidecar.name}: '{loc[:80]}': {first['msg'][:200]}"
        ) from None


def _hashes(bucket: Bucket, rel: str, sidecar: bytes) -> tuple[str, str]:
    """(sha256 of the file, sha256 of file and sidecar together: the batch's content)."""
    return _hashes_of(bucket.sha256(rel), sidecar)


def _hashes_of(input_sha: str, sidecar: bytes) -> tuple[str, str]:
    content = hashlib.sha256(f"{input_sha}\0sidecar\0".encode() + sidecar).hexdigest()
    return input_sha, content


def take(
    bucket: Bucket,
    lifecycle: BatchLifecycle,
    name: str,
    sidecar: BucketEntry | None,
    log: dg.DagsterLogManager | None = None,
) -> tuple[str, dg.RunRequest | None]:
    """Turn one complete drop into a batch: record it, move its files into the batch's folder,
    and return (batch id, the run to request); None for a duplicate of an earlier batch.
    Raises ``InboxProblem`` when it cannot, leaving the files where they are."""
    rel = L.inbox_path(name)
    for entry_name in (name, *([sidecar.name] if sidecar is not None else [])):
        # Never opened unless it is a regular file now: a FIFO blocks a reader for ever.
        if not bucket.is_regular_file(L.inbox_path(entry_name)):
            raise InboxProblem("not_a_regular_file", _not_regular(entry_name))
    try:
        options, sidecar_bytes = _options(bucket, sidecar)
        input_sha, content_sha = _hashes(bucket, rel, sidecar_bytes)
    except OSError as exc:  # unreadable, or gone since the listing
        raise InboxProblem("unreadable", f"cannot read {name}: {exc.strerror or exc}") from None
    batch_id = L.content_batch_id(content_sha)
    target = L.batch_file(batch_id, L.INPUT)
    catalog = lifecycle.catalog
    row = catalog.batches.get(batch_id)
    exists = row is not None and bucket.exists(target)
    if exists and row["original_filename"] == name[:255] and bucket.sha256(target) == input_sha:
        # The batch's input is in place and the same drop is still in the inbox: an object
        # store moves by copying, then deleting, and a tick died between the two. The take is
        # finished (a run asked for again is one Dagster has seen: its run key is the same).
        bucket.remove(rel)
        return _finish_take(bucket, name, sidecar, batch_id, options, input_sha, log)
    if exists:
        moved_to = _free_name(bucket, L.INBOX_DUPLICATES, name)
        try:
            bucket.move(rel, moved_to)
            if sidecar is not None:
                bucket.move(
                    L.inbox_path(sidecar.name),
                    _free_name(bucket, L.INBOX_DUPLICATES, sidecar.name),
                )
        except OSError as exc:
            raise InboxProblem("cannot_move", f"cannot move {name}: {exc.strerror}") from None
        if log:
            log.info(
                f"{name} is identical to batch {batch_id}, which was submitted already: "
                f"no new run; the copy was moved to {moved_to}"
            )
        return batch_id, None
    # Recorded first (the batch, then its input file), then moved: a tick that dies in between
    # leaves the file in the inbox and the next tick finishes the move (the rows exist, the
    # input does not yet).
    created = lifecycle.create(
        batch_id,
        source="inbox",
        input_file_id=L.dropped_file_id(content_sha),
        original_filename=name[:255],
        content_sha256=content_sha,
        input_sha256=input_sha,
        completion_window=options.completion_window,
        metadata=options.metadata,
        options=options.model_dump(exclude_none=True, exclude={"metadata"}),
    )
    file_id = L.dropped_file_id(content_sha)
    # The batch names its input as an upload's batch names its file: GET /v1/files/{id} and its
    # content answer for it (the bytes are the batch's own input).
    if catalog.files.get(file_id) is None:
        catalog.files.create(
            file_id,
            filename=name[:255],
            purpose="batch",
            size=bucket.size(rel),
            path=target,
            sha256=input_sha,
        )
    try:
        bucket.move(rel, target)
    except OSError as exc:
        if created:  # its file's row stays, to be used when the move succeeds
            catalog.batches.delete_new(batch_id)
        raise InboxProblem("cannot_move", f"cannot move {name}: {exc.strerror}") from None
    return _finish_take(bucket, name, sidecar, batch_id, options, input_sha, log)


def _finish_take(
    bucket: Bucket,
    name: str,
    sidecar: BucketEntry | None,
    batch_id: str,
    options: BatchOptions,
    input_sha: str,
    log: dg.DagsterLogManager | None,
) -> tuple[str, dg.RunRequest]:
    """What follows the input's move into the batch's folder: the sidecar kept with the batch,
    and the run to request."""
    if sidecar is not None:
        # The options are in the catalog already; the sidecar is kept with the batch as a
        # record. One that cannot be moved stays, and is reported as left behind.
        try:
            bucket.move(L.inbox_path(sidecar.name), L.batch_file(batch_id, L.SIDECAR))
        except OSError as exc:
            if log:
                log.warning(f"{sidecar.name} stays in the inbox: {exc.strerror}")
    if log:
        log.info(f"{name} -> batch {batch_id}")
    return batch_id, dg.RunRequest(
        run_key=f"{batch_id}:{input_sha}",
        partition_key=batch_id,
        run_config=options.run_config(),
        tags=L.batch_run_tags(batch_id, name),
    )


def _not_regular(name: str) -> str:
    return (
        f"{name} is not a regular file (a FIFO, a socket or a device), which is never opened: "
        "write the batch as a plain file"
    )


def _keep_applied_sidecar(bucket: Bucket, catalog: Catalog, entry: BucketEntry) -> str | None:
    """A sidecar left in the inbox by a tick that died after taking its batch (its options are
    in the catalog, the batch's content hash includes its bytes) is moved to the batch it
    belongs to, as the take would have (or removed, where its copy is there already); that
    batch's id, or None."""
    stem = L.batch_stem(entry.name)
    for candidate in (f"{stem}.jsonl", f"{stem}.JSONL"):
        taken = catalog.batches.latest_named(candidate)
        if taken is None or entry.size > MAX_SIDECAR_BYTES:
            continue
        record = L.batch_file(taken["id"], L.SIDECAR)
        if not taken.get("input_sha256"):
            continue
        raw = bucket.read_bytes(L.inbox_path(entry.name))
        _, content = _hashes_of(taken["input_sha256"], raw)
        if content != taken["content_sha256"]:
            continue
        if not bucket.exists(record):
            bucket.move(L.inbox_path(entry.name), record)
        elif bucket.read_bytes(record) == raw:  # copied, not yet deleted (an object store)
            bucket.remove(L.inbox_path(entry.name))
        else:
            continue
        return taken["id"]
    return None


def _orphan_sidecar(catalog: Catalog, name: str) -> str:
    stem = L.batch_stem(name)
    message = (
        f"{name} has no {stem}.jsonl beside it: a sidecar is read when its .jsonl is taken, "
        "so write the sidecar first"
    )
    for candidate in (f"{stem}.jsonl", f"{stem}.JSONL"):
        taken = catalog.batches.latest_named(candidate)
        if taken is not None:
            return (
                f"{name} arrived after {candidate} was taken as {taken['id']}, so it was not "
                "applied; drop the file again with its sidecar written first"
            )
    return message


def evaluate(
    bucket: Bucket,
    lifecycle: BatchLifecycle,
    previous: dict[str, list[object]],
    log: dg.DagsterLogManager | None = None,
    budget_s: float = TICK_BUDGET_S,
) -> Tick:
    """One look at the inbox (the sensor's body, without Dagster's context). Files are taken
    for at most ``budget_s`` (a tick must end well within Dagster's sensor timeout); the rest
    wait for the next tick."""
    tick = Tick()
    deadline = time.monotonic() + budget_s
    entries = {e.name: e for e in bucket.list_entries(L.INBOX)}
    sidecars = {
        L.batch_stem(name).lower(): e
        for name, e in entries.items()
        if L.is_sidecar_name(name) and not e.is_dir and not e.is_link and not e.is_special
    }
    batch_stems = {
        L.batch_stem(name).lower()
        for name, e in entries.items()
        if L.is_batch_file_name(name) and not e.is_dir
    }
    for name, entry in entries.items():
        if L.is_temporary_name(name) or (entry.is_dir and name in L.INBOX_OWN_FOLDERS):
            continue
        if entry.is_dir:
            tick.problems[f"{name}/"] = (
                "sub_folder",
                f"sub-folders are not watched: move the files of {name}/ directly into inbox/",
            )
            continue
        if entry.is_link:
            tick.problems[name] = (
                "symlink",
                f"{name} is a symbolic link, which is not followed: copy the file into inbox/",
            )
            continue
        if entry.is_special:
            tick.problems[name] = ("not_a_regular_file", _not_regular(name))
            continue
        if L.is_sidecar_name(name):
            if L.batch_stem(name).lower() not in batch_stems:
                signature = _signature(entry)
                tick.seen[name] = signature
                if previous.get(name) == signature:
                    kept = _keep_applied_sidecar(bucket, lifecycle.catalog, entry)
                    if kept is not None:
                        tick.notes.append(f"{name}: kept with {kept}, whose options it holds")
                    else:
                        tick.problems[name] = (
                            "orphan_sidecar",
                            _orphan_sidecar(lifecycle.catalog, name),
                        )
            continue
        if not L.is_batch_file_name(name):
            tick.problems[name] = (
                "not_a_batch_file",
                f"{name} is not taken: only *.jsonl files (each with an optional "
                "*.metadata.json sidecar) are",
            )
            continue
        sidecar = sidecars.get(L.batch_stem(name).lower())
        signature = _signature(entry, sidecar)
        tick.seen[name] = signature
        if previous.get(name) != signature:
            tick.waiting.append(name)
            continue
        if time.monotonic() > deadline:
            # Time bounded: what is left is taken on the next tick (its signature is kept).
            tick.waiting.append(name)
            continue
        try:
            batch_id, request = take(bucket, lifecycle, name, sidecar, log)
        except InboxProblem as problem:
            tick.problems[name] = (problem.kind, problem.message)
            continue
        tick.seen.pop(name, None)
        if request is None:
            tick.notes.append(f"{name}: duplicate of {batch_id}")
        else:
            tick.run_requests.append(request)
    return tick


@dg.sensor(
    name=L.INBOX_SENSOR,
    job=batch_job,
    minimum_interval_seconds=1,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Turns each complete *.jsonl dropped into the bucket's inbox/ into a batch run.",
)
def inbox_sensor(
    context: dg.SensorEvaluationContext, bucket: Bucket, catalog: Catalog, webhooks: Webhooks
) -> dg.SensorResult | dg.SkipReason:
    cursor = json.loads(context.cursor) if context.cursor else {}
    lifecycle = BatchLifecycle(catalog, webhooks)
    tick = evaluate(bucket, lifecycle, cursor.get("seen", {}), context.log)
    for name, message in catalog.inbox.set_problems(tick.problems).items():
        context.log.warning(f"inbox: {name}: {message}")
    new_cursor = json.dumps({"seen": tick.seen}, sort_keys=True)
    if not tick.run_requests:
        context.update_cursor(new_cursor)
        parts = [f"{n}: {m}" for n, (_, m) in sorted(tick.problems.items())]
        parts += [f"{n}: waiting until it stops changing" for n in tick.waiting]
        parts += tick.notes
        return dg.SkipReason("; ".join(parts) or f"no complete *.jsonl in {L.INBOX}/")
    return batch_runs(tick.run_requests, new_cursor)
