"""The inbox sensor: complete files only, content-derived ids, no second run for a re-drop, and
every file it cannot take reported (in the tick, the catalog and the API) until it can."""

import json
import os

import dagster as dg
import pytest

from tests.conftest import chat_line, jsonl
from vbs_resources import layout as L
from vbs_sensors.inbox import inbox_sensor


def tick(instance, resources, cursor=None):
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)
    return inbox_sensor(context), context.cursor


def ticks(instance, resources, n=2, cursor=None):
    for _ in range(n):
        result, cursor = tick(instance, resources, cursor)
    return result, cursor


def drop(resources, name, data: bytes):
    with resources["bucket"].open(f"inbox/{name}", "wb") as fh:
        fh.write(data)


def problems(resources):
    return {p["name"]: p for p in resources["catalog"].inbox.problems()}


def test_file_is_taken_once_it_stops_changing(instance, resources):
    data = jsonl([chat_line("a", "hi")])
    drop(resources, "jobs.jsonl", data)
    result, cursor = tick(instance, resources)
    assert isinstance(result, dg.SkipReason) and "waiting" in result.skip_message

    result, cursor = tick(instance, resources, cursor)
    assert isinstance(result, dg.SensorResult)
    (request,) = result.run_requests
    batch_id = request.partition_key
    assert batch_id.startswith("batch_")
    assert request.run_key.startswith(f"{batch_id}:")
    assert result.dynamic_partitions_requests[0].partition_keys == [batch_id]
    bucket = resources["bucket"]
    assert bucket.exists(f"batches/{batch_id}/input.jsonl")
    assert not bucket.exists("inbox/jobs.jsonl")
    row = resources["catalog"].batches.get(batch_id)
    assert row["status"] == "validating" and row["original_filename"] == "jobs.jsonl"
    import hashlib

    assert row["input_sha256"] == hashlib.sha256(data).hexdigest()


def test_half_written_file_is_not_picked_up(instance, resources):
    drop(resources, "big.jsonl", jsonl([chat_line("a", "hi")])[:-20])
    _, cursor = tick(instance, resources)
    # The writer appends between ticks: still growing, so still not taken.
    with resources["bucket"].open("inbox/big.jsonl", "ab") as fh:
        fh.write(b"more")
    result, cursor = tick(instance, resources, cursor)
    assert isinstance(result, dg.SkipReason)
    assert resources["bucket"].exists("inbox/big.jsonl")
    # Temporary names (written, then renamed into place) are never considered.
    drop(resources, "next.jsonl.part", b"{}")
    drop(resources, ".hidden.jsonl", b"{}")
    result, cursor = tick(instance, resources, cursor)
    assert isinstance(result, dg.SensorResult)
    assert [r.tags["vbs/source_file"] for r in result.run_requests] == ["big.jsonl"]
    assert resources["bucket"].exists("inbox/next.jsonl.part")
    assert problems(resources) == {}


def test_identical_redrop_starts_no_second_run(instance, resources):
    data = jsonl([chat_line("a", "hi")])
    drop(resources, "jobs.jsonl", data)
    first, cursor = ticks(instance, resources)
    (first_request,) = first.run_requests

    drop(resources, "again.jsonl", data)
    second, cursor = ticks(instance, resources, cursor=cursor)
    assert isinstance(second, dg.SkipReason)
    assert f"duplicate of {first_request.partition_key}" in second.skip_message
    bucket = resources["bucket"]
    assert bucket.exists("inbox/duplicates/again.jsonl")
    assert resources["catalog"].batches.get(first_request.partition_key)["original_filename"] == (
        "jobs.jsonl"
    )


def test_sidecar_carries_metadata_and_options(instance, resources):
    sidecar = {"metadata": {"team": "search", "purpose": "eval"}, "chunk_size": 7}
    drop(resources, "jobs.metadata.json", json.dumps(sidecar).encode())
    drop(resources, "jobs.jsonl", jsonl([chat_line("a", "hi")]))
    result, _ = ticks(instance, resources)
    (request,) = result.run_requests
    assert request.run_config["ops"]["batch_output"]["config"]["chunk_size"] == 7
    row = resources["catalog"].batches.get(request.partition_key)
    assert row["batch_metadata"] == {"team": "search", "purpose": "eval"}
    assert row["options"]["chunk_size"] == 7
    assert resources["bucket"].exists(f"batches/{request.partition_key}/sidecar.json")


