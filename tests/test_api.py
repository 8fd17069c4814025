"""The Batch API with the official `openai` client against `vbs serve` (API + Dagster daemon +
vLLM on CPU)."""

import json
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from tests.conftest import API_KEY, MAX_UPLOAD, WEBHOOK_SECRET, chat_line, jsonl, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(platform):
    return OpenAI(base_url=platform.api_url, api_key=API_KEY, max_retries=0)


def wait_batch(client, batch_id, statuses, timeout=180):
    return wait_for(
        lambda: (b := client.batches.retrieve(batch_id)).status in statuses and b,
        timeout,
        f"{batch_id} to reach {statuses}",
    )


def upload(client, lines_or_bytes, name="jobs.jsonl"):
    data = lines_or_bytes if isinstance(lines_or_bytes, bytes) else jsonl(lines_or_bytes)
    return client.files.create(file=(name, data), purpose="batch")


def test_upload_create_poll_and_download(client):
    lines = [
        chat_line(f"q{i}", "What is the capital of France?", temperature=0, max_tokens=16)
        for i in range(3)
    ]
    file = upload(client, lines)
    assert file.id.startswith("file-") and file.bytes == len(jsonl(lines))
    assert client.files.retrieve(file.id).filename == "jobs.jsonl"
    assert client.files.content(file.id).content == jsonl(lines)

    batch = client.batches.create(
        input_file_id=file.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"suite": "api"},
    )
    assert batch.status == "validating" and batch.metadata == {"suite": "api"}
    done = wait_batch(client, batch.id, {"completed", "failed"})
    assert done.status == "completed", done
    assert (done.request_counts.total, done.request_counts.completed) == (3, 3)
    assert done.completed_at >= done.in_progress_at >= done.created_at
    assert done.usage.output_tokens > 0
    results = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    assert sorted(r["custom_id"] for r in results) == ["q0", "q1", "q2"]
    assert all(
        "Paris" in r["response"]["body"]["choices"][0]["message"]["content"] for r in results
    )
    assert client.files.content(done.error_file_id).text == ""


def test_created_batch_is_launched_without_the_inbox_sensor(client, platform):
    """The API adds the partition and launches the run itself; the sensor is not involved."""
    file = upload(client, [chat_line("d0", "Hi.", max_tokens=4)])
    batch = client.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    # The run exists as soon as create returns: no waiting for a sensor tick.
    [run] = platform.runs(batch.id)
    assert run.tags["dagster/partition"] == batch.id
    assert "dagster/sensor_name" not in run.tags
    assert (platform.home / "bucket" / "batches" / batch.id / "input.jsonl").exists()
    assert wait_batch(client, batch.id, {"completed", "failed"}).status == "completed"


def in_process_api(platform, launcher, webhooks=None):
    """A second API app on the platform's state, with its own launcher, served in-process."""
    from fastapi.testclient import TestClient

    from tests.conftest import settings_for
    from vbs_api.app import create_app

    resources = dict(platform.resources)
    if webhooks is not None:
        resources["webhooks"] = webhooks
    settings = settings_for(platform.home, VBS_API_KEYS=API_KEY)
    app = create_app(settings, resources, launcher=launcher)
    http = TestClient(app, base_url="http://testserver/v1")
    return OpenAI(base_url="http://testserver/v1", api_key=API_KEY, http_client=http)


def test_a_polled_batch_shows_every_commit_from_any_process(resources):
    """Retrieves are answered from a cache while the catalog is unchanged; a commit from this
    process or another (a run's progress) is seen by the very next poll."""
    import subprocess
    import sys

    from fastapi.testclient import TestClient

    from tests.conftest import settings_for
    from vbs_api.app import create_app
    from vbs_resources.lifecycle import BatchLifecycle

    catalog = resources["catalog"]
    lifecycle = BatchLifecycle(catalog)
    lifecycle.create("batch_poll0001", source="api", input_file_id="f")
    lifecycle.create("batch_poll0002", source="api", input_file_id="f")
    home = Path(resources["bucket"].url).parent
    app = create_app(settings_for(home, VBS_API_KEYS=API_KEY), resources)
    http = TestClient(app, base_url="http://testserver/v1")
    api = OpenAI(base_url="http://testserver/v1", api_key=API_KEY, http_client=http)

    assert api.batches.retrieve("batch_poll0001").status == "validating"
    assert api.batches.retrieve("batch_poll0001").status == "validating"  # now from the cache
    lifecycle.start("batch_poll0001", request_completed=2)
    polled = api.batches.retrieve("batch_poll0001")
    assert (polled.status, polled.request_counts.completed) == ("in_progress", 2)

    # Another process commits, as a run does.
    writer = (
        "import sys; from vbs_resources.catalog import Catalog; "
        "Catalog(url=sys.argv[1]).batches.update_unfinished('batch_poll0001', request_completed=5)"
    )
    subprocess.run([sys.executable, "-c", writer, catalog.url], check=True)
    assert api.batches.retrieve("batch_poll0001").request_counts.completed == 5
    # The other batch, cached before, is read again rather than served stale.
    lifecycle.request_cancel("batch_poll0002")
    assert api.batches.retrieve("batch_poll0002").status == "cancelling"
    with pytest.raises(openai.NotFoundError):
        api.batches.retrieve("batch_nosuch0001")


