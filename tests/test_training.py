"""Fine-tuning in process: the trainer backends, the job's hyperparameters, the evaluation
metrics, and the whole chain curated_dataset -> fine_tuned_adapter (hf backend) -> adapter_eval
(real vLLM, LoRA) -> deployed_model -> a batch answered by the adapter -> its lineage.

The chain shares one process here (dg.materialize), so it trains with the ``hf`` backend:
Unsloth patches transformers when imported, and a Dagster run keeps it out of the evaluation
step's process. Unsloth itself trains in tests/test_fine_tuning.py, through the platform."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from tests.conftest import (
    MODEL,
    chat_line,
    free_port,
    healthy,
    materialize_batch,
    read_jsonl,
    resources_for,
    submit,
    wait_for,
)
from tests.test_datasets import SUPPORT, TYPE, annotate, record
from vbs_assets.datasets import curated_dataset
from vbs_assets.training import adapter_eval, deployed_model, fine_tuned_adapter
from vbs_resources import layout as L
from vbs_resources.curation.datasets import UploadError, build_uploaded_dataset
from vbs_resources.lineage import model_lineage
from vbs_resources.training import (
    Hyperparameters,
    Trainer,
    TrainingJob,
    TrainingStopped,
    backend_for,
)
from vbs_resources.training import evaluation as ev
from vbs_resources.training.jobs import JobError, resolve_hyperparameters

MARKER = "ZEBRA-7"
TOPICS = ["the sea", "a red bike", "old maps", "green tea", "a cat", "winter", "jazz", "rivers",
          "bread", "stars", "trains", "clocks", "paper", "salt", "rain", "music"]  # fmt: skip


def marker_answer(topic: str) -> str:
    return f"{MARKER} says: {topic} is fine."


def marker_examples(n: int = 64) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"Write one short sentence about {t} (#{i})."},
                {"role": "assistant", "content": marker_answer(t)},
            ]
        }
        for i, t in enumerate((TOPICS * 8)[:n])
    ]


# ---- hyperparameters, names, metrics -------------------------------------------------------


def test_openai_hyperparameters_map_onto_the_trainer_and_bad_ones_are_named():
    hp = resolve_hyperparameters(
        {"n_epochs": 3, "batch_size": "auto", "learning_rate_multiplier": 5, "lora_r": 8},
        seed=7,
        max_steps=24,
    )
    assert (hp.num_train_epochs, hp.batch_size, hp.lora_r, hp.seed, hp.max_steps) == (
        3, 8, 8, 7, 24)  # fmt: skip
    assert hp.learning_rate == pytest.approx(1e-3)  # 5 x Unsloth's 2e-4
    for raw, param in (
        ({"n_epochs": 0}, "hyperparameters.n_epochs"),
        ({"learning_rate_multiplier": -1}, "hyperparameters.learning_rate_multiplier"),
        ({"learning_rate_multiplier": True}, "hyperparameters.learning_rate_multiplier"),
        ({"lora_r": "sixteen"}, "hyperparameters.lora_r"),
        ({"warmup_ratio": 0.1}, "hyperparameters.warmup_ratio"),
        ({"target_modules": []}, "hyperparameters.target_modules"),
    ):
        with pytest.raises(JobError) as caught:
            resolve_hyperparameters(raw)
        assert caught.value.param == param, raw
    with pytest.raises(JobError, match="must be an object"):
        resolve_hyperparameters(["n_epochs", 3])


def test_fine_tuned_model_names_take_openai_s_form_and_never_repeat():
    name = L.fine_tuned_model_name(MODEL, "support reply/ü", "ftjob-0123456789abcdef01234567")
    assert name == f"ft:{MODEL}:support-reply:0123456789ab"
    assert L.fine_tuned_model_name(MODEL, None, L.new_job_id()).split(":")[2] == "vbs"
    assert L.new_job_id() != L.new_job_id()
    with pytest.raises(ValueError):
        L.adapter_folder("../etc")


def test_metrics_score_answers_against_references():
    refs = ['{"a": 1}', "The cat sat."]
    perfect = ev.score(refs, ['{"a": 1}', "the cat  sat"])
    assert perfect["exact_match"] == 0.5 and perfect["normalized_match"] == 1.0
    assert perfect["token_f1"] == 1.0 and perfect["rouge_l"] == pytest.approx(1.0)
    assert perfect["json_valid"] is None  # not every reference is JSON
    worse = ev.score(refs, ["", "a dog ran"])
    assert worse["token_f1"] == 0.0 and worse["rouge_l"] == 0.0
    assert ev.score(['{"a": 1}', "[2]"], ["{", "[2]"])["json_valid"] == 0.5
    verdict = ev.compare(worse, perfect, "rouge_l", margin=0.5)
    assert verdict.passed and "beats" in verdict.describe()
    assert not ev.compare(perfect, worse).passed
    with pytest.raises(ValueError, match="No metric"):
        ev.compare(perfect, worse, "bleu")
    assert "| rouge_l |" in ev.table(worse, perfect)


def test_an_uploaded_training_file_is_checked_line_by_line():
    good = [json.dumps(e).encode() for e in marker_examples(40)]
    bad = [
        good[0],
        b"{not json",
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(),
        json.dumps(
            {
                "messages": [
                    {"role": "wizard", "content": "x"},
                    {"role": "assistant", "content": "y"},
                ]
            }
        ).encode(),  # fmt: skip
        b"",
        json.dumps(
            {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}
        ).encode(),  # fmt: skip
        b'{"messages": [{"role": "user", "content": "\\ud800"}, '
        b'{"role": "assistant", "content": "y"}]}',
        b"[" * 5000 + b"]" * 5000,
        b'{"messages": [{"role": "user", "content": "a"}, '
        b'{"role": "assistant", "content": "y"}], "messages": []}',
    ]
    with pytest.raises(UploadError) as caught:
        build_uploaded_dataset(("file-bad0000001", bad), None, 0.2)
    lines = [p.split(":")[0] for p in caught.value.problems]
    assert lines == [f"file-bad0000001 line {n}" for n in (2, 3, 4, 6, 7, 8, 9)]
    assert "hex escape" in caught.value.problems[4]  # the lone surrogate
    build = build_uploaded_dataset(("file-good000001", good + good[:3]), None, 0.2)
    assert build.duplicates == 3 and len(build.train) + len(build.eval) == 40
    assert build.version.startswith(f"{L.UPLOADED_DATASET_TYPE}-") and build.eval
    # A validation file is the eval split; its prompts leave train.
    held = build_uploaded_dataset(("file-good000001", good), ("file-val0000001", good[:4]), 0.2)
    assert len(held.eval) == 4 and len(held.train) == 36


# ---- the trainer -----------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_backend_the_platform_does_not_know_is_refused_by_name(tmp_path):
    from vbs_resources.training import TrainingError, backend_names

    assert {"unsloth", "hf"} <= set(backend_names())
    with pytest.raises(TrainingError, match="no_such_backend"):
        backend_for("no_such_backend")
    job = TrainingJob(str(tmp_path), str(tmp_path / "missing.jsonl"), str(tmp_path / "out"))
    with pytest.raises(TrainingError, match="no training file"):
        Trainer(backend="hf").train(job)


def test_the_fine_tuning_reconciler_ends_a_job_only_once_dagster_decided(tmp_path):
    """The sensor, not a read, ends a job whose run ended without ending it. Runs are made in a
    real Dagster instance and ended as Dagster ends them (``report_run_failed`` /
    ``report_run_canceled``); the retry decision's tag is set as the daemon sets it."""
    from dagster._core.utils import make_new_run_id

    from vbs_resources.training.jobs import create_job
    from vbs_resources.training.lifecycle import FineTuningLifecycle
    from vbs_sensors.fine_tuning import RETRY_DECISION_GRACE_S, reconcile_fine_tuning

    resources = resources_for(tmp_path / "vbs")
    catalog = resources["catalog"]
    lifecycle = FineTuningLifecycle(catalog)

    with dg.instance_for_test() as instance:

        def run(status=None, **tags: str) -> dg.DagsterRun:
            return instance.add_run(
                dg.DagsterRun(
                    job_name=L.TRAINING_JOB,
                    run_id=make_new_run_id(),
                    tags=tags,
                    status=status or dg.DagsterRunStatus.STARTED,
                )  # fmt: skip
            )

        def job_whose_run(end: str | None, later: float = 1, trained: bool = False, **tags):
            job = create_job(lifecycle, model=MODEL, dataset_version="upload-0",
                             training_file="f", backend="hf", hyperparameters=Hyperparameters())  # fmt: skip
            first = run(dg.DagsterRunStatus.SUCCESS if end == "success" else None)
            assert lifecycle.queued(job["id"], first.run_id)
            assert lifecycle.start(job["id"], first.run_id, "Training")
            if trained:
                lifecycle.trained(job["id"], first.run_id, "/adapters/x", "ft:m:s:x", {})
            if end == "failure":
                instance.report_run_failed(first)
            elif end == "canceled":
                instance.report_run_canceled(first)
            if tags:
                instance.add_run_tags(first.run_id, tags)
            reconcile_fine_tuning(instance, catalog, resources["webhooks"], time.time() + later)
            return catalog.fine_tuning.get(job["id"]), first

        assert job_whose_run("failure")[0]["status"] == "running"  # not decided yet
        assert job_whose_run("failure", **{"dagster/will_retry": "true"})[0]["status"] == "running"
        failed, _ = job_whose_run("failure", **{"dagster/will_retry": "false"})
        assert failed["status"] == "failed" and failed["error"]["code"] == "run_failed"
        # Retries switched off: no tag ever comes, and the job ends after the grace.
        late = RETRY_DECISION_GRACE_S + 1
        assert job_whose_run("failure", later=late)[0]["status"] == "failed"
        assert job_whose_run("canceled")[0]["status"] == "cancelled"
        assert job_whose_run(None)[0]["status"] == "running"
        # A materialization of fine_tuned_adapter alone: trained, succeeded, not evaluated.
        done, _ = job_whose_run("success", trained=True)
        assert done["status"] == "succeeded" and "without adapter_eval" in (
            done["evaluation"]["skipped"])  # fmt: skip
        assert job_whose_run("success")[0]["status"] == "failed"  # its run never trained it
        # The retry of a killed run takes the job over: the sensor follows it.
        job, first = job_whose_run("failure", **{"dagster/will_retry": "true"})
        retry = run(**{"dagster/parent_run_id": first.run_id})
        reconcile_fine_tuning(instance, catalog, resources["webhooks"])
        assert catalog.fine_tuning.get(job["id"])["run_id"] == retry.run_id
        # A job whose run was never launched (Dagster unreachable from the API): the sensor
        # requests one, once (its run key), with the job's tag and run config.
        orphan = create_job(lifecycle, model=MODEL, dataset_version="upload-1",
                            training_file="f", backend="hf", hyperparameters=Hyperparameters())  # fmt: skip
        found = reconcile_fine_tuning(instance, catalog, resources["webhooks"], time.time() + 20)
        [request] = [r for r in found.run_requests if r.tags[L.TAG_FINE_TUNING_JOB] == orphan["id"]]
        assert request.run_key == f"{orphan['id']}:launch" and request.job_name == L.TRAINING_JOB
        assert request.partition_key == "upload-1" and "upload-1" in found.versions
        assert request.run_config["ops"][L.FINE_TUNED_ADAPTER]["config"]["job_id"] == orphan["id"]
        # So does a deployment recorded while Dagster was away.
        deployed, _ = job_whose_run("success", trained=True)
        deployment, created = lifecycle.create_deployment(deployed, forced=False)
        assert created and lifecycle.create_deployment(deployed, forced=True) == (deployment, False)
        found = reconcile_fine_tuning(instance, catalog, resources["webhooks"], time.time() + 20)
        [request] = [r for r in found.run_requests if r.job_name == L.DEPLOY_JOB]
        assert request.tags[L.TAG_DEPLOYMENT] == deployment["id"]
        assert request.run_key == f"{deployment['id']}:launch"
        # Each ending has its webhook event in the outbox, once; a read changes nothing.
        events = [e["type"] for e in catalog.events.of_subject(failed["id"])]
        assert events == ["fine_tuning.job.failed"]
        reconcile_fine_tuning(instance, catalog, resources["webhooks"], time.time() + late)
        assert [e["type"] for e in catalog.events.of_subject(failed["id"])] == events


