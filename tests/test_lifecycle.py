"""The batch lifecycle and the catalog under it: conditional transitions, one event per ending,
races, immutable ended batches (also when Dagster materializes them again), migrations."""

import multiprocessing
import sqlite3
import threading

import dagster as dg
import pytest
import sqlalchemy as sa

from tests.conftest import chat_line, materialize_batch, metadata_of, submit
from vbs_resources import Catalog
from vbs_resources.lifecycle import ALLOWED_FROM, BatchLifecycle
from vbs_resources.wire import BATCH_STATUSES, TERMINAL_STATUSES, BatchErrorEntry


@pytest.fixture
def catalog(catalog_url):
    catalog = Catalog(url=catalog_url)
    yield catalog
    catalog.engine.dispose()


def new(lifecycle, batch_id="batch_life0001", status="validating"):
    lifecycle.create(batch_id, source="api", input_file_id="file-x")
    path = {
        "validating": [],
        "in_progress": ["start"],
        "finalizing": ["start", "finalizing"],
        "cancelling": ["request_cancel"],
    }[status]
    for step in path:
        getattr(lifecycle, step)(batch_id)
    assert lifecycle.catalog.batches.get(batch_id)["status"] == status
    return batch_id


def test_terminal_statuses_are_never_left():
    for to, sources in ALLOWED_FROM.items():
        assert not TERMINAL_STATUSES & set(sources), to
    assert set(ALLOWED_FROM) | {"validating"} == set(BATCH_STATUSES)


@pytest.mark.parametrize("ending", ["completed", "failed", "cancelled", "expired"])
def test_an_ended_batch_refuses_every_change(catalog, ending):
    lifecycle = BatchLifecycle(catalog)
    batch_id = new(lifecycle, status="in_progress")
    assert (
        lifecycle.fail(batch_id, [BatchErrorEntry(code="x", message="y")])
        if ending == "failed"
        else lifecycle.finish(batch_id, ending)
    )
    before = catalog.batches.get(batch_id)
    assert before[f"{ending}_at"] is not None
    for attempt in (
        lambda: lifecycle.start(batch_id),
        lambda: lifecycle.finish(batch_id, "completed"),
        lambda: lifecycle.finish(batch_id, "cancelled"),
        lambda: lifecycle.finish(batch_id, "expired"),
        lambda: lifecycle.fail(batch_id, []),
        lambda: lifecycle.record(batch_id, request_completed=99),
    ):
        assert attempt() is False
    assert lifecycle.request_cancel(batch_id) == ending
    after = catalog.batches.get(batch_id)
    assert {k: v for k, v in after.items() if k != "updated_at"} == {
        k: v for k, v in before.items() if k != "updated_at"
    }
    assert len(catalog.events.of_subject(batch_id)) == 1


def test_each_ending_has_exactly_one_event_and_its_timestamp(catalog):
    lifecycle = BatchLifecycle(catalog)
    batch_id = new(lifecycle, status="finalizing")
    assert lifecycle.finish(batch_id, "completed", request_completed=3)
    assert not lifecycle.finish(batch_id, "completed")
    [event] = catalog.events.of_subject(batch_id)
    assert event["type"] == "batch.completed" and event["delivered_at"]  # no URLs: handled
    row = catalog.batches.get(batch_id)
    assert row["completed_at"] >= row["finalizing_at"] >= row["in_progress_at"]
    assert row["request_completed"] == 3