def test_unreachable_dagster_leaves_the_batch_to_the_reconciler(platform):
    from tests.conftest import free_port
    from vbs_api.launch import BatchLauncher

    api = in_process_api(platform, BatchLauncher(f"http://127.0.0.1:{free_port()}"))
    file = upload(api, [chat_line("u0", "Hi.", max_tokens=4)])
    batch = api.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.status == "validating"
    # The reconciler finds a batch without a run and starts the same job for it.
    done = wait_batch(api, batch.id, {"completed", "failed"})
    assert done.status == "completed" and done.request_counts.completed == 1
    [run] = platform.runs(batch.id)
    assert run.tags["dagster/sensor_name"] == "batch_reconciler"


def test_a_refused_launch_fails_the_batch_with_the_reason(platform, webhook_receiver):
    """The real webserver refuses (HTTP 405 at a wrong path): the batch fails at once, and the
    reason given to the client holds neither the URL nor the credentials in it."""
    from vbs_api.launch import BatchLauncher
    from vbs_resources.webhooks import Webhooks

    launcher = BatchLauncher(f"http://admin:s3cret@127.0.0.1:{platform.port}/refuses")
    hooks = Webhooks(urls=[webhook_receiver.url], secret=WEBHOOK_SECRET)
    api = in_process_api(platform, launcher, hooks)
    file = upload(api, [chat_line("f0", "Hi.", max_tokens=4)])
    batch = api.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.status == "failed"
    [error] = batch.errors.data
    assert error.code == "launch_failed" and "405" in error.message
    assert "s3cret" not in error.message and "127.0.0.1" not in error.message
    assert platform.runs(batch.id) == []

    def announced():
        events = [json.loads(body) for _, body in webhook_receiver.events()]
        return {"type": "batch.failed", "id": batch.id} in [
            {"type": e["type"], "id": e["data"]["id"]} for e in events
        ]

    wait_for(announced, 30, "the batch.failed webhook")