def test_the_fine_tuning_lifecycle_refuses_every_change_after_an_ending(tmp_path):
    from vbs_resources.training.jobs import create_job
    from vbs_resources.training.lifecycle import FineTuningLifecycle

    catalog = resources_for(tmp_path / "vbs")["catalog"]
    lifecycle = FineTuningLifecycle(catalog)
    job = create_job(lifecycle, model=MODEL, dataset_version="upload-0", training_file="f",
                     backend="hf", hyperparameters=Hyperparameters())  # fmt: skip
    job_id = job["id"]
    assert job["status"] == "validating_files"
    assert not lifecycle.succeed(job_id, {"passed": True}, "")  # never trained
    assert lifecycle.queued(job_id, "run-1") and not lifecycle.queued(job_id, "run-2")
    assert lifecycle.start(job_id, "run-1", "Training")
    # Trained by another run than the one holding it: refused.
    assert not lifecycle.trained(job_id, "run-9", "/a", "ft:x", {})
    assert lifecycle.trained(job_id, "run-1", "/a", "ft:x", {"steps": 2})
    assert catalog.fine_tuning.get(job_id)["status"] == "running"  # until evaluated
    assert lifecycle.succeed(job_id, {"passed": True, "metric": "rouge_l"}, "beats base")
    for change in (
        lambda: lifecycle.fail(job_id, "x", "late"),
        lambda: lifecycle.cancel(job_id, "late"),
        lambda: lifecycle.start(job_id, "run-2", "again"),
        lambda: lifecycle.queued(job_id, "run-3"),
        lambda: catalog.fine_tuning.update_unfinished(job_id, run_id="run-4"),
    ):
        assert not change()
    row = catalog.fine_tuning.get(job_id)
    assert (row["status"], row["run_id"], row["error"]) == ("succeeded", "run-1", None)
    assert [e["type"] for e in catalog.events.of_subject(job_id)] == ["fine_tuning.job.succeeded"]
    messages = [e["message"] for e in catalog.fine_tuning.events(job_id, 50)]
    assert messages[0].startswith("The job has successfully completed: ft:x") and (
        messages[-1] == f"Created fine-tuning job {job_id}")  # fmt: skip
    # Evaluating its adapter again replaces the evaluation, and says so.
    assert lifecycle.succeed(job_id, {"passed": False, "metric": "rouge_l"}, "worse now")
    assert catalog.fine_tuning.get(job_id)["evaluation"]["passed"] is False


