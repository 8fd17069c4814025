"""The bucket on S3 (``VBS_BUCKET_URL=s3://bucket/prefix``, through s3fs), against the session's
real S3 server (moto's server mode on 127.0.0.1, tests/s3.py), nothing mocked.

The inbox keeps the folder's guarantees on S3: the inbox sensor's own tests run again here
against a bucket on the server (imported below, with this module's ``resources``), and the
guarantees an object store makes different are tested on their own: an upload still in progress
is never listed, a move is a copy then a delete, and a tick killed at any step of a take loses
nothing and runs nothing twice."""

from __future__ import annotations

import hashlib

import dagster as dg
import pytest

from tests.conftest import chat_line, jsonl, resources_for
from tests.test_sensors import (  # noqa: F401 - collected here, on S3
    test_a_drop_cannot_take_over_another_batch,
    test_a_dropped_files_batch_names_an_input_file_that_answers,
    test_a_tick_that_died_between_recording_and_moving_is_finished_by_the_next,
    test_cursor_survives_a_restart,
    test_file_is_taken_once_it_stops_changing,
    test_identical_redrop_starts_no_second_run,
    test_invalid_sidecar_is_reported_and_fixing_it_is_enough,
    test_sidecar_carries_metadata_and_options,
    test_upper_case_suffix_is_taken,
    tick,
    ticks,
)
from vbs_resources.bucket import Bucket, local_folder, upload_folder


@pytest.fixture
def bucket_url(s3) -> str:
    return s3.bucket_url()


@pytest.fixture
def resources(home, model_dir, bucket_url):
    """The sensor tests' resources, with the bucket on S3."""
    found = resources_for(home, model_dir, VBS_BUCKET_URL=bucket_url)
    assert not found["bucket"].is_local
    return found


def put(bucket: Bucket, rel: str, data: bytes) -> None:
    """One PUT, as `aws s3 cp` or a team's writer does."""
    with bucket.fs.open(bucket.path(rel), "wb") as fh:
        fh.write(data)


def test_a_write_is_whole_or_absent_and_an_old_object_survives_a_failed_one(bucket_url):
    bucket = Bucket(url=bucket_url)
    bucket.write_bytes("a/results.parquet", b"old")
    with pytest.raises(RuntimeError), bucket.atomic_writer("a/results.parquet") as fh:
        fh.write(b"new, half")
        raise RuntimeError("the writer dies")
    assert bucket.read_bytes("a/results.parquet") == b"old"
    with pytest.raises(RuntimeError), bucket.atomic_writer("a/never.jsonl") as fh:
        fh.write(b"x" * (9 * 1024 * 1024))  # past one multipart part: an upload was begun
        raise RuntimeError("the writer dies")
    assert not bucket.exists("a/never.jsonl")
    staged = bucket.stage("a/upload.jsonl")
    staged.write(b"partial")
    staged.abort()
    assert not bucket.exists("a/upload.jsonl")
    staged = bucket.stage("a/upload.jsonl")
    staged.write(b"whole")
    assert staged.commit() == hashlib.sha256(b"whole").hexdigest()
    assert bucket.read_bytes("a/upload.jsonl") == b"whole"
    # A listing sees what another client put a moment ago (no listing cache).
    assert [e.name for e in bucket.list_files("a")] == ["results.parquet", "upload.jsonl"]
    put(Bucket(url=bucket_url), "a/late.jsonl", b"1")
    assert "late.jsonl" in [e.name for e in bucket.list_files("a")]


