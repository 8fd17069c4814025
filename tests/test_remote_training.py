"""The ``openai`` training backend against a real OpenAI-compatible fine-tuning API: vbs serves
one, so the remote service is a vbs platform. Nothing is mocked: the session's platform (A)
trains; the backend runs in this process (cancellations, refusals), and on a second platform
(B), started here on its own ports, whose API takes the job with ``"backend": "openai"``."""

from __future__ import annotations

import hashlib
import json
import threading

import httpx
import pytest
from openai import OpenAI

from tests.conftest import (
    API_KEY,
    MODEL,
    Platform,
    jsonl,
    marker_job,
    start_platform,
    wait_for,
    wait_job_ended,
)
from tests.test_training import marker_examples
from vbs_resources import layout as L
from vbs_resources.training import (
    Hyperparameters,
    Trainer,
    TrainingError,
    TrainingJob,
    TrainingStopped,
)
from vbs_resources.training.openai_backend import RemoteCancelled

pytestmark = pytest.mark.slow

# The remote jobs: the hf backend, 3 steps (a vbs remote takes both as fields of its own).
EXTRA_BODY = {"backend": "hf", "max_steps": 3}
B_KEY = "second-platform-key"


def remote_env(platform: Platform) -> dict[str, str]:
    return {
        "VBS_OPENAI_FT_BASE_URL": platform.api_url,
        "VBS_OPENAI_FT_API_KEY": API_KEY,
        "VBS_OPENAI_FT_EXTRA_BODY": json.dumps(EXTRA_BODY),
        "VBS_OPENAI_FT_POLL_SECONDS": "0.5",
    }


@pytest.fixture
def remote(platform, monkeypatch):
    """This process's environment pointing the openai backend at the session's platform."""
    for key, value in remote_env(platform).items():
        monkeypatch.setenv(key, value)
    return OpenAI(base_url=platform.api_url, api_key=API_KEY, max_retries=0)


def training_job(tmp_path, **fields) -> TrainingJob:
    train = tmp_path / "train.jsonl"
    train.write_bytes(jsonl(marker_examples(16)))
    hp = Hyperparameters(batch_size=8, learning_rate=1e-3)
    return TrainingJob(
        MODEL, str(train), str(tmp_path / "out"), hp, base_name=MODEL, suffix="rt", **fields
    )


def test_a_local_cancel_cancels_the_remote_job(remote, tmp_path):
    notes: list[str] = []
    job = training_job(tmp_path, should_stop=lambda: True, on_event=notes.append)
    with pytest.raises(TrainingStopped, match="nothing was saved"):
        Trainer(backend="openai").train(job)
    [created] = [n for n in notes if n.startswith("Remote job ")]
    remote_id = created.split()[2]
    assert remote.fine_tuning.jobs.retrieve(remote_id).status == "cancelled"
    assert any(n == f"Cancelling the remote job {remote_id}" for n in notes)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_a_remote_cancel_ends_the_local_training_as_cancelled(remote, tmp_path):
    notes: list[str] = []
    outcome: list[BaseException] = []
    job = training_job(tmp_path, on_event=notes.append)

    def train() -> None:
        try:
            Trainer(backend="openai").train(job)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=train)
    thread.start()
    created = wait_for(lambda: [n for n in notes if n.startswith("Remote job ")], 60, "creation")
    remote_id = created[0].split()[2]
    remote.fine_tuning.jobs.cancel(remote_id)
    thread.join(120)
    assert not thread.is_alive()
    [error] = outcome
    assert isinstance(error, RemoteCancelled) and remote_id in str(error)


class Died(BaseException):
    """The run's process dying right after the remote job was created."""


def test_an_attempt_after_a_crash_follows_the_same_remote_job(remote, tmp_path):
    before = {j.id for j in remote.fine_tuning.jobs.list(limit=100).data}
    kept: list[dict] = []

    def die(message: str) -> None:
        if message.startswith("Remote job "):
            raise Died

    first = training_job(tmp_path, on_event=die, remember=kept.append)
    with pytest.raises(Died):
        Trainer(backend="openai").train(first)
    [state] = kept
    notes: list[str] = []
    again = training_job(tmp_path, on_event=notes.append, resume=state, remember=kept.append)
    outcome = Trainer(backend="openai").train(again)
    assert outcome.remote_job_id == state["remote_job_id"] and outcome.remote_model
    assert notes[0].startswith(f"Following the remote job {state['remote_job_id']} at ")
    assert len(kept) == 1  # nothing created again
    assert {j.id for j in remote.fine_tuning.jobs.list(limit=100).data} - before == {
        state["remote_job_id"]
    }