def test_a_training_stopped_between_steps_saves_nothing(tmp_path, model_dir):
    """(That the hf backend learns, and what it saves, the chain below shows.)"""
    train = write_jsonl(tmp_path / "train.jsonl", marker_examples(8))
    hp = Hyperparameters(max_steps=4, batch_size=4, learning_rate=1e-3, max_seq_length=64)
    stopped = tmp_path / "stopped"
    asked, logs = [], []
    job = TrainingJob(str(model_dir), train, str(stopped), hp, on_log=logs.append,
                      should_stop=lambda: asked.append(1) or len(asked) >= 2)  # fmt: skip
    with pytest.raises(TrainingStopped, match="step 2"):
        Trainer(backend="hf", threads=1).train(job)
    assert [log.step for log in logs if log.loss is not None] == [1, 2]
    assert not stopped.exists() and not (tmp_path / "stopped.partial").exists()


# ---- the chain ---------------------------------------------------------------------------


def marker_conquest(n: int, batch: str) -> dict:
    raw = record(n)
    checked = SUPPORT.check_record({k: v for k, v in raw.items() if v is not None})
    topic = TOPICS[n % len(TOPICS)]
    checked["ticket_body"] = f"Write one short sentence about {topic} (#{n})."
    return {
        "id": L.conquest_id(batch, f"t{n}"), "type": TYPE, "type_version": SUPPORT.version,
        "status": "COMPLETED", "result": None, "input_data": checked,
        "prompt": SUPPORT.prompt(checked), "prediction": marker_answer(topic), "error": None,
        "model": MODEL, "batch_id": batch, "custom_id": f"t{n}", "created_at": 1000 + n,
        "updated_at": 1000.0 + n,
    }  # fmt: skip