def test_an_upload_in_progress_is_not_taken_until_it_completes(instance, resources):
    """A multipart upload with parts sent but not completed is no object yet: ticks take
    nothing; once it completes, the next ticks take it whole."""
    bucket = resources["bucket"]
    line = jsonl([chat_line("a", "x" * 1000)])
    data = line * (6 * 1024 * 1024 // len(line) + 1)  # over one 5 MiB part
    fh = bucket.fs.open(bucket.path("inbox/big.jsonl"), "wb", block_size=5 * 1024 * 1024)
    fh.write(data[: 5 * 1024 * 1024 + 10])
    fh.flush()  # the first part is uploaded
    assert fh.mpu is not None
    result, cursor = ticks(instance, resources, n=3)
    assert isinstance(result, dg.SkipReason) and not resources["catalog"].batches.list()
    fh.write(data[5 * 1024 * 1024 + 10 :])
    fh.close()
    result, _ = ticks(instance, resources, n=2, cursor=cursor)
    [request] = result.run_requests
    taken = bucket.read_bytes(f"batches/{request.partition_key}/input.jsonl")
    assert hashlib.sha256(taken).digest() == hashlib.sha256(data).digest()


def test_new_bytes_under_an_old_name_are_a_new_batch(instance, resources):
    bucket = resources["bucket"]
    first, second = jsonl([chat_line("a", "one")]), jsonl([chat_line("a", "two")])
    put(bucket, "inbox/jobs.jsonl", first)
    result, cursor = ticks(instance, resources)
    [one] = result.run_requests
    put(bucket, "inbox/jobs.jsonl", second)
    requests = []
    for _ in range(2):  # an object is whole once listed: it may be taken on the first tick
        result, cursor = tick(instance, resources, cursor)
        requests += result.run_requests if isinstance(result, dg.SensorResult) else []
    [two] = requests
    assert one.partition_key != two.partition_key
    assert bucket.read_bytes(f"batches/{one.partition_key}/input.jsonl") == first
    assert bucket.read_bytes(f"batches/{two.partition_key}/input.jsonl") == second
    assert not bucket.list_files("inbox")


class Killed(BaseException):
    """The daemon killed mid-tick (not an Exception: nothing may catch it)."""


def test_a_tick_killed_at_any_step_of_a_take_loses_nothing_and_runs_once(
    instance, home, model_dir, s3, monkeypatch
):
    """Every step of a take that touches the store or the catalog (the batch recorded, the
    copy, the delete, the file recorded, the sidecar's copy and delete) is killed in turn; the
    ticks after it finish the take. Each time: one batch, its input whole, the inbox empty, the
    file answerable, and at most one run asked for (a batch left without one is the
    reconciler's, which asks for it once)."""
    data = jsonl([chat_line("a", "hi"), chat_line("b", "there")])
    sidecar = b'{"metadata": {"team": "search"}}'
    step = 0
    while True:
        resources = resources_for(home / str(step), model_dir, VBS_BUCKET_URL=s3.bucket_url())
        bucket, catalog = resources["bucket"], resources["catalog"]
        put(bucket, "inbox/jobs.metadata.json", sidecar)
        put(bucket, "inbox/jobs.jsonl", data)
        _, cursor = tick(instance, resources)  # seen once: the next tick takes it
        calls = {"n": 0, "die_at": step + 1}

        def dying(original, calls=calls):
            def call(*args, **kwargs):
                calls["n"] += 1
                if calls["n"] == calls["die_at"]:
                    raise Killed
                return original(*args, **kwargs)

            return call

        with monkeypatch.context() as patch:
            patch.setattr(bucket.fs, "copy", dying(bucket.fs.copy))
            patch.setattr(bucket.fs, "rm", dying(bucket.fs.rm))
            # The stores are made per use: their classes are patched.
            files, batches = type(catalog.files), type(catalog.batches)
            patch.setattr(files, "create", dying(files.create))
            patch.setattr(batches, "insert", dying(batches.insert))
            try:
                result, cursor = tick(instance, resources, cursor)
                killed = False
            except Killed:
                killed = True
        requests = [] if killed else list(result.run_requests)
        for _ in range(3):
            result, cursor = tick(instance, resources, cursor)
            if isinstance(result, dg.SensorResult):
                requests += result.run_requests
        [row] = catalog.batches.list()
        batch_id = row["id"]
        assert bucket.read_bytes(f"batches/{batch_id}/input.jsonl") == data, step
        assert not bucket.list_files("inbox"), (step, bucket.list_files("inbox"))
        assert row["batch_metadata"] == {"team": "search"}, step
        assert catalog.files.get(row["input_file_id"]) is not None, step
        assert [r.partition_key for r in requests] in ([batch_id], []), step
        assert len({r.run_key for r in requests}) == len(requests), step
        if not killed:
            assert step > 0 and requests, "the first step was never killed"
            break
        step += 1
    assert step == 6  # record, copy, delete, file, the sidecar's copy and delete: each killed


def test_a_folder_in_the_bucket_is_copied_locally_once_per_content(bucket_url, tmp_path):
    """Adapters trained into the bucket are read by vLLM from a local copy."""
    source = tmp_path / "adapter"
    (source / "sub").mkdir(parents=True)
    (source / "adapter_config.json").write_text('{"r": 8}')
    (source / "sub" / "weights.bin").write_bytes(b"\0" * 1000)
    bucket = Bucket(url=bucket_url)
    upload_folder(bucket, source, "adapters/job-1")
    url = bucket.uri("adapters/job-1")
    assert url.startswith("s3://")
    local = local_folder(url, tmp_path / "cache")
    assert (tmp_path / "cache").is_dir() and local.startswith(str(tmp_path / "cache"))
    assert open(f"{local}/adapter_config.json").read() == '{"r": 8}'
    assert open(f"{local}/sub/weights.bin", "rb").read() == b"\0" * 1000
    assert local_folder(url, tmp_path / "cache") == local  # once
    assert local_folder(str(source)) == str(source)  # a local folder is used where it is


def test_vbs_doctor_checks_an_s3_bucket_by_writing_to_it(bucket_url, home):
    from tests.conftest import settings_for
    from vbs_cli.doctor import bucket as check_bucket

    check = check_bucket(settings_for(home, VBS_BUCKET_URL=bucket_url), 10)
    assert check.ok, check
    assert bucket_url in check.detail and "writable" in check.detail
    assert not Bucket(url=bucket_url).list_entries(".doctor")  # the probe is removed


def test_vbs_serve_refuses_a_bucket_it_cannot_reach_in_one_line(tmp_path):
    """An S3 endpoint that answers nothing: `vbs serve` stops before starting anything, with
    one line naming the setting, not a traceback."""
    import os
    import subprocess
    import sys

    from tests.conftest import free_port

    env = {
        **os.environ,
        "VBS_HOME": str(tmp_path / "vbs"),
        "VBS_BUCKET_URL": "s3://vbs-unreachable/x",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
        "AWS_MAX_ATTEMPTS": "1",
    }
    done = subprocess.run([sys.executable, "-m", "vbs_cli.main", "serve"], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("vbs: VBS_BUCKET_URL=s3://vbs-unreachable/x: the bucket cannot be used")
    assert not (tmp_path / "vbs" / "serve.lock").exists()
