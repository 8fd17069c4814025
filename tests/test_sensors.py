"""The inbox sensor: complete files only, content-derived ids, no second run for a re-drop."""

import json
import os

import dagster as dg

from tests.conftest import chat_line, jsonl
from vbs_sensors.inbox import inbox_sensor


def tick(instance, resources, cursor=None):
    context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)
    return inbox_sensor(context), context.cursor


def drop(resources, name, data: bytes):
    with resources["bucket"].open(f"inbox/{name}", "wb") as fh:
        fh.write(data)


def test_file_is_taken_once_it_stops_changing(instance, resources):
    drop(resources, "jobs.jsonl", jsonl([chat_line("a", "hi")]))
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
    row = resources["catalog"].get_batch(batch_id)
    assert row["status"] == "validating" and row["original_filename"] == "jobs.jsonl"


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


def test_identical_redrop_starts_no_second_run(instance, resources):
    data = jsonl([chat_line("a", "hi")])
    drop(resources, "jobs.jsonl", data)
    _, cursor = tick(instance, resources)
    first, cursor = tick(instance, resources, cursor)
    (first_request,) = first.run_requests

    drop(resources, "again.jsonl", data)
    _, cursor = tick(instance, resources, cursor)
    second, cursor = tick(instance, resources, cursor)
    # Same content, same batch id and run key: Dagster drops a run key it has seen.
    (second_request,) = second.run_requests
    assert second_request.run_key == first_request.run_key
    bucket = resources["bucket"]
    assert bucket.exists("inbox/duplicates/again.jsonl")
    assert resources["catalog"].get_batch(first_request.partition_key)["original_filename"] == (
        "jobs.jsonl"
    )


def test_sidecar_carries_metadata_and_options(instance, resources):
    sidecar = {"metadata": {"team": "search", "purpose": "eval"}, "chunk_size": 7}
    drop(resources, "jobs.metadata.json", json.dumps(sidecar).encode())
    drop(resources, "jobs.jsonl", jsonl([chat_line("a", "hi")]))
    _, cursor = tick(instance, resources)
    result, _ = tick(instance, resources, cursor)
    (request,) = result.run_requests
    assert request.run_config["ops"]["batch_output"]["config"]["chunk_size"] == 7
    row = resources["catalog"].get_batch(request.partition_key)
    assert row["batch_metadata"] == {"team": "search", "purpose": "eval"}
    assert resources["bucket"].exists(f"batches/{request.partition_key}/sidecar.json")


def test_invalid_sidecar_is_reported_once_and_nothing_moves(instance, resources, caplog):
    drop(resources, "jobs.metadata.json", json.dumps({"metadata": {"k" * 80: "v"}}).encode())
    drop(resources, "jobs.jsonl", jsonl([chat_line("a", "hi")]))
    _, cursor = tick(instance, resources)
    result, cursor = tick(instance, resources, cursor)
    assert isinstance(result, dg.SkipReason)
    assert json.loads(cursor)["reported"]["jobs.jsonl"]
    assert resources["bucket"].exists("inbox/jobs.jsonl")
    assert resources["bucket"].exists("inbox/jobs.metadata.json")


def test_unmovable_file_stays_and_is_reported(instance, resources, monkeypatch):
    drop(resources, "jobs.jsonl", jsonl([chat_line("a", "hi")]))
    bucket = type(resources["bucket"])

    def refuse(self, src, dst):
        raise PermissionError(f"read-only: {src}")

    _, cursor = tick(instance, resources)
    monkeypatch.setattr(bucket, "move", refuse)
    result, cursor = tick(instance, resources, cursor)
    assert isinstance(result, dg.SkipReason)
    assert resources["bucket"].exists("inbox/jobs.jsonl")
    assert "jobs.jsonl" in json.loads(cursor)["reported"]
    # Unchanged, it is not retried on every tick; touched, it is looked at again.
    monkeypatch.undo()
    result, cursor = tick(instance, resources, cursor)
    assert isinstance(result, dg.SkipReason)
    path = resources["bucket"].path("inbox/jobs.jsonl")
    os.utime(path, (1, 1))
    _, cursor = tick(instance, resources, cursor)
    result, cursor = tick(instance, resources, cursor)
    assert isinstance(result, dg.SensorResult)


def test_cursor_survives_a_restart(instance, resources):
    """A new daemon gets the stored cursor: a file seen once is taken on its first tick."""
    drop(resources, "jobs.jsonl", jsonl([chat_line("a", "hi")]))
    _, cursor = tick(instance, resources)
    restarted = json.loads(json.dumps(cursor))  # what Dagster persisted
    result, _ = tick(instance, resources, restarted)
    assert isinstance(result, dg.SensorResult)
