"""The inbox sensor: a complete ``*.jsonl`` dropped into ``inbox/`` becomes a batch run.

When is a file complete? Either it was written under another name (one starting with ``.`` or
not ending in ``.jsonl``, e.g. ``jobs.jsonl.part``) and renamed into place, which is atomic; or
its size and modification time are unchanged between two ticks (about five seconds apart:
Dagster's sensor daemon evaluates sensors at most every 5 s). A file still
growing is left for a later tick. An optional sidecar ``<name>.metadata.json`` (written *before*
the ``.jsonl``) carries the OpenAI batch ``metadata`` and options.

The batch id is derived from the content (file and sidecar), so the same bytes dropped again
are recognized: the sensor says so, moves the copy to ``inbox/duplicates/`` and starts nothing.
The cursor (what each file looked like on the previous tick) is stored by Dagster and survives
daemon restarts.
"""

import hashlib
import json
import posixpath

import dagster as dg
from pydantic import ValidationError

from vbs_assets.jobs import batch_job
from vbs_assets.partitions import batch_partitions
from vbs_assets.schemas import BatchOptions, batch_run_tags
from vbs_resources import Bucket, Catalog, batch_file
from vbs_resources.bucket import BucketEntry

INBOX = "inbox"
SIDECAR_SUFFIX = ".metadata.json"


def _signature(entry: BucketEntry) -> list[object]:
    return [entry.size, entry.modified]


def _is_batch_file(name: str) -> bool:
    return name.endswith(".jsonl") and not name.startswith(".")


def _content_hash(bucket: Bucket, rel: str, sidecar: bytes) -> str:
    digest = hashlib.sha256()
    with bucket.open(rel, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    digest.update(b"\0sidecar\0" + sidecar)
    return digest.hexdigest()


def _free_name(bucket: Bucket, folder: str, name: str) -> str:
    candidate, n = f"{folder}/{name}", 1
    while bucket.exists(candidate):
        stem, ext = posixpath.splitext(name)
        candidate, n = f"{folder}/{stem}.{n}{ext}", n + 1
    return candidate


@dg.sensor(
    job=batch_job,
    minimum_interval_seconds=1,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Turns each complete *.jsonl dropped into the bucket's inbox/ into a batch run.",
)
def inbox_sensor(
    context: dg.SensorEvaluationContext, bucket: Bucket, catalog: Catalog
) -> dg.SensorResult | dg.SkipReason:
    cursor = json.loads(context.cursor) if context.cursor else {}
    previous: dict[str, list[object]] = cursor.get("seen", {})
    reported: dict[str, list[object]] = cursor.get("reported", {})
    entries = {e.name: e for e in bucket.list_files(INBOX)}

    seen: dict[str, list[object]] = {}
    run_requests: list[dg.RunRequest] = []
    new_partitions: list[str] = []
    notes: list[str] = []
    for name, entry in entries.items():
        if not _is_batch_file(name):
            continue
        signature = _signature(entry)
        if previous.get(name) != signature:
            seen[name] = signature  # new or still changing: look again next tick
            notes.append(f"{name}: waiting until it stops changing")
            continue
        if reported.get(name) == signature:
            seen[name] = signature  # already reported as unusable; unchanged since
            continue
        rel = f"{INBOX}/{name}"
        sidecar_name = name[: -len(".jsonl")] + SIDECAR_SUFFIX
        sidecar = bucket.open(f"{INBOX}/{sidecar_name}").read() if sidecar_name in entries else b""
        try:
            options = BatchOptions.model_validate_json(sidecar) if sidecar else BatchOptions()
        except ValidationError as exc:
            context.log.error(f"{sidecar_name} is not a valid batch sidecar; {name} stays: {exc}")
            reported[name] = seen[name] = signature
            continue
        sha = _content_hash(bucket, rel, sidecar)
        batch_id = options.batch_id or f"batch_{sha[:32]}"
        target = batch_file(batch_id, "input.jsonl")
        duplicate = bucket.exists(target)
        try:
            if duplicate:
                moved_to = _free_name(bucket, f"{INBOX}/duplicates", name)
                bucket.move(rel, moved_to)
                if sidecar:
                    bucket.move(
                        f"{INBOX}/{sidecar_name}",
                        _free_name(bucket, f"{INBOX}/duplicates", sidecar_name),
                    )
                context.log.info(
                    f"{name} is identical to batch {batch_id}, which was submitted already: "
                    f"no new run; the copy was moved to {moved_to}"
                )
            else:
                if sidecar:
                    bucket.move(f"{INBOX}/{sidecar_name}", batch_file(batch_id, "sidecar.json"))
                bucket.move(rel, target)
                context.log.info(f"{name} -> batch {batch_id}")
        except OSError as exc:
            context.log.error(f"could not move {rel}; it stays in the inbox: {exc}")
            reported[name] = seen[name] = signature
            continue
        # A tick that died after the move is completed by the next one; both steps below are
        # idempotent (the catalog keeps the first record, Dagster drops a repeated run key).
        catalog.create_batch(
            batch_id,
            source="api" if options.batch_id else "inbox",
            content_sha256=sha,
            original_filename=name,
            completion_window=options.completion_window,
            metadata=options.metadata,
            # A dropped file gets a content-derived file id, as an uploaded one gets its own.
            input_file_id=options.input_file_id or f"file-{sha[:24]}",
        )
        new_partitions.append(batch_id)
        run_requests.append(
            dg.RunRequest(
                run_key=f"{batch_id}:{sha}",
                partition_key=batch_id,
                run_config=options.run_config(),
                tags=batch_run_tags(batch_id, name),
            )
        )
        if duplicate:
            notes.append(f"{name}: duplicate of {batch_id}")
    # Forget reports about files that are gone, so the cursor stays as small as the inbox.
    new_cursor = json.dumps(
        {"seen": seen, "reported": {k: v for k, v in reported.items() if k in entries}},
        sort_keys=True,
    )
    if not run_requests:
        context.update_cursor(new_cursor)
        return dg.SkipReason("; ".join(notes) or f"no complete *.jsonl in {INBOX}/")
    return dg.SensorResult(
        run_requests=run_requests,
        dynamic_partitions_requests=[
            batch_partitions.build_add_request(sorted(set(new_partitions)))
        ],
        cursor=new_cursor,
    )