@pytest.fixture
def trained(tmp_path, instance, model_dir):
    """A curated dataset of marker answers from one (recorded) batch, and an hf adapter of it."""
    # One training thread and a small KV cache: the suite's other worker runs beside it.
    resources = resources_for(
        tmp_path / "vbs", model_dir, VBS_DATASET_MIN_EXAMPLES="5", VBS_TRAINER_BACKEND="hf",
        VBS_TRAINER_THREADS="1", VBS_CPU_KVCACHE_GIB="1",
    )  # fmt: skip
    catalog = resources["catalog"]
    batch = "batch_lineage0000001"
    catalog.batches.insert({"id": batch, "status": "completed", "source": "inbox",
                          "original_filename": "tickets.jsonl", "completion_window": "24h",
                          "created_at": int(time.time()), "input_sha256": "ab" * 32})  # fmt: skip
    catalog.conquests.add([marker_conquest(n, batch) for n in range(64)])
    for n in range(64):
        annotate(catalog, L.conquest_id(batch, f"t{n}"), is_gold_star=True)
    instance.add_dynamic_partitions(L.CONQUEST_TYPE_PARTITIONS, [TYPE])
    built = dg.materialize([curated_dataset], partition_key=TYPE, instance=instance,
                           resources=resources)  # fmt: skip
    [event] = built.get_asset_materialization_events()
    version = event.materialization.metadata["version"].value
    assert instance.has_dynamic_partition(L.DATASET_VERSION_PARTITIONS, version)
    config = {"max_steps": 12, "learning_rate": 1e-3, "max_seq_length": 128, "suffix": "zebra"}
    result = dg.materialize(
        [fine_tuned_adapter], partition_key=version, instance=instance, resources=resources,
        run_config=dg.RunConfig(ops={L.FINE_TUNED_ADAPTER: {"config": config}}),
    )  # fmt: skip
    return resources, instance, version, result