def _race(catalog_url: str, batch_id: str, barrier: threading.Barrier, outcome: dict) -> None:
    from vbs_api.errors import APIError
    from vbs_api.service import BatchService

    catalog = Catalog(url=catalog_url)
    lifecycle = BatchLifecycle(catalog)
    service = BatchService(None, catalog, lifecycle)

    def complete():
        barrier.wait()
        outcome["completed"] = lifecycle.finish(batch_id, "completed")

    def cancel():
        barrier.wait()
        try:
            outcome["cancel"] = service.cancel_batch(batch_id).status
        except APIError as exc:
            outcome["cancel"] = exc.status

    threads = [threading.Thread(target=complete), threading.Thread(target=cancel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_cancel_racing_completion_never_leaves_a_completed_batch_cancelling(catalog):
    """300 trials of an API cancel against a run completing, at the same instant."""
    lifecycle = BatchLifecycle(catalog)
    seen = set()
    for trial in range(300):
        batch_id = new(lifecycle, f"batch_race{trial:06d}", status="finalizing")
        outcome: dict = {}
        _race(catalog.url, batch_id, threading.Barrier(2), outcome)
        status = catalog.batches.get(batch_id)["status"]
        if outcome["completed"]:
            # The cancel lost: the client was told, and the batch stays completed.
            assert status == "completed" and outcome["cancel"] in (400, "completed")
        else:
            assert status == "cancelling" and outcome["cancel"] == "cancelling"
        events = [e["type"] for e in catalog.events.of_subject(batch_id)]
        assert events == (["batch.completed"] if outcome["completed"] else [])
        seen.add(status)
    assert seen  # both outcomes are legal; which ones occur depends on timing


def test_a_run_that_finishes_after_a_late_cancel_ends_cancelled_keeping_results(
    resources, instance
):
    """The cancel arrives after the last chunk, before the run completes: cancelled wins, and
    the results are all there."""
    from vbs_assets.runner import BatchRunner
    from vbs_resources.lifecycle import BatchLifecycle

    batch_id = submit(resources, instance, [chat_line("a", "hi", max_tokens=2)])
    from vbs_assets.ingest import batch_input

    dg.materialize([batch_input], partition_key=batch_id, instance=instance, resources=resources)
    catalog = resources["catalog"]
    lifecycle = BatchLifecycle(catalog)

    class CancelAfterRun:
        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def run(self, endpoint, requests):
            results = self.inner.run(endpoint, requests)
            lifecycle.request_cancel(batch_id)
            return results

        def run_chunks(self, endpoint, chunks):  # through ``run`` above, chunk by chunk
            from vbs_resources import InferenceEngine

            return InferenceEngine.run_chunks(self, endpoint, chunks)

    runner = BatchRunner(
        resources["bucket"], catalog, lifecycle, CancelAfterRun(resources["engine"]), "r1", bool
    )
    report = runner.run(batch_id, 256)
    assert report.status == "cancelled" and report.completed == 1


def test_ended_batches_are_recorded_as_they_are_when_materialized_again(resources, instance):
    """Completed, failed at validation, cancelled: materializing again (as a backfill or the UI
    does) computes nothing, rewrites nothing, sends no event, changes no status or error."""
    bucket, catalog = resources["bucket"], resources["catalog"]
    done = submit(resources, instance, [chat_line("a", "hi", max_tokens=2)], name="done.jsonl")
    materialize_batch(resources, instance, done)
    invalid = submit(resources, instance, b"", name="empty.jsonl")
    materialize_batch(resources, instance, invalid, raise_on_error=False)
    cancelled = submit(resources, instance, [chat_line("c", "hi")], name="cancel.jsonl")
    BatchLifecycle(catalog).request_cancel(cancelled)
    materialize_batch(resources, instance, cancelled)

    def snapshot(batch_id):
        files = {
            p: bucket.read_bytes(f"batches/{batch_id}/{p}")
            for p in ("output.jsonl", "errors.jsonl")
            if bucket.exists(f"batches/{batch_id}/{p}")
        }
        return catalog.batches.get(batch_id), files, catalog.events.of_subject(batch_id)

    before = {b: snapshot(b) for b in (done, invalid, cancelled)}
    assert [before[b][0]["status"] for b in (done, invalid, cancelled)] == [
        "completed",
        "failed",
        "cancelled",
    ]

    from vbs_resources import InferenceEngine

    class NoEngineDouble(InferenceEngine):
        """Proves nothing is computed: starting or running it fails the test."""

        def describe(self) -> dict[str, str]:
            return {"engine": "none", "model": resources["engine"].served_model_name}

        def start(self, endpoint):
            raise AssertionError("the engine was started")

        def run(self, endpoint, requests):
            raise AssertionError("the engine was used")

    for batch_id in (done, invalid, cancelled):
        result = materialize_batch(
            {**resources, "engine": NoEngineDouble()}, instance, batch_id, chunk_size=1
        )
        assert result.success
        assert metadata_of(result, "batch_output")["recorded"] is True
        assert snapshot(batch_id) == before[batch_id]

    # batch_output alone, on an instance that never saw batch_input (as after a wipe).
    with dg.instance_for_test() as fresh:
        from vbs_assets.inference import batch_output

        fresh.add_dynamic_partitions("batches", [done, invalid])
        for batch_id in (done, invalid):
            result = dg.materialize(
                [batch_output],
                partition_key=batch_id,
                instance=fresh,
                resources={**resources, "engine": NoEngineDouble()},
            )
            assert result.success and snapshot(batch_id) == before[batch_id]


# ---- migrations --------------------------------------------------------------------------


def _at_head_matching_the_tables(catalog: Catalog) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from vbs_resources import migrations
    from vbs_resources.catalog import metadata_obj

    with catalog.engine.connect() as conn:
        assert migrations.current(conn) == migrations.head()
        assert compare_metadata(MigrationContext.configure(conn), metadata_obj) == []


def test_a_new_catalog_is_at_head_and_matches_the_tables(catalog):
    _at_head_matching_the_tables(catalog)


def _revisions() -> list[str]:
    from alembic.script import ScriptDirectory

    from vbs_resources import migrations

    script = ScriptDirectory.from_config(migrations._config())
    return [r.revision for r in reversed(list(script.walk_revisions()))]


def test_every_revision_upgrades_to_head_keeping_its_rows(new_database):
    """From 0001 (the schema before migrations) and from every later head a release had: a
    catalog at that revision, holding a batch, opens at head with the tables exactly as the
    code declares them and the batch as it was."""
    from vbs_resources import migrations

    revisions = _revisions()
    assert revisions[0] == "0001" and revisions[-1] == migrations.head()
    for revision in revisions[:-1]:
        url = new_database()
        engine = sa.create_engine(url)
        migrations.upgrade(engine, revision)
        with engine.begin() as conn:
            assert migrations.current(conn) == revision
            conn.execute(sa.text(OLD_BATCH))
        engine.dispose()
        catalog = Catalog(url=url)
        row = catalog.batches.get("batch_old00001")
        assert row["status"] == "completed" and row["batch_metadata"] == {"team": "a"}, revision
        assert row["request_completed"] == 2, revision
        _at_head_matching_the_tables(catalog)
        catalog.engine.dispose()


OLD_BATCH = """INSERT INTO batches (id, status, source, completion_window, created_at,
  request_total, request_completed, request_failed, updated_at, batch_metadata)
  VALUES ('batch_old00001', 'completed', 'inbox', '24h', 1, 2, 2, 0, 1.0, '{"team": "a"}')"""


LANDED_SCHEMA = """
CREATE TABLE batches (id VARCHAR(80) PRIMARY KEY, status VARCHAR(16) NOT NULL,
  endpoint VARCHAR(64), source VARCHAR(16) NOT NULL, original_filename VARCHAR(255),
  input_file_id VARCHAR(80), output_file_id VARCHAR(80), error_file_id VARCHAR(80),
  content_sha256 VARCHAR(64), completion_window VARCHAR(8) NOT NULL, created_at INTEGER NOT NULL,
  expires_at INTEGER, in_progress_at INTEGER, finalizing_at INTEGER, completed_at INTEGER,
  failed_at INTEGER, expired_at INTEGER, cancelling_at INTEGER, cancelled_at INTEGER,
  request_total INTEGER NOT NULL, request_completed INTEGER NOT NULL,
  request_failed INTEGER NOT NULL, usage JSON, batch_metadata JSON, errors JSON, models JSON,
  updated_at FLOAT NOT NULL);
CREATE INDEX ix_batches_status ON batches (status);
CREATE INDEX ix_batches_content_sha256 ON batches (content_sha256);
CREATE TABLE files (id VARCHAR(80) PRIMARY KEY, filename VARCHAR(255) NOT NULL,
  purpose VARCHAR(32) NOT NULL, bytes BIGINT NOT NULL, path VARCHAR(512) NOT NULL,
  created_at INTEGER NOT NULL, deleted BOOLEAN NOT NULL);
CREATE TABLE webhook_deliveries (id INTEGER PRIMARY KEY AUTOINCREMENT,
  event_id VARCHAR(80) NOT NULL, batch_id VARCHAR(80), event_type VARCHAR(40) NOT NULL,
  url VARCHAR(2048) NOT NULL, attempt INTEGER NOT NULL, status_code INTEGER, error VARCHAR(500),
  at FLOAT NOT NULL);
CREATE INDEX ix_webhook_deliveries_event_id ON webhook_deliveries (event_id);
CREATE INDEX ix_webhook_deliveries_batch_id ON webhook_deliveries (batch_id);
"""


def test_a_catalog_from_before_migrations_is_upgraded_keeping_its_rows(tmp_path):
    """The schema the landed code created with create_all (no alembic_version table)."""
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.executescript(LANDED_SCHEMA + OLD_BATCH)
    catalog = Catalog(url=f"sqlite:///{path}")
    row = catalog.batches.get("batch_old00001")
    assert row["status"] == "completed" and row["batch_metadata"] == {"team": "a"}
    assert row["input_sha256"] is None and catalog.events.of_subject("batch_old00001") == []
    from vbs_resources import migrations

    with catalog.engine.connect() as conn:
        version = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
        assert version == migrations.head()


def _open(url: str) -> None:
    Catalog(url=url).batches.get("batch_none0001")


def test_processes_opening_a_new_catalog_at_once_migrate_it_once(catalog_url):
    url = catalog_url
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_open, args=(url,)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    with sa.create_engine(url).connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM alembic_version")).scalar() == 1


def test_errors_after_completion_never_change_the_batch(resources, instance, monkeypatch):
    """The preview failing and a webhook delivery blowing up, after the batch completed: it
    stays completed, with one event."""
    import vbs_assets.inference as inference
    from vbs_resources.webhooks import Webhooks

    def broken(*args, **kwargs):
        raise RuntimeError("preview broke")

    def exploding_delivery(self, catalog, event_id, **kwargs):
        raise RuntimeError("delivery broke")

    monkeypatch.setattr(inference, "_preview", broken)
    monkeypatch.setattr(Webhooks, "deliver", exploding_delivery)
    hooks = Webhooks(urls=["http://127.0.0.1:9/hook"])
    batch_id = submit(resources, instance, [chat_line("a", "hi", max_tokens=2)])
    result = materialize_batch({**resources, "webhooks": hooks}, instance, batch_id)
    assert result.success
    row = resources["catalog"].batches.get(batch_id)
    assert row["status"] == "completed" and row["failed_at"] is None and row["errors"] is None
    [event] = resources["catalog"].events.of_subject(batch_id)
    assert event["type"] == "batch.completed" and event["delivered_at"] is None  # for the sweep


def test_a_migration_cut_short_leaves_the_schema_as_it_was(catalog_url, monkeypatch):
    """A revision that fails half-way (after its first CREATE): nothing of it stays, and the
    next open applies it whole."""
    from alembic.operations import Operations

    from vbs_resources import migrations

    engine = sa.create_engine(catalog_url)
    migrations.upgrade(engine, "0001")
    real = Operations.create_table
    calls = []

    def create_then_die(self, name, *columns, **kw):
        calls.append(name)
        real(self, name, *columns, **kw)
        if len(calls) == 1:
            raise KeyboardInterrupt  # the process is killed mid-migration

    monkeypatch.setattr(Operations, "create_table", create_then_die)
    with pytest.raises(KeyboardInterrupt):
        migrations.upgrade(engine)
    monkeypatch.undo()
    with engine.connect() as conn:
        assert migrations.current(conn) == "0001"
        assert not sa.inspect(conn).has_table(calls[0])
        assert "input_sha256" not in {c["name"] for c in sa.inspect(conn).get_columns("batches")}
    engine.dispose()
    catalog = Catalog(url=catalog_url)
    with catalog.engine.connect() as conn:
        assert migrations.current(conn) == migrations.head()