def test_bad_options_and_refusals_name_the_variable_or_the_remote_answer(
    remote, tmp_path, monkeypatch
):
    trainer = Trainer(backend="openai")
    monkeypatch.setenv("VBS_OPENAI_FT_MODEL", "no-such-model")
    with pytest.raises(TrainingError, match=r"BadRequestError.*no-such-model.*not an available"):
        trainer.train(training_job(tmp_path))
    monkeypatch.delenv("VBS_OPENAI_FT_MODEL")
    for value, message in (('{"a": NaN}', "not JSON"), ("[1]", "must be a JSON object"),
                           ('{"a": ' * 300 + "1" + "}" * 300, "not JSON")):  # fmt: skip
        monkeypatch.setenv("VBS_OPENAI_FT_EXTRA_BODY", value)
        with pytest.raises(TrainingError, match=f"^VBS_OPENAI_FT_EXTRA_BODY: .*{message}"):
            trainer.train(training_job(tmp_path))
    monkeypatch.setenv("VBS_OPENAI_FT_EXTRA_BODY", "{}")
    monkeypatch.setenv("VBS_OPENAI_FT_API_KEY", "wrong-key-123")
    with pytest.raises(TrainingError) as info:
        trainer.train(training_job(tmp_path))
    assert "AuthenticationError" in str(info.value) and "wrong-key-123" not in str(info.value)
    monkeypatch.delenv("VBS_OPENAI_FT_API_KEY")
    with pytest.raises(TrainingError, match="needs VBS_OPENAI_FT_API_KEY"):
        trainer.train(training_job(tmp_path))


# ---- through a second platform -----------------------------------------------------------------


@pytest.fixture(scope="module")
def second(tmp_path_factory, model_dir, platform):
    """Platform B: its openai backend trains on the session's platform (A)."""
    home = tmp_path_factory.mktemp("second") / "vbs"
    process = start_platform(home, model_dir, VBS_API_KEYS=B_KEY, **remote_env(platform))
    try:
        yield Platform(home, process.port, process.api_port, process.log, process)
    finally:
        process.stop()


def test_a_job_of_the_openai_backend_trains_on_the_other_platform_with_lineage(platform, second):
    a = OpenAI(base_url=platform.api_url, api_key=API_KEY, max_retries=0)
    b = OpenAI(base_url=second.api_url, api_key=B_KEY, max_retries=0)
    _, _, job = marker_job(b, 32, "far", {"backend": "openai"}, seed=11, n_epochs=1)
    done = wait_job_ended(b, job.id)
    messages = [e.message for e in b.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert done.status == "succeeded", messages
    row = second.resources["catalog"].fine_tuning.get(job.id)
    result = row["result"]
    assert (result["backend"], result["device"]) == ("openai", "remote")

    # Platform A trained it: its own job, its catalog, the same examples, the mapped knobs.
    theirs = a.fine_tuning.jobs.retrieve(result["remote_job_id"])
    assert theirs.status == "succeeded" and theirs.fine_tuned_model == done.fine_tuned_model
    assert done.fine_tuned_model == result["remote_model"]
    assert done.fine_tuned_model.startswith(f"ft:{MODEL}:far:")
    a_row = platform.resources["catalog"].fine_tuning.get(theirs.id)
    assert a_row["backend"] == "hf" and a_row["hyperparameters"]["max_steps"] == 3
    assert a_row["hyperparameters"]["batch_size"] == 8 and a_row["hyperparameters"]["seed"] == 11
    assert abs(a_row["hyperparameters"]["learning_rate"] - 1e-3) < 1e-12
    b_train = second.home / "bucket" / L.dataset_file(row["dataset_version"], L.TRAIN)
    a_file = platform.resources["catalog"].files.get(theirs.training_file)
    assert a_file["sha256"] == hashlib.sha256(b_train.read_bytes()).hexdigest()
    # A's events, copied into B's: its steps as metrics, its messages.
    assert any(
        m.startswith(f"Remote job {theirs.id} created at http://127.0.0.1:") for m in messages
    )
    steps = [
        e.data["step"]
        for e in b.fine_tuning.jobs.list_events(job.id, limit=100).data
        if e.type == "metrics" and e.data
    ]
    assert sorted(set(steps)) == [1, 2, 3], messages
    assert f"Remote: Created fine-tuning job {theirs.id}" in messages

    # B records the model as remote, with lineage to its dataset version; never serves it.
    api = httpx.Client(base_url=second.api_url, headers={"Authorization": f"Bearer {B_KEY}"})
    lineage = api.get(f"/models/{done.fine_tuned_model}/lineage").json()
    assert lineage["model"]["kind"] == "remote" and lineage["model"]["path"] == platform.api_url
    assert lineage["adapter"]["backend"] == "openai" and lineage["adapter"]["job_id"] == job.id
    assert lineage["dataset"]["version"] == row["dataset_version"]
    assert done.fine_tuned_model not in [m.id for m in b.models.list().data]
    refused = api.get(f"/models/{done.fine_tuned_model}")
    assert refused.status_code == 404 and "served at" in refused.json()["error"]["message"]
    deploy = api.post(f"/fine_tuning/jobs/{job.id}/deploy", json={})
    assert deploy.status_code == 400 and deploy.json()["error"]["code"] == "remote_model"
    assert second.resources["catalog"].deployments.of_job(job.id) == []
    assert row["evaluation"]["skipped"].endswith("not by this engine")