def test_invalid_sidecar_is_reported_and_fixing_it_is_enough(instance, resources, caplog):
    drop(resources, "jobs.metadata.json", json.dumps({"metadata": {"k" * 80: "v"}}).encode())
    drop(resources, "jobs.jsonl", jsonl([chat_line("a", "hi")]))
    result, cursor = ticks(instance, resources)
    assert isinstance(result, dg.SkipReason)
    assert "jobs.jsonl" in result.skip_message and "64 characters" in result.skip_message
    [problem] = problems(resources).values()
    assert problem["kind"] == "invalid_sidecar" and "metadata" in problem["message"]
    assert resources["bucket"].exists("inbox/jobs.jsonl")
    # Reported once: the next tick logs nothing new about it.
    caplog.clear()
    result, cursor = tick(instance, resources, cursor)
    assert "jobs.jsonl" in result.skip_message
    assert not [r for r in caplog.records if "invalid" in r.getMessage()]
    # Fixing the sidecar alone (the .jsonl is not touched) is enough.
    drop(resources, "jobs.metadata.json", json.dumps({"metadata": {"k": "v"}}).encode())
    result, cursor = ticks(instance, resources, cursor=cursor)
    assert isinstance(result, dg.SensorResult)
    assert problems(resources) == {}


@pytest.mark.parametrize(
    "sidecar, field",
    [
        ('{"metadata": {"k": "\\ud800"}}', "metadata.k"),
        ('{"chunk_size": NaN}', None),
        ('{"metadata": {}, "metadata": {"k": "v"}}', "metadata"),
        ('{"chunk_size": "7"}', "chunk_size"),
        ('{"batch_id": "batch_0123456789abcdef"}', "batch_id"),
        ("[1, 2]", None),
    ],
)
def test_hostile_sidecars_are_problems_never_crashes(instance, resources, sidecar, field):
    drop(resources, "jobs.metadata.json", sidecar.encode())
    drop(resources, "jobs.jsonl", jsonl([chat_line("a", "hi")]))
    result, _ = ticks(instance, resources)
    assert isinstance(result, dg.SkipReason)
    [problem] = problems(resources).values()
    assert problem["kind"] == "invalid_sidecar"
    if field:
        assert field in problem["message"]
    assert resources["catalog"].batches.list() == []


def test_a_drop_cannot_take_over_another_batch(instance, resources):
    """A sidecar naming an existing batch's id is refused; that batch is left as it was."""
    drop(resources, "first.jsonl", jsonl([chat_line("a", "hi")]))
    first, cursor = ticks(instance, resources)
    victim = first.run_requests[0].partition_key
    before = resources["catalog"].batches.get(victim)
    input_before = resources["bucket"].read_bytes(f"batches/{victim}/input.jsonl")

    drop(resources, "evil.metadata.json", json.dumps({"batch_id": victim}).encode())
    drop(resources, "evil.jsonl", jsonl([chat_line("b", "other content")]))
    result, _ = ticks(instance, resources, cursor=cursor)
    assert isinstance(result, dg.SkipReason)
    assert problems(resources)["evil.jsonl"]["kind"] == "invalid_sidecar"
    assert resources["catalog"].batches.get(victim) == before
    assert resources["bucket"].read_bytes(f"batches/{victim}/input.jsonl") == input_before


def test_unmovable_file_stays_is_reported_and_is_retried_every_tick(
    instance, resources, monkeypatch
):
    drop(resources, "jobs.jsonl", jsonl([chat_line("a", "hi")]))
    bucket = type(resources["bucket"])

    def refuse(self, src, dst):
        raise PermissionError(1, "Operation not permitted")

    _, cursor = tick(instance, resources)
    monkeypatch.setattr(bucket, "move", refuse)
    result, cursor = tick(instance, resources, cursor)
    assert isinstance(result, dg.SkipReason)
    assert "cannot move jobs.jsonl" in result.skip_message
    assert problems(resources)["jobs.jsonl"]["kind"] == "cannot_move"
    assert resources["bucket"].exists("inbox/jobs.jsonl")
    assert resources["catalog"].batches.list() == []  # nothing half-recorded
    # The cause goes away; the file itself is not touched: the next tick takes it.
    monkeypatch.undo()
    result, cursor = tick(instance, resources, cursor)
    assert isinstance(result, dg.SensorResult)
    assert problems(resources) == {}