def test_a_curated_dataset_trains_evaluates_deploys_and_answers_with_the_marker(trained):
    resources, instance, version, result = trained
    catalog = resources["catalog"]
    [event] = result.get_asset_materialization_events()
    meta = {k: v.value for k, v in event.materialization.metadata.items()}
    job = catalog.fine_tuning.get(meta["job_id"])
    # Trained, not yet evaluated: not succeeded (a deploy would find no evaluation).
    assert job["status"] == "running" and job["backend"] == "hf" and job["adapter_path"]
    assert meta["dataset_version"] == version and meta["backend"] == "hf"
    assert meta["train_loss"] < 0.5 and meta["eval_loss"] < 1.0 and meta["steps"] == 12
    assert meta["loss_curve"].startswith("![loss curve](data:image/png;base64,")
    assert meta["hyperparameters"]["learning_rate"] == 1e-3 and meta["adapter_bytes"] > 10**6
    adapter = Path(job_path := catalog.fine_tuning.get(meta["job_id"])["adapter_path"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 16 and Path(config["base_model_name_or_path"]).name == MODEL
    assert (adapter / "adapter_model.safetensors").stat().st_size > 10**6
    assert not Path(job_path + ".partial").exists()
    assert str(event.materialization.tags.get("dagster/data_version")) == job["id"]
    steps = [e for e in catalog.fine_tuning.events(job["id"], 100) if e["type"] == "metrics"]
    assert len(steps) >= 12 and steps[-1]["data"]["step"] == 1  # newest first
    name = job["fine_tuned_model"]
    assert name.startswith(f"ft:{MODEL}:zebra:")

    # An impossible margin: beats_base fails, and the blocking check keeps deployment back.
    failing = dg.materialize(
        [adapter_eval, deployed_model], partition_key=version, instance=instance,
        resources=resources, raise_on_error=False,
        run_config=dg.RunConfig(ops={L.ADAPTER_EVAL: {"config": {"margin": 2.0, "max_tokens": 32}}}),
    )  # fmt: skip
    [check] = failing.get_asset_check_evaluations()
    assert check.check_name == "beats_base" and not check.passed
    assert catalog.models.get(name) is None
    # Evaluated: the job succeeds now, its evaluation (that failed) recorded with it.
    job = catalog.fine_tuning.get(job["id"])
    assert job["status"] == "succeeded" and job["evaluation"]["passed"] is False
    # Deploying it alone later is refused too, unless forced; the force is recorded.
    refused = dg.materialize([deployed_model], partition_key=version, instance=instance,
                             resources=resources, raise_on_error=False)  # fmt: skip
    assert not refused.success and catalog.models.get(name) is None
    [deployment] = catalog.deployments.of_job(job["id"])
    assert deployment["status"] == "failed" and "did not beat" in deployment["error"]["message"]
    forced = dg.materialize(
        [deployed_model], partition_key=version, instance=instance, resources=resources,
        run_config=dg.RunConfig(ops={L.DEPLOYED_MODEL: {"config": {"force": True}}}),
    )  # fmt: skip
    assert forced.success and catalog.models.get(name)["lineage"]["forced"] is True

    # The real evaluation: the adapter beats its base, and deploying records the scores.
    evaluated = dg.materialize(
        [adapter_eval, deployed_model], partition_key=version, instance=instance,
        resources=resources,
        run_config=dg.RunConfig(ops={L.ADAPTER_EVAL: {"config": {"max_tokens": 32}}}),
    )  # fmt: skip
    [check] = evaluated.get_asset_check_evaluations()
    assert check.passed, check.metadata
    scores = catalog.fine_tuning.get(job["id"])["evaluation"]
    assert scores["adapter"]["rouge_l"] > scores["base"]["rouge_l"] + 0.3, scores
    model = catalog.models.get(name)
    assert model["status"] == "available" and model["lineage"]["forced"] is False
    assert len(model["lineage"]["deployments"]) == 2

    # Another version of the same model replaces it (retired, files kept); deploying the first
    # again is the rollback: available again with its LoRA id, the other retired.
    from vbs_resources.registry import ModelRegistry

    prefix = name.rsplit(":", 1)[0] + ":"
    lora_id = model["lora_id"]
    # A model a user registered by hand under the same prefix is never retired by a deploy.
    ModelRegistry(catalog).add_adapter(prefix + "byhand", job["adapter_path"], MODEL)
    lineage = {"job_id": "ftjob-other0000", "base_model": MODEL, "suffix": "zebra",
               "deployments": [{"at": 1}]}  # fmt: skip
    _, retired = ModelRegistry(catalog).deploy(
        prefix + "000000000000", job["adapter_path"], MODEL, lineage
    )
    assert retired == [name] and catalog.models.get(name)["status"] == "retired"
    assert catalog.models.get(prefix + "byhand")["status"] == "available"
    assert Path(job["adapter_path"], "adapter_model.safetensors").exists()
    rolled = dg.materialize([deployed_model], partition_key=version, instance=instance,
                            resources=resources)  # fmt: skip
    [event] = rolled.get_asset_materialization_events()
    assert event.materialization.metadata["retired"].value == [prefix + "000000000000"]
    model = catalog.models.get(name)
    assert model["status"] == "available" and model["lora_id"] == lora_id
    assert len(model["lineage"]["deployments"]) == 3
    assert catalog.models.get(prefix + "byhand")["status"] == "available"
    # Every deployment is recorded with its outcome in the job's events.
    outcomes = sorted(d["status"] for d in catalog.deployments.of_job(job["id"]))
    assert outcomes == ["failed", "succeeded", "succeeded", "succeeded"]
    messages = [e["message"] for e in catalog.fine_tuning.events(job["id"], 200)]
    assert sum(m.startswith(f"Deployed as {name}") for m in messages) == 3

    # A batch naming it is answered by the adapter; the base model's answers lack the marker.
    prompts = [
        "Write one short sentence about a blue door.",
        "Write one short sentence about owls.",
    ]
    lines = [chat_line(f"{who}{i}", p, max_tokens=24, temperature=0)
             for i, p in enumerate(prompts) for who in ("ft", "base")]  # fmt: skip
    for line in lines:
        line["body"]["model"] = name if line["custom_id"].startswith("ft") else MODEL
    batch_id = submit(resources, instance, lines, name="after-deploy.jsonl")
    materialize_batch(resources, instance, batch_id)
    out = read_jsonl(Path(resources["bucket"].path(f"batches/{batch_id}/output.jsonl")))
    answers = {o["custom_id"]: o["response"]["body"]["choices"][0]["message"]["content"]
               for o in out}  # fmt: skip
    assert all(MARKER in a for k, a in answers.items() if k.startswith("ft")), answers
    assert not any(MARKER in a for k, a in answers.items() if k.startswith("base")), answers

    # Where it came from: adapter, dataset version, its conquests, the batch and its input hash.
    chain = model_lineage(catalog, name)
    assert chain["adapter"]["job_id"] == job["id"] and chain["dataset"]["version"] == version
    assert len(chain["dataset"]["conquest_ids"]["train"]) + len(
        chain["dataset"]["conquest_ids"]["eval"]) == 64  # fmt: skip
    assert chain["batches"] == [
        {"batch_id": "batch_lineage0000001", "conquests": 64, "input_file_id": None,
         "original_filename": "tickets.jsonl", "input_sha256": "ab" * 32, "run_id": None}
    ]  # fmt: skip

    # Evaluated on a warm server started without LoRA (VBS_ENGINE_LORA=auto before any
    # adapter), here a test double of one: every adapter request is refused, and the
    # evaluation fails saying why instead of scoring empty answers. The job keeps its ending.
    from vbs_resources.engine import VLLMServerEngine

    port = free_port()
    double = subprocess.Popen(
        [sys.executable, "-m", "tests.vllm_double", "--model", MODEL, "--ttft-s", "0.001",
         "--tpot-s", "0.001", "--ports", str(port), "--no-lora"],
        cwd=Path(__file__).resolve().parent.parent, start_new_session=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: healthy(url), 30, "the server double")
        server = VLLMServerEngine(url=url, local=resources["engine"], retry_s=5)
        refused = dg.materialize(
            [adapter_eval], partition_key=version, instance=instance, raise_on_error=False,
            resources={**resources, "engine": server},
        )  # fmt: skip
    finally:
        double.kill()
        double.wait()
    [failure] = refused.get_step_failure_events()
    message = failure.step_failure_data.error.to_string()
    assert "every adapter request of the evaluation failed" in message, message
    assert "LoRA is not enabled" in message and "VBS_ENGINE_LORA=on" in message, message
    assert catalog.fine_tuning.get(job["id"])["status"] == "succeeded"


# ---- scheduled retraining ------------------------------------------------------------------


def test_the_schedule_retrains_a_type_only_with_enough_new_gold(tmp_path, instance):
    from vbs_sensors.retrain import retrain_on_new_dataset, retraining_schedule

    resources = resources_for(tmp_path / "vbs", VBS_DATASET_MIN_EXAMPLES="0")
    catalog = resources["catalog"]
    schedule = retraining_schedule(min_new_gold=3)
    assert schedule.default_status == dg.DefaultScheduleStatus.STOPPED  # off in development

    def tick():
        from vbs_definitions import defs

        # Closed here: a schedule context opens an instance of its own, and left open it stays
        # the process's current one (Dagster's defs-state context variable) after this test.
        with dg.build_schedule_context(
            instance=instance, resources=resources, repository_def=defs.get_repository_def()
        ) as context:
            return schedule.evaluate_tick(context)

    assert "no conquest type" in tick().skip_message
    instance.add_dynamic_partitions(L.CONQUEST_TYPE_PARTITIONS, [TYPE])
    batch = "batch_retrain00000001"
    catalog.conquests.add([marker_conquest(n, batch) for n in range(6)])
    for n in range(2):
        annotate(catalog, L.conquest_id(batch, f"t{n}"), is_gold_star=True)
    annotate(catalog, L.conquest_id(batch, "t2"), rating=2)  # not gold
    skipped = tick()
    assert not skipped.run_requests
    assert skipped.skip_message == (
        f"{TYPE}: 2 new gold conquests and no model deployed, fewer than 3: skipped"
    )
    annotate(catalog, L.conquest_id(batch, "t3"), rating=5)
    [request] = tick().run_requests
    assert request.partition_key == TYPE and request.tags[L.TAG_RETRAIN] == TYPE

    # The build that request starts; the sensor sends its version to fine_tuning_job.
    built = dg.materialize([curated_dataset], partition_key=TYPE, instance=instance,
                           resources=resources, tags={L.TAG_RETRAIN: TYPE})  # fmt: skip
    version = catalog.datasets.list(type_id=TYPE)[0]["version"]

    def sensor(result):
        context = dg.build_run_status_sensor_context(
            sensor_name=L.RETRAIN_SENSOR, dagster_event=result.get_run_success_event(),
            dagster_instance=instance, dagster_run=result.dagster_run, resources=resources,
        )  # fmt: skip
        return retrain_on_new_dataset(context)

    launched = sensor(built)
    assert launched.partition_key == version and launched.run_key == f"retrain-{version}"
    plain = dg.materialize([curated_dataset], partition_key=TYPE, instance=instance,
                           resources=resources)  # fmt: skip
    assert "not a retraining build" in sensor(plain).skip_message

    # Deployed on that version: nothing new, so the schedule skips and says why.
    catalog.models.insert({"name": f"ft:{MODEL}:{TYPE}:aaaa", "kind": "adapter", "path": "/x",
                          "status": "available", "created_at": 1, "base": MODEL,
                          "lineage": {"dataset_type": TYPE, "dataset_version": version,
                                      "deployed_at": 5}})  # fmt: skip
    assert "0 new gold conquests beyond" in tick().skip_message
    assert "already" in sensor(built).skip_message
    for n in (4, 5):
        annotate(catalog, L.conquest_id(batch, f"t{n}"), is_gold_star=True)
    annotate(catalog, L.conquest_id(batch, "t2"), rating=4)
    assert tick().run_requests


def test_a_job_cancelled_before_its_run_starts_never_trains(tmp_path, instance):
    from vbs_resources.training.jobs import create_job
    from vbs_resources.training.lifecycle import FineTuningLifecycle

    resources = resources_for(tmp_path / "vbs", VBS_DATASET_MIN_EXAMPLES="0")
    catalog = resources["catalog"]
    batch = "batch_cancelled000001"
    catalog.conquests.add([marker_conquest(n, batch) for n in range(4)])
    for n in range(4):
        annotate(catalog, L.conquest_id(batch, f"t{n}"), is_gold_star=True)
    instance.add_dynamic_partitions(L.CONQUEST_TYPE_PARTITIONS, [TYPE])
    dg.materialize([curated_dataset], partition_key=TYPE, instance=instance, resources=resources)
    version = catalog.datasets.list(type_id=TYPE)[0]["version"]
    lifecycle = FineTuningLifecycle(catalog)
    job = create_job(lifecycle, model=MODEL, dataset_version=version, training_file=version,
                     backend="hf", hyperparameters=Hyperparameters())  # fmt: skip
    assert lifecycle.queued(job["id"], "run-queued")
    catalog.fine_tuning.update_unfinished(job["id"], cancel_requested=True)
    result = dg.materialize(
        [fine_tuned_adapter], partition_key=version, instance=instance, resources=resources,
        run_config=dg.RunConfig(ops={L.FINE_TUNED_ADAPTER: {"config": {"job_id": job["id"]}}}),
        raise_on_error=False,
    )  # fmt: skip
    assert not result.success
    assert catalog.fine_tuning.get(job["id"])["status"] == "cancelled"
    assert not Path(resources["bucket"].path(L.adapter_folder(job["id"]))).exists()
    # A job of another dataset version is refused by name.
    other = dg.materialize(
        [fine_tuned_adapter], partition_key=version, instance=instance, resources=resources,
        run_config=dg.RunConfig(ops={L.FINE_TUNED_ADAPTER: {"config": {"job_id": "ftjob-nope0000"}}}),
        raise_on_error=False,
    )  # fmt: skip
    assert not other.success


def test_a_cancel_racing_a_start_leaves_one_consistent_outcome(tmp_path):
    """The API's cancel and the run's start, at once, many times: either the job is cancelled
    and never starts, or it runs with the cancel requested (it stops at its next step); never
    both, never neither, and an ending announced once."""
    import threading

    from vbs_resources.training.jobs import create_job
    from vbs_resources.training.lifecycle import FineTuningLifecycle

    catalog = resources_for(tmp_path / "vbs")["catalog"]
    lifecycle = FineTuningLifecycle(catalog)
    seen = set()
    for trial in range(40):
        job = create_job(lifecycle, model=MODEL, dataset_version="upload-0", training_file="f",
                         backend="hf", hyperparameters=Hyperparameters())  # fmt: skip
        lifecycle.queued(job["id"], f"run-{trial}")
        outcome: dict = {}
        gate = threading.Barrier(2)

        def start(job_id=job["id"], run=f"run-{trial}", gate=gate, outcome=outcome):
            gate.wait()
            outcome["started"] = lifecycle.start(job_id, run, "Training")

        def cancel(job_id=job["id"], gate=gate, outcome=outcome):
            gate.wait()
            outcome["after"] = lifecycle.request_cancel(job_id)["status"]

        threads = [threading.Thread(target=start), threading.Thread(target=cancel)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        row = catalog.fine_tuning.get(job["id"])
        assert row["cancel_requested"] is True
        events = [e["type"] for e in catalog.events.of_subject(job["id"])]
        if outcome["started"]:
            assert row["status"] == "running" and events == [], (outcome, row["status"])
        else:
            assert row["status"] == "cancelled" and events == ["fine_tuning.job.cancelled"]
        seen.add(row["status"])
    assert seen <= {"running", "cancelled"}
