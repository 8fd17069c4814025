"""The fine-tuning API end to end, on the running platform (Dagster webserver and daemon, the
HTTP API), driven by the official openai client: an uploaded file is checked line by line, a
job trains with Unsloth (its CPU fallback) in a Dagster run that is killed mid-training and
retried by the daemon, its events carry the loss, it is evaluated against the base, deployed,
and answers a batch with the marker its data taught it; its lineage reaches the uploaded file's
sha256. A second job is cancelled while it waits for the gpu pool."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
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


def bad_request(call) -> dict:
    with pytest.raises(openai.BadRequestError) as caught:
        call()
    return caught.value.body


def test_a_fine_tuning_job_killed_mid_training_is_retried_deployed_and_served(platform):
    client = OpenAI(base_url=platform.api_url, api_key=API_KEY, max_retries=0)
    catalog = platform.resources["catalog"]

    # Refused at the door, each naming its line or field.
    rows = [json.dumps(e) for e in marker_examples(4)]
    rows[1] = '{"messages": [{"role": "user", "content": "hi"}]}'
    rows[3] = '{"messages": "no"}'
    bad = client.files.create(file=("bad.jsonl", "\n".join(rows).encode()), purpose="fine-tune")
    error = bad_request(lambda: client.fine_tuning.jobs.create(model=MODEL, training_file=bad.id))
    assert error["param"] == "training_file"
    assert f"{bad.id} line 2: messages" in error["message"]
    assert f"{bad.id} line 4: messages" in error["message"]
    data = jsonl(marker_examples(64))
    good = client.files.create(file=("zebra.jsonl", data), purpose="fine-tune")
    batch_file = client.files.create(file=("b.jsonl", data), purpose="batch")
    for kwargs, param in (
        ({"model": "no-such-model", "training_file": good.id}, "model"),
        ({"model": MODEL, "training_file": batch_file.id}, "training_file"),
        ({"model": MODEL, "training_file": "upload-0000000000000000"}, "training_file"),
        ({"model": MODEL, "training_file": good.id, "hyperparameters": {"n_epochs": -1}},
         "hyperparameters.n_epochs"),
        ({"model": MODEL, "training_file": good.id, "extra_body": {"backend": "axolotl"}},
         "backend"),
    ):  # fmt: skip
        assert bad_request(lambda k=kwargs: client.fine_tuning.jobs.create(**k))["param"] == param
    api = httpx.Client(base_url=platform.api_url, timeout=30,
                       headers={"Authorization": f"Bearer {API_KEY}"})  # fmt: skip
    for body, param in (
        ({"model": MODEL, "training_file": good.id, "suffix": "x" * 65}, "suffix"),
        ({"model": MODEL, "training_file": good.id, "seed": "7"}, "seed"),
        ({"model": MODEL, "training_file": good.id, "metadata": ["a"]}, "metadata"),
        ({"model": 5, "training_file": good.id}, "model"),
        ({"model": MODEL}, "training_file"),
        ({"model": MODEL, "training_file": good.id, "method": {"type": "dpo"}}, "method"),
        ({"model": MODEL, "training_file": good.id, "hyperparameters": {"lora_r": 10**30}},
         "hyperparameters.lora_r"),
    ):  # fmt: skip
        refused = api.post("/fine_tuning/jobs", json=body)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == param, body
    assert api.post("/fine_tuning/jobs", content=b"[1]").status_code == 400
    assert api.post("/fine_tuning/jobs", content=b'{"model": NaN}').status_code == 400
    assert api.get("/fine_tuning/jobs/ftjob-doesnotexist").status_code == 404
    assert api.get("/fine_tuning/jobs/..%2F..%2Fetc/events").status_code == 404
    assert httpx.get(f"{platform.api_url}/fine_tuning/jobs").status_code == 401
    assert catalog.fine_tuning.list() == []  # nothing refused was recorded

    # 12 steps of 8 at 5 x 2e-4: enough for the marker (at 2e-4 it does not appear).
    job = client.fine_tuning.jobs.create(
        model=MODEL, training_file=good.id, suffix="zebra", seed=7,
        hyperparameters={"batch_size": 8, "learning_rate_multiplier": 5, "n_epochs": 3},
        extra_body={"max_steps": 12, "backend": "unsloth"},
    )  # fmt: skip
    assert job.status == "queued" and job.model == MODEL and job.fine_tuned_model is None
    assert job.hyperparameters.learning_rate_multiplier == pytest.approx(5)
    # The second waits for the gpu pool; cancelled there, its run never starts.
    second = client.fine_tuning.jobs.create(model=MODEL, training_file=good.id,
                                            extra_body={"backend": "hf"})  # fmt: skip
    assert client.fine_tuning.jobs.cancel(second.id).status == "cancelled"
    error = bad_request(lambda: client.fine_tuning.jobs.cancel(second.id))
    assert "cannot be cancelled" in error["message"]
    page = client.fine_tuning.jobs.list(limit=1)
    assert [j.id for j in page.data] == [second.id] and page.has_more

    # Killed as it trains: the daemon retries the run, which trains again from the start.
    def steps(job_id: str) -> list[dict]:
        events = client.fine_tuning.jobs.list_events(job_id, limit=1000).data
        return [
            e.data
            for e in reversed(events)
            if e.type == "metrics" and e.data.get("train_loss") is not None
        ]

    wait_for(lambda: len(steps(job.id)) >= 2, 300, "two training steps")
    first_run = catalog.fine_tuning.get(job.id)["run_id"]
    for pid in _run_pids(platform.instance, first_run):
        os.kill(pid, signal.SIGKILL)
    done = wait_for(
        lambda: (
            (j := client.fine_tuning.jobs.retrieve(job.id)).status
            in ("succeeded", "failed", "cancelled")
            and j
        ),
        600,
        "the job to end",
    )
    assert done.status == "succeeded", done.error
    row = catalog.fine_tuning.get(job.id)
    assert row["run_id"] != first_run
    retry = platform.instance.get_run_by_id(row["run_id"])
    assert retry.tags.get("dagster/parent_run_id") == first_run
    assert not (platform.home / "bucket" / "adapters" / f"{job.id}.partial").exists()
    losses = [s["train_loss"] for s in steps(job.id)]
    assert losses[-1] < losses[0] / 3, losses  # the retry's 12 after the killed run's few
    assert done.fine_tuned_model.startswith(f"ft:{MODEL}:zebra:")
    assert row["result"]["backend"] == "unsloth" and row["result"]["steps"] == 12
    # The same run evaluates it next; deploying before that is refused.
    error = bad_request(lambda: client.post(f"/fine_tuning/jobs/{job.id}/deploy", body={},
                                            cast_to=object))  # fmt: skip
    assert error["code"] == "evaluation_failed" and "was not evaluated" in error["message"]
    evaluation = wait_for(
        lambda: client.fine_tuning.jobs.retrieve(job.id).model_extra["evaluation"], 300,
        "the evaluation",
    )  # fmt: skip
    assert evaluation["passed"] and evaluation["metric"] == "rouge_l", evaluation
    assert evaluation["adapter"]["rouge_l"] > evaluation["base"]["rouge_l"], evaluation
    cancelled = platform.instance.get_run_by_id(catalog.fine_tuning.get(second.id)["run_id"])
    assert cancelled.status == dg.DagsterRunStatus.CANCELED
    assert not (platform.home / "bucket" / "adapters" / second.id).exists()

    assert api.get(f"/fine_tuning/jobs/{job.id}/events", params={"after": "x"}).status_code == 400
    assert api.post(f"/fine_tuning/jobs/{job.id}/deploy", json={"force": "yes"}).status_code == 400
    assert api.post(f"/fine_tuning/jobs/{second.id}/deploy", json={}).status_code == 400
    env = {"VBS_HOME": str(platform.home), "VBS_API_KEY": API_KEY, "PATH": "/usr/bin:/bin"}

    def vbs(*args: str, api: bool = True) -> str:
        extra = ["--api-url", platform.api_url] if api else []
        done = subprocess.run([sys.executable, "-m", "vbs_cli.main", *args, *extra],
                              capture_output=True, text=True, env=env, timeout=60)  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert f"{job.id}  succeeded" in vbs("finetune", "list")
    assert "The job has successfully completed" in vbs("finetune", "events", job.id)
    waited = json.loads(vbs("finetune", "wait", job.id).splitlines()[-1])  # the progress bar's end
    assert waited["status"] == "succeeded" and waited["fine_tuned_model"] == done.fine_tuned_model

    # Deployed through the API's deploy step, then answering a batch by name.
    name = done.fine_tuned_model
    assert name not in [m.id for m in client.models.list().data]
    deployed = client.post(f"/fine_tuning/jobs/{job.id}/deploy", body={}, cast_to=object)
    assert deployed["model"] == name
    try:
        served_and_traced(platform, client, vbs, name, job, row, good, data)
    finally:
        # Retiring keeps the files and the lineage; the shared platform serves its own again.
        vbs("models", "retire", name, api=False)
    assert name not in [m.id for m in client.models.list().data]
    assert (platform.home / "bucket" / "adapters" / job.id / "adapter_config.json").exists()
    assert catalog.models.get(name)["lineage"]["job_id"] == job.id


def served_and_traced(platform, client, vbs, name, job, row, good, data) -> None:
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
    shown = vbs("lineage", name)
    assert hashlib.sha256(data).hexdigest() in shown and job.id in shown
    # The Dagster UI's chain: each asset's partition is the dataset version, and its recorded
    # data version is the id the catalog's chain uses.
    for asset, data_version in (
        (L.FINE_TUNED_ADAPTER, job.id), (L.ADAPTER_EVAL, job.id), (L.DEPLOYED_MODEL, name),
    ):  # fmt: skip
        event = platform.instance.get_latest_materialization_event(dg.AssetKey(asset))
        assert event.dagster_event.partition == row["dataset_version"], asset
        assert event.asset_materialization.tags["dagster/data_version"] == data_version, asset