def test_a_tick_that_died_between_recording_and_moving_is_finished_by_the_next(
    instance, resources, monkeypatch
):
    drop(resources, "jobs.jsonl", jsonl([chat_line("a", "hi")]))
    _, cursor = tick(instance, resources)
    bucket = type(resources["bucket"])

    def die(self, src, dst):
        raise KeyboardInterrupt  # the daemon is killed mid-tick

    monkeypatch.setattr(bucket, "move", die)
    with pytest.raises(KeyboardInterrupt):
        tick(instance, resources, cursor)
    [row] = resources["catalog"].batches.list()
    monkeypatch.undo()
    result, _ = tick(instance, resources, cursor)  # the cursor did not move
    assert [r.partition_key for r in result.run_requests] == [row["id"]]
    assert resources["bucket"].exists(f"batches/{row['id']}/input.jsonl")


def test_upper_case_suffix_is_taken(instance, resources):
    drop(resources, "UPPER.JSONL", jsonl([chat_line("a", "hi")]))
    result, _ = ticks(instance, resources)
    assert [r.tags["vbs/source_file"] for r in result.run_requests] == ["UPPER.JSONL"]


def test_sub_folders_symlinks_and_other_files_are_reported(instance, resources, tmp_path):
    inbox = resources["bucket"].path("inbox")
    os.makedirs(f"{inbox}/team-a")
    secret = tmp_path / "secret.jsonl"
    secret.write_bytes(jsonl([chat_line("s", "not yours")]))
    os.symlink(secret, f"{inbox}/link.jsonl")
    drop(resources, "notes.txt", b"hello")
    result, _ = ticks(instance, resources)
    assert isinstance(result, dg.SkipReason)
    found = {name: p["kind"] for name, p in problems(resources).items()}
    assert found == {
        "team-a/": "sub_folder",
        "link.jsonl": "symlink",
        "notes.txt": "not_a_batch_file",
    }
    assert resources["catalog"].batches.list() == []  # the link's target was never read


def test_a_sidecar_arriving_after_its_file_is_reported(instance, resources):
    drop(resources, "jobs.jsonl", jsonl([chat_line("a", "hi")]))
    result, cursor = ticks(instance, resources)
    batch_id = result.run_requests[0].partition_key
    drop(resources, "jobs.metadata.json", json.dumps({"chunk_size": 3}).encode())
    result, cursor = ticks(instance, resources, cursor=cursor)
    problem = problems(resources)["jobs.metadata.json"]
    assert problem["kind"] == "orphan_sidecar" and batch_id in problem["message"]


def test_cursor_survives_a_restart(instance, resources):
    """A new daemon gets the stored cursor: a file seen once is taken on its first tick."""
    drop(resources, "jobs.jsonl", jsonl([chat_line("a", "hi")]))
    _, cursor = tick(instance, resources)
    restarted = json.loads(json.dumps(cursor))  # what Dagster persisted
    result, _ = tick(instance, resources, restarted)
    assert isinstance(result, dg.SensorResult)


def test_lines_appended_after_pick_up_fail_the_batch(instance, resources):
    """A writer that kept its handle open and appended after the file was taken: the batch is
    checked against the hash it was taken with, and fails with the reason."""
    from vbs_assets.ingest import batch_input

    drop(resources, "open.jsonl", jsonl([chat_line("a", "hi"), chat_line("b", "hi")]))
    result, _ = ticks(instance, resources)
    batch_id = result.run_requests[0].partition_key
    instance.add_dynamic_partitions(L.BATCH_PARTITIONS, [batch_id])
    with resources["bucket"].open(f"batches/{batch_id}/input.jsonl", "ab") as fh:
        fh.write(jsonl([chat_line("c", "late")]))
    run = dg.materialize(
        [batch_input],
        partition_key=batch_id,
        instance=instance,
        resources=resources,
        raise_on_error=False,
    )
    assert not run.success
    row = resources["catalog"].batches.get(batch_id)
    assert row["status"] == "failed"
    assert [e["code"] for e in row["errors"]] == ["input_changed"]
    assert not resources["bucket"].exists(f"batches/{batch_id}/requests.parquet")


def test_an_unreadable_file_is_a_problem_and_the_others_are_still_taken(
    instance, resources, monkeypatch
):
    drop(resources, "a-locked.jsonl", jsonl([chat_line("a", "hi")]))
    drop(resources, "b-fine.jsonl", jsonl([chat_line("b", "hi")]))
    _, cursor = tick(instance, resources)
    bucket = type(resources["bucket"])
    real = bucket.sha256

    def locked(self, rel, *args, **kwargs):
        if rel.endswith("a-locked.jsonl"):
            raise PermissionError(13, "Permission denied")
        return real(self, rel, *args, **kwargs)

    monkeypatch.setattr(bucket, "sha256", locked)
    result, cursor = tick(instance, resources, cursor)
    assert [r.tags["vbs/source_file"] for r in result.run_requests] == ["b-fine.jsonl"]
    assert problems(resources)["a-locked.jsonl"]["kind"] == "unreadable"