def test_a_launch_that_may_pass_leaves_the_batch_to_the_reconciler(platform):
    """A code location the webserver does not know (yet): not a failure of the batch, which the
    reconciler then starts from inside Dagster."""
    from vbs_api.launch import BatchLauncher

    launcher = BatchLauncher(f"http://127.0.0.1:{platform.port}", location="no_such_location")
    api = in_process_api(platform, launcher)
    file = upload(api, [chat_line("m0", "Hi.", max_tokens=4)])
    batch = api.batches.create(
        input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.status == "validating" and batch.errors is None
    done = wait_batch(api, batch.id, {"completed", "failed"})
    assert done.status == "completed"
    [run] = platform.runs(batch.id)
    assert run.tags["dagster/sensor_name"] == "batch_reconciler"


def test_completion_webhook_is_signed_as_openai_signs(client, platform, webhook_receiver):
    batch_id = next(b.id for b in client.batches.list() if b.status == "completed")
    verifier = OpenAI(base_url=platform.api_url, api_key=API_KEY, webhook_secret=WEBHOOK_SECRET)

    def delivered():
        for headers, body in webhook_receiver.events_for(batch_id):
            return verifier.webhooks.unwrap(body, headers)  # raises on a bad signature
        return None

    event = wait_for(delivered, 30, "the batch.completed webhook")
    assert event.type == "batch.completed"
    deliveries = platform.resources["catalog"].events.deliveries_of(batch_id)
    assert [(d["event_type"], d["status_code"]) for d in deliveries] == [("batch.completed", 200)]


def test_malformed_file_gives_a_failed_batch_with_its_errors(client):
    data = jsonl([chat_line("a", "hi")]) + b'{"custom_id": "b", "method": "GET"}\n'
    batch = client.batches.create(
        input_file_id=upload(client, data).id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
    )
    failed = wait_batch(client, batch.id, {"failed", "completed"}, timeout=60)
    assert failed.status == "failed" and failed.failed_at
    (error,) = failed.errors.data
    assert (error.code, error.line, error.param) == ("missing_required_parameter", 2, "url")


def test_cancel_a_running_batch_keeps_what_finished(client):
    lines = [
        chat_line(f"c{i:02d}", f"Count to {i}.", temperature=0, max_tokens=32) for i in range(20)
    ]
    batch = client.batches.create(
        input_file_id=upload(client, lines).id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        extra_body={"chunk_size": 2},
    )
    wait_for(
        lambda: client.batches.retrieve(batch.id).request_counts.completed >= 2,
        180,
        "the first chunk",
    )
    assert client.batches.cancel(batch.id).status in {"cancelling", "cancelled"}
    cancelled = wait_batch(client, batch.id, {"cancelled", "completed"}, timeout=120)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at
    output = client.files.content(cancelled.output_file_id).text.splitlines()
    ids = [json.loads(x)["custom_id"] for x in output]
    assert len(ids) == len(set(ids)) == cancelled.request_counts.completed
    assert 2 <= len(ids) < 20


def test_list_batches_paginates_newest_first(client):
    everything = client.batches.list(limit=100).data
    assert len(everything) >= 3
    first = client.batches.list(limit=2)
    assert len(first.data) == 2 and first.has_more
    rest = client.batches.list(limit=100, after=first.data[-1].id)
    assert [b.id for b in first.data + rest.data] == [b.id for b in everything]
    assert [b.id for b in client.batches.list(limit=1)] == [b.id for b in everything]


def test_models_lists_the_served_models(client):
    assert {m.id for m in client.models.list()} == {"SmolLM2-135M-Instruct", "all-MiniLM-L6-v2"}


def test_a_wrong_key_is_refused_in_openai_shape(platform):
    bad = OpenAI(base_url=platform.api_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.batches.list()
    assert info.value.body["code"] == "invalid_api_key"
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as raw:
        urllib.request.urlopen(f"{platform.api_url}/files")  # no Authorization header
    assert raw.value.code == 401
    assert json.loads(raw.value.read())["error"]["type"] == "authentication_error"


def test_oversize_upload_is_413(client):
    with pytest.raises(openai.APIStatusError) as info:
        upload(client, b"x" * (MAX_UPLOAD + 1))
    assert info.value.status_code == 413
    assert info.value.body["code"] == "file_too_large"


def test_unknown_ids_are_404(client):
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_doesnotexist")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(
            input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h"
        )


def test_health_and_metrics(platform):
    import urllib.request

    base = platform.api_url.removesuffix("/v1")
    health = json.loads(urllib.request.urlopen(f"{base}/health").read())
    assert health["status"] == "ok", health
    # What `vbs serve` supervises (this platform uses the session's Label Studio).
    assert set(health["processes"]) == {"code-server", "webserver", "daemon", "api"}
    for process in health["processes"].values():
        assert process["state"] == "running" and process["pid"] > 0, health
    metrics = urllib.request.urlopen(f"{base}/metrics").read().decode()
    assert 'vbs_batches{status="completed"}' in metrics
    assert 'vbs_requests_processed{outcome="completed"}' in metrics
    assert 'vbs_tokens_processed{kind="output"}' in metrics
    assert 'vbs_api_request_seconds_count{method="GET",route="/v1/batches/{batch_id}"}' in metrics


def test_command_line_client_submits_waits_and_prints_results(platform, tmp_path):
    import subprocess
    import sys

    path = tmp_path / "cli.jsonl"
    path.write_bytes(
        jsonl([chat_line("cli", "What is the capital of France?", temperature=0, max_tokens=12)])
    )
    env = {**__import__("os").environ, "VBS_API_KEY": API_KEY}
    base = [sys.executable, "-m", "vbs_cli.main"]
    url = ["--api-url", platform.api_url]
    submitted = subprocess.run(
        [*base, "submit", str(path), "--wait", *url],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert submitted.returncode == 0, submitted.stderr
    batch_id = submitted.stdout.strip()
    assert f"{batch_id} completed" in submitted.stderr
    listed = subprocess.run([*base, "batches", *url], env=env, capture_output=True, text=True)
    assert batch_id in listed.stdout and "completed" in listed.stdout
    results = subprocess.run(
        [*base, "results", batch_id, *url], env=env, capture_output=True, text=True
    )
    (line,) = [json.loads(x) for x in results.stdout.splitlines()]
    assert "Paris" in line["response"]["body"]["choices"][0]["message"]["content"]


def test_api_server_restarted_mid_batch_loses_nothing(platform):
    """A second API process on the same state: killed with SIGKILL mid-batch and started again,
    it still knows the file and the batch, which completes with every request once."""
    import os
    import signal
    import subprocess
    import sys

    from tests.conftest import free_port

    port = free_port()
    env = {
        **os.environ,
        **platform.env,
        "VBS_API_KEYS": API_KEY,
        "VBS_DAGSTER_URL": f"http://127.0.0.1:{platform.port}",
    }
    command = [sys.executable, "-m", "vbs_api.server", "--port", str(port)]

    def start():
        proc = subprocess.Popen(command, env=env, start_new_session=True)
        wait_for(lambda: _healthy(port), 30, "the API to start")
        return proc

    proc = start()
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, max_retries=0)
    lines = [chat_line(f"s{i}", f"Say {i}.", temperature=0, max_tokens=16) for i in range(8)]
    file = upload(client, lines)
    batch = client.batches.create(
        input_file_id=file.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        extra_body={"chunk_size": 2},
    )
    wait_for(lambda: client.batches.retrieve(batch.id).status == "in_progress", 120, "in_progress")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc = start()
    try:
        assert client.files.retrieve(file.id).bytes == len(jsonl(lines))
        done = wait_batch(client, batch.id, {"completed", "failed"})
        assert done.status == "completed" and done.request_counts.completed == 8
        ids = [
            json.loads(x)["custom_id"]
            for x in client.files.content(done.output_file_id).text.splitlines()
        ]
        assert sorted(ids) == [f"s{i}" for i in range(8)]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def _healthy(port: int) -> bool:
    import urllib.request

    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200
    except OSError:
        return False


def test_the_api_process_signs_its_own_webhooks_with_the_secret_value(
    platform, webhook_receiver, tmp_path
):
    """The API's own batch.failed (Dagster refuses the launch), delivered by the API process,
    verifies with the secret's value; the variable's name is no key."""
    import os
    import subprocess
    import sys
    import time

    from tests.conftest import free_port

    port = free_port()
    env = {
        **os.environ,
        **platform.env,
        "VBS_API_KEYS": API_KEY,
        # The real webserver, at a path where it refuses the launch (HTTP 405).
        "VBS_DAGSTER_URL": f"http://127.0.0.1:{platform.port}/refuses",
        "VBS_WEBHOOK_URLS": webhook_receiver.url,
        "VBS_WEBHOOK_SECRET": WEBHOOK_SECRET,
    }
    command = [sys.executable, "-m", "vbs_api.server", "--port", str(port)]
    proc = subprocess.Popen(command, env=env, start_new_session=True)
    try:
        wait_for(lambda: _healthy(port), 30, "the API to start")
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, max_retries=0)
        file = upload(client, [chat_line("w0", "Hi.", max_tokens=4)])
        created = time.monotonic()
        batch = client.batches.create(
            input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        assert batch.status == "failed" and batch.errors.data[0].code == "launch_failed"
        verifier = OpenAI(base_url=platform.api_url, api_key=API_KEY, webhook_secret=WEBHOOK_SECRET)

        def delivered():
            for headers, body in webhook_receiver.events_for(batch.id):
                return verifier.webhooks.unwrap(body, headers)  # raises on a bad signature
            return None

        event = wait_for(delivered, 20, "the API's batch.failed webhook")
        assert event.type == "batch.failed"
        # Delivered by the API process at once, not swept up later by the reconciler.
        assert time.monotonic() - created < 20
    finally:
        proc.terminate()
        proc.wait(30)


def test_secrets_appear_in_no_log_run_config_metadata_or_resource_view(platform):
    """After everything above ran on the platform: the webhook secret and the API keys are in
    none of the server logs, run configs, run tags, Dagster events (messages and metadata), and
    the Dagster UI's resource view shows the secret as an environment variable, by name."""
    secrets = [WEBHOOK_SECRET, API_KEY, "second-key"]
    log = platform.log.read_text(errors="replace")
    assert not [s for s in secrets if s in log]
    runs = platform.instance.get_runs(limit=500)
    assert runs
    for run in runs:
        seen = json.dumps([run.run_config, run.tags], default=str)
        for entry in platform.instance.all_logs(run.run_id):
            seen += entry.user_message or ""
            event = entry.dagster_event
            if event is not None:
                seen += repr(event.event_specific_data)
        assert not [s for s in secrets if s in seen], run.run_id
    query = """
    { repositoryOrError(repositorySelector: {repositoryLocationName: "vbs",
                                             repositoryName: "__repository__"}) {
        ... on Repository { allTopLevelResourceDetails {
            name configuredValues { key value type } } } } }
    """
    resources = platform.graphql(query)["repositoryOrError"]["allTopLevelResourceDetails"]
    webhooks = next(r for r in resources if r["name"] == "webhooks")
    secret = next(v for v in webhooks["configuredValues"] if v["key"] == "secret")
    assert (secret["type"], secret["value"]) == ("ENV_VAR", "VBS_WEBHOOK_SECRET")
    assert not [s for s in secrets if s in json.dumps(resources)]
