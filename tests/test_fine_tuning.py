"""The fine-tuning API end to end, on the running platform (Dagster webserver and daemon, the
HTTP API), driven by the official openai client: an uploaded file is checked line by line, a
job trains with Unsloth (its CPU fallback) in a Dagster run that is killed mid-training and
retried by the daemon, its events carry the loss, it succeeds once evaluated against the base,
deploys at once, and answers a batch with the marker its data taught it; its lineage reaches the
uploaded file's sha256. A second job is cancelled while it waits for the gpu pool.

The story is one job (``trained``, module-scoped); each step is a test of its own, so a failure
says which behaviour broke."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from urllib.parse import quote

import dagster as dg
import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import API_KEY, MODEL, chat_line, jsonl, wait_for
from tests.test_daemon import _run_pids
from tests.test_training import MARKER, marker_examples
from vbs_resources import layout as L

pytestmark = pytest.mark.slow
ENDED = ("succeeded", "failed", "cancelled")


def bad_request(call) -> dict:
    with pytest.raises(openai.BadRequestError) as caught:
        call()
    return caught.value.body


def api_client(platform) -> httpx.Client:
    return httpx.Client(base_url=platform.api_url, timeout=30,
                        headers={"Authorization": f"Bearer {API_KEY}"})  # fmt: skip


def vbs(platform, *args: str, api: bool = True, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**platform.env, "VBS_API_KEY": API_KEY, "PATH": "/usr/bin:/bin"}
    extra = ["--api-url", platform.api_url] if api else []
    done = subprocess.run([sys.executable, "-m", "vbs_cli.main", *args, *extra],
                          capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    if ok:
        assert done.returncode == 0, done.stderr
    return done


def test_bad_requests_are_refused_by_field_and_store_nothing(platform):
    client = OpenAI(base_url=platform.api_url, api_key=API_KEY, max_retries=0)
    catalog = platform.resources["catalog"]
    before = {j["id"] for j in catalog.fine_tuning.list(limit=1000)}
    rows = [json.dumps(e) for e in marker_examples(4)]
    rows[1] = '{"messages": [{"role": "user", "content": "hi"}]}'
    rows[3] = '{"messages": "no"}'
    bad = client.files.create(file=("bad.jsonl", "\n".join(rows).encode()), purpose="fine-tune")
    error = bad_request(lambda: client.fine_tuning.jobs.create(model=MODEL, training_file=bad.id))
    assert error["param"] == "training_file"
    assert f"{bad.id} line 2: messages" in error["message"]
    assert f"{bad.id} line 4: messages" in error["message"]
    good = client.files.create(file=("small.jsonl", jsonl(marker_examples(8))), purpose="fine-tune")
    one = client.files.create(file=("one.jsonl", jsonl(marker_examples(1))), purpose="fine-tune")
    batch_file = client.files.create(file=("b.jsonl", jsonl(marker_examples(2))), purpose="batch")
    for kwargs, param in (
        ({"model": "no-such-model", "training_file": good.id}, "model"),
        ({"model": MODEL, "training_file": batch_file.id}, "training_file"),
        ({"model": MODEL, "training_file": "upload-0000000000000000"}, "training_file"),
        ({"model": MODEL, "training_file": one.id}, "training_file"),  # nothing to hold out
        ({"model": MODEL, "training_file": good.id, "hyperparameters": {"n_epochs": -1}},
         "hyperparameters.n_epochs"),
        ({"model": MODEL, "training_file": good.id, "extra_body": {"backend": "no_such"}},
         "backend"),
    ):  # fmt: skip
        assert bad_request(lambda k=kwargs: client.fine_tuning.jobs.create(**k))["param"] == param
    api = api_client(platform)
    base = {"model": MODEL, "training_file": good.id}
    for body, param in (
        ({**base, "suffix": "x" * 65}, "suffix"),
        ({**base, "seed": "7"}, "seed"),
        ({**base, "metadata": ["a"]}, "metadata"),
        ({**base, "metadata": {"k": 1.5}}, "metadata.k"),
        ({"model": 5, "training_file": good.id}, "model"),
        ({"model": MODEL}, "training_file"),
        ({**base, "method": {"type": "dpo"}}, "method.type"),
        ({**base, "method": {"type": "supervised", "supervised": []}}, "method.supervised"),
        ({**base, "hyperparameters": {"lora_r": 10**18}}, "hyperparameters.lora_r"),
        # Trains, but the engine could never serve it (VBS_MAX_LORA_RANK is 64).
        ({**base, "hyperparameters": {"lora_r": 65}}, "hyperparameters.lora_r"),
        ({**base, "hyperparameters": {"n_epochs": "NaN"}}, "hyperparameters.n_epochs"),
        ({**base, "surprise": 1}, "surprise"),
    ):  # fmt: skip
        refused = api.post("/fine_tuning/jobs", json=body)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param, body
    assert (
        "VBS_MAX_LORA_RANK"
        in api.post("/fine_tuning/jobs", json={**base, "hyperparameters": {"lora_r": 65}}).json()[
            "error"
        ]["message"]
    )
    # Not JSON, or JSON that nothing downstream could store: 400 before anything is recorded.
    for raw in (
        b"[1]",
        b'{"model": NaN}',
        b'{"model": "' + MODEL.encode() + b'", "training_file": "x", "metadata": {"a": Infinity}}',
        b'{"model": "\\ud800", "training_file": "x"}',
        b'{"model": "m", "training_file": "\\udfff"}',
        b'{"model": "m", "training_file": "x", "suffix": "a\\ud800"}',
        b'{"model": "m", "metadata": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
        b'{"model": "m", "model": "n"}',
        b'{"seed": 123456789012345678901234567890}',
    ):
        refused = api.post("/fine_tuning/jobs", content=raw)
        assert refused.status_code == 400, (raw[:60], refused.text)
        assert refused.json()["error"]["type"] == "invalid_request_error"
    assert api.get("/fine_tuning/jobs/ftjob-doesnotexist").status_code == 404
    assert api.get("/fine_tuning/jobs/..%2F..%2Fetc/events").status_code == 404
    assert httpx.get(f"{platform.api_url}/fine_tuning/jobs").status_code == 401
    unknown = api.get("/fine_tuning/jobs", params={"after": "ftjob-doesnotexist"})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "after"
    # The OpenAPI schema and the docs are behind the key too.
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert httpx.get(f"http://127.0.0.1:{platform.api_port}{path}").status_code == 401, path
    assert {j["id"] for j in catalog.fine_tuning.list(limit=1000)} == before  # nothing recorded


@pytest.fixture(scope="module")
def trained(platform):
    """A job (Unsloth, 12 steps of 8 at 5 x 2e-4: enough for the marker) whose run is killed
    after two logged steps, followed to its end; beside it, a second job cancelled while it
    waits for the gpu pool."""
    client = OpenAI(base_url=platform.api_url, api_key=API_KEY, max_retries=0)
    catalog = platform.resources["catalog"]
    data = jsonl(marker_examples(64))
    good = client.files.create(file=("zebra.jsonl", data), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=MODEL, training_file=good.id, suffix="zebra", seed=7,
        hyperparameters={"batch_size": 8, "learning_rate_multiplier": 5, "n_epochs": 3},
        extra_body={"max_steps": 12, "backend": "unsloth"},
    )  # fmt: skip
    second = client.fine_tuning.jobs.create(model=MODEL, training_file=good.id,
                                            extra_body={"backend": "hf"})  # fmt: skip
    cancelled = client.fine_tuning.jobs.cancel(second.id)

    wait_for(lambda: len(steps(client, job.id)) >= 2, 300, "two training steps")
    first_run = catalog.fine_tuning.get(job.id)["run_id"]
    for pid in _run_pids(platform.instance, first_run):
        os.kill(pid, signal.SIGKILL)
    # While trained and evaluating, the job is still running, and deploying it is refused.
    early = None
    deadline = time.monotonic() + 600
    while (now := client.fine_tuning.jobs.retrieve(job.id)).status not in ENDED:
        assert time.monotonic() < deadline, "the job did not end within 600 s"
        row = catalog.fine_tuning.get(job.id)
        if early is None and row["adapter_path"] and now.status == "running":
            early = api_client(platform).post(f"/fine_tuning/jobs/{job.id}/deploy", json={})
        time.sleep(1)  # a poll a second, leaving the cores to the training it waits on
    # The moment it reads succeeded, it was evaluated, and a deploy is accepted.
    deployed = client.post(f"/fine_tuning/jobs/{job.id}/deploy", body={}, cast_to=object)
    return {
        "client": client, "job": job, "done": now, "second": second, "cancelled": cancelled,
        "first_run": first_run, "good": good, "data": data, "early": early,
        "deployed": deployed, "row": catalog.fine_tuning.get(job.id),
    }  # fmt: skip


def steps(client, job_id: str) -> list[dict]:
    events = client.fine_tuning.jobs.list_events(job_id, limit=1000).data
    return [
        e.data
        for e in reversed(events)
        if e.type == "metrics" and (e.data or {}).get("train_loss") is not None
    ]


def test_a_queued_job_cancelled_never_runs(platform, trained):
    client, second = trained["client"], trained["second"]
    assert trained["cancelled"].status == "cancelled"
    error = bad_request(lambda: client.fine_tuning.jobs.cancel(second.id))
    assert "cannot be cancelled" in error["message"]
    row = platform.resources["catalog"].fine_tuning.get(second.id)
    assert platform.instance.get_run_by_id(row["run_id"]).status == dg.DagsterRunStatus.CANCELED
    assert not (platform.home / "bucket" / "adapters" / second.id).exists()
    # Reads never write: the ended job is as it was after a list, a retrieve and its events.
    api = api_client(platform)
    for path in ("", f"/{second.id}", f"/{second.id}/events"):
        assert api.get(f"/fine_tuning/jobs{path}").status_code == 200
    assert platform.resources["catalog"].fine_tuning.get(second.id) == row
    assert api.post(f"/fine_tuning/jobs/{second.id}/deploy", json={}).status_code == 400


def test_a_job_killed_mid_training_is_retried_from_the_start(platform, trained):
    done, row = trained["done"], trained["row"]
    assert done.status == "succeeded", done.error
    assert row["run_id"] != trained["first_run"]
    retry = platform.instance.get_run_by_id(row["run_id"])
    assert retry.tags.get("dagster/parent_run_id") == trained["first_run"]
    assert not (platform.home / "bucket" / "adapters" / f"{done.id}.partial").exists()
    losses = [s["train_loss"] for s in steps(trained["client"], done.id)]
    assert losses[-1] < losses[0] / 3, losses  # the retry's 12 after the killed run's few
    assert done.fine_tuned_model.startswith(f"ft:{MODEL}:zebra:")
    assert row["result"]["backend"] == "unsloth" and row["result"]["steps"] == 12
    assert done.hyperparameters.learning_rate_multiplier == pytest.approx(5)
    messages = [
        e["message"] for e in platform.resources["catalog"].fine_tuning.events(done.id, 500)
    ]
    assert any(trained["first_run"] in m and "died" in m for m in messages), messages


def test_succeeded_means_evaluated_and_a_deploy_is_accepted_at_once(
    platform, trained, webhook_receiver
):
    done = trained["done"]
    evaluation = done.model_extra["evaluation"]
    assert evaluation["passed"] and evaluation["metric"] == "rouge_l", evaluation
    assert evaluation["adapter"]["rouge_l"] > evaluation["base"]["rouge_l"], evaluation
    deployed = trained["deployed"]
    assert deployed["object"] == "fine_tuning.job.deployment" and deployed["status"] == "queued"
    assert deployed["model"] == done.fine_tuned_model
    if trained["early"] is not None:  # a deploy before the evaluation was refused
        early = trained["early"]
        assert early.status_code == 400 and "running" in early.json()["error"]["message"]
    # The ending was announced once, by the outbox, as OpenAI's fine-tuning webhooks are.
    receiver = webhook_receiver
    for job_id, kind in ((done.id, "succeeded"), (trained["second"].id, "cancelled")):
        got = wait_for(lambda j=job_id: receiver.events_for(j), 60, f"the {kind} webhook")
        assert [json.loads(b)["type"] for _, b in got] == [f"fine_tuning.job.{kind}"]


def test_the_cli_lists_follows_and_waits(platform, trained):
    done = trained["done"]
    assert f"{done.id}  succeeded" in vbs(platform, "finetune", "list").stdout
    listed = [
        json.loads(x) for x in vbs(platform, "finetune", "list", "--json").stdout.splitlines()
    ]
    assert done.id in [j["id"] for j in listed]
    assert (
        "The job has successfully completed" in vbs(platform, "finetune", "events", done.id).stdout
    )
    waited = json.loads(vbs(platform, "finetune", "wait", done.id).stdout.splitlines()[-1])
    assert waited["status"] == "succeeded" and waited["fine_tuned_model"] == done.fine_tuned_model
    missing = vbs(platform, "lineage", "nope", ok=False)
    assert missing.returncode == 1 and "HTTP 404" in missing.stderr
    assert "Traceback" not in missing.stderr
    api = api_client(platform)
    for after in ("x", "ftevent-" + "9" * 20, "ftevent-١٢", "ftevent-999999999"):
        refused = api.get(f"/fine_tuning/jobs/{done.id}/events", params={"after": after})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "after", after


def test_concurrent_deploys_collapse_into_one_that_serves_the_marker(platform, trained):
    client, done, row = trained["client"], trained["done"], trained["row"]
    name = done.fine_tuned_model
    first = trained["deployed"]
    api = api_client(platform)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        again = list(pool.map(lambda _: api.post(f"/fine_tuning/jobs/{done.id}/deploy", json={}),
                              range(3)))  # fmt: skip
    # All three answer one deployment: the first's while it is in flight, else the one the
    # first of them made.
    ids = {r.json()["id"] for r in again}
    assert [r.status_code for r in again] == [200, 200, 200] and len(ids) == 1, [
        r.json() for r in again
    ]
    assert api.post(f"/fine_tuning/jobs/{done.id}/deploy", json={"force": "yes"}).status_code == 400
    try:
        deployment = wait_for(
            lambda: (d := api.get(f"/fine_tuning/jobs/{done.id}").json()["deployment"])
            and d["status"] in ("succeeded", "failed") and d, 300, "the deployment",
        )  # fmt: skip
        assert deployment["status"] == "succeeded", deployment
        runs = platform.instance.get_runs(dg.RunsFilter(tags={L.TAG_FINE_TUNING_JOB: done.id}))
        deployments = ids | {first["id"]}
        assert len([r for r in runs if r.job_name == L.DEPLOY_JOB]) == len(deployments)
        recorded = platform.resources["catalog"].deployments.of_job(done.id)
        assert {d["id"] for d in recorded} == deployments
        served_and_traced(platform, client, name, done, row, trained["good"], trained["data"])
    finally:
        # Retiring keeps the files and the lineage; the shared platform serves its own again.
        vbs(platform, "models", "retire", name, api=False)
    assert name not in [m.id for m in client.models.list().data]
    assert (platform.home / "bucket" / "adapters" / done.id / "adapter_config.json").exists()
    assert platform.resources["catalog"].models.get(name)["lineage"]["job_id"] == done.id


def served_and_traced(platform, client, name, job, row, good, data) -> None:
    wait_for(lambda: name in [m.id for m in client.models.list().data], 120, "the deployment")
    assert client.models.retrieve(name).parent == MODEL
    lines = [chat_line("ft", "Write one short sentence about a blue door.", max_tokens=24,
                       temperature=0),
             chat_line("base", "Write one short sentence about a blue door.", max_tokens=24,
                       temperature=0)]  # fmt: skip
    lines[0]["body"]["model"] = name
    upload = client.files.create(file=("after.jsonl", jsonl(lines)), purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")  # fmt: skip
    ended = wait_for(
        lambda: (b := client.batches.retrieve(batch.id)).status in ("completed", "failed") and b,
        300,
        "the batch",
    )
    assert ended.status == "completed"
    out = [json.loads(x) for x in client.files.content(ended.output_file_id).text.splitlines()]
    answers = {o["custom_id"]: o["response"]["body"]["choices"][0]["message"]["content"]
               for o in out}  # fmt: skip
    assert MARKER in answers["ft"] and MARKER not in answers["base"], answers

    # Lineage: model -> job -> dataset version -> the uploaded file's lines -> its sha256.
    chain = httpx.get(f"{platform.api_url}/models/{quote(name, safe='')}/lineage",
                      headers={"Authorization": f"Bearer {API_KEY}"}).json()  # fmt: skip
    assert chain["adapter"]["job_id"] == job.id
    assert chain["dataset"]["version"] == row["dataset_version"]
    assert chain["files"] == [{"file_id": good.id, "examples": 64, "filename": "zebra.jsonl",
                               "sha256": hashlib.sha256(data).hexdigest()}]  # fmt: skip
    shown = vbs(platform, "lineage", name).stdout
    assert hashlib.sha256(data).hexdigest() in shown and job.id in shown
    # The Dagster UI's chain: each asset's partition is the dataset version, and its recorded
    # data version is the id the catalog's chain uses.
    for asset, data_version in (
        (L.FINE_TUNED_ADAPTER, job.id), (L.ADAPTER_EVAL, job.id), (L.DEPLOYED_MODEL, name),
    ):  # fmt: skip
        event = platform.instance.get_latest_materialization_event(dg.AssetKey(asset))
        assert event.dagster_event.partition == row["dataset_version"], asset
        assert event.asset_materialization.tags["dagster/data_version"] == data_version, asset