def test_a_fifo_and_a_socket_in_the_inbox_are_problems_never_opened(instance, resources):
    """A FIFO blocked the hash for ever (each tick timed out, the code location died, and every
    sensor stopped). Anything but a regular file is now a reported problem, never opened, and
    the valid file beside them is taken on the same ticks."""
    import socket
    import threading

    inbox = resources["bucket"].path("inbox")
    os.makedirs(inbox, exist_ok=True)
    os.mkfifo(f"{inbox}/x.jsonl")
    os.mkfifo(f"{inbox}/y.metadata.json")
    server = socket.socket(socket.AF_UNIX)
    server.bind(f"{inbox}/s.jsonl")
    drop(resources, "y.jsonl", jsonl([chat_line("a", "hi")]))
    drop(resources, "valid.jsonl", jsonl([chat_line("v", "hi")]))
    outcome: dict = {}

    def evaluate() -> None:
        outcome["result"] = ticks(instance, resources)[0]

    worker = threading.Thread(target=evaluate, daemon=True)
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), "a tick blocked on a special file"
    taken = {r.tags["vbs/source_file"] for r in outcome["result"].run_requests}
    assert taken == {"valid.jsonl", "y.jsonl"}  # y's sidecar, a FIFO, is not read as its sidecar
    found = {name: p["kind"] for name, p in problems(resources).items()}
    assert found == {"x.jsonl": "not_a_regular_file", "s.jsonl": "not_a_regular_file",
                     "y.metadata.json": "not_a_regular_file"}  # fmt: skip
    assert "never opened" in problems(resources)["x.jsonl"]["message"]
    server.close()


def test_a_file_replaced_by_a_fifo_after_the_listing_is_not_opened(instance, resources):
    from vbs_resources.lifecycle import BatchLifecycle
    from vbs_sensors.inbox import InboxProblem, take

    inbox = resources["bucket"].path("inbox")
    os.makedirs(inbox, exist_ok=True)
    os.mkfifo(f"{inbox}/late.jsonl")
    with pytest.raises(InboxProblem) as caught:
        take(resources["bucket"], BatchLifecycle(resources["catalog"]), "late.jsonl", None)
    assert caught.value.kind == "not_a_regular_file"


def test_a_tick_takes_files_for_a_bounded_time_and_leaves_the_rest(instance, resources):
    from vbs_resources.lifecycle import BatchLifecycle
    from vbs_sensors.inbox import evaluate

    for n in range(3):
        drop(resources, f"f{n}.jsonl", jsonl([chat_line(f"a{n}", "hi")]))
    lifecycle = BatchLifecycle(resources["catalog"])
    first = evaluate(resources["bucket"], lifecycle, {})
    spent = evaluate(resources["bucket"], lifecycle, first.seen, budget_s=0)
    assert spent.run_requests == [] and sorted(spent.waiting) == [
        "f0.jsonl",
        "f1.jsonl",
        "f2.jsonl",
    ]
    later = evaluate(resources["bucket"], lifecycle, spent.seen)
    assert len(later.run_requests) == 3


def test_a_dropped_files_batch_names_an_input_file_that_answers(instance, resources):
    """Inbox batches named file-<sha24>, which answered 404 at GET /v1/files/{id}: the sensor
    registers the batch's input as that file, and deleting the record keeps the batch's input."""
    from vbs_api.service import BatchService
    from vbs_resources.lifecycle import BatchLifecycle

    data = jsonl([chat_line("a", "hi")])
    drop(resources, "named.jsonl", data)
    result, _ = ticks(instance, resources)
    batch = resources["catalog"].batches.get(result.run_requests[0].partition_key)
    catalog, bucket = resources["catalog"], resources["bucket"]
    row = catalog.files.get(batch["input_file_id"])
    assert (row["filename"], row["purpose"], row["bytes"]) == ("named.jsonl", "batch", len(data))
    assert bucket.read_bytes(row["path"]) == data and row["sha256"] == batch["input_sha256"]
    service = BatchService(
        bucket, catalog, BatchLifecycle(catalog), None, resources["conquest_types"]
    )
    assert service.file_row(batch["input_file_id"])["id"] == batch["input_file_id"]
    service.delete_file(batch["input_file_id"])
    assert catalog.files.get(batch["input_file_id"]) is None
    assert bucket.read_bytes(f"batches/{batch['id']}/input.jsonl") == data  # the batch's own
