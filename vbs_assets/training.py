"""Fine-tuning as assets: ``fine_tuned_adapter`` -> ``adapter_eval`` -> ``deployed_model``.

All three are partitioned by dataset version (``dataset_versions``: ``curated_dataset`` adds a
partition for every version it writes, the fine-tuning API one for every uploaded training
file), so a model's partition is the exact data it was trained on, and the asset graph shows the
chain from the batches to the served model.

- ``fine_tuned_adapter`` trains a LoRA adapter on the version with the trainer resource (pool
  ``gpu``), as a fine-tuning job (the API's, or one it makes for a materialization started
  elsewhere), with the loss per step in the log and the job's events, and a loss curve in its
  metadata. Its data version is the job id.
- ``adapter_eval`` runs the base model and the adapter through the inference engine (LoRA per
  request) on the eval split and scores both; the blocking check ``beats_base`` keeps a worse
  adapter from being deployed in the same run.
- ``deployed_model`` registers the adapter in the model registry as ``ft:<base>:<suffix>:<id>``
  with its lineage, retiring the model it replaces. It refuses an adapter whose evaluation did
  not pass unless ``force`` is set, and records the force.
"""

import base64
import contextlib
import io
import posixpath
import shutil
import time
from pathlib import Path
from typing import Any

import dagster as dg
import fsspec
from pydantic import Field

from vbs_assets.datasets import curated_dataset
from vbs_assets.partitions import dataset_version_partitions
from vbs_resources import Bucket, Catalog, InferenceEngine, Webhooks, strict_json
from vbs_resources import layout as L
from vbs_resources.bucket import local_folder, upload_folder
from vbs_resources.curation.datasets import failed_checks
from vbs_resources.engine import EngineRequest, EngineResult
from vbs_resources.registry import ModelRegistry, RegistryError, ServedModel, ServedModels
from vbs_resources.settings import cache_dir
from vbs_resources.training import (
    Trainer,
    TrainingError,
    TrainingJob,
    TrainingOutcome,
    TrainingStopped,
    TrainLog,
    backend_class,
)
from vbs_resources.training import evaluation as ev
from vbs_resources.training.jobs import JobError, create_job, resolve_hyperparameters
from vbs_resources.training.lifecycle import (
    FineTuningLifecycle,
    evaluation_refusal,
    is_trained,
    remote_model,
)


class FineTuneConfig(dg.Config):
    """One training. ``job_id`` is set by the fine-tuning API; without it the run makes its own
    job from the fields below (each unset one takes the trainer's default)."""

    job_id: str | None = Field(default=None, description="An existing fine-tuning job.")
    model: str | None = Field(default=None, description="Base model; the engine's base.")
    backend: str | None = Field(
        default=None,
        description="A training backend (`vbs finetune backends`); VBS_TRAINER_BACKEND.",
    )
    suffix: str | None = Field(default=None, description="Model name suffix; the dataset type.")
    lora_r: int | None = None
    lora_alpha: int | None = None
    learning_rate: float | None = None
    num_train_epochs: float | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    max_seq_length: int | None = None
    seed: int | None = None


class AdapterEvalConfig(dg.Config):
    job_id: str | None = Field(default=None, description="The job; the partition's latest.")
    metric: str = Field(default="rouge_l", description=f"beats_base's metric: {ev.METRICS}.")
    margin: float = Field(default=0.0, description="The adapter must score base + margin.")
    max_tokens: int = Field(default=128, ge=1, le=4096)
    limit: int = Field(default=200, ge=1, description="Eval examples scored at most.")


class DeployConfig(dg.Config):
    job_id: str | None = Field(default=None, description="The job; the partition's latest.")
    deployment_id: str | None = Field(
        default=None, description="The API's deployment; one is made when unset."
    )
    force: bool = Field(
        default=False, description="Deploy although beats_base failed (recorded in lineage)."
    )


def _dataset(context: dg.AssetExecutionContext, catalog: Catalog) -> dict[str, Any]:
    version = context.partition_key
    row = catalog.datasets.get(version)
    if row is None:
        raise dg.Failure(description=f"No dataset version {version} is recorded.")
    failed = failed_checks(row)
    if failed:
        raise dg.Failure(
            description=f"{version} failed its blocking checks ({'; '.join(failed)}): it is not "
            "trained on."
        )
    return row


def _base(engine: InferenceEngine, catalog: Catalog, name: str | None) -> dict[str, Any]:
    registry = ModelRegistry(catalog)
    registry.register_configured(engine.configured_models())
    bases = [m for m in registry.list() if m["kind"] == "base"]
    row = next((m for m in bases if m["name"] == (name or m["name"])), None)
    if row is None:
        raise JobError(f"{name!r} is not an available base model.", "model")
    return row


def _job(
    context: dg.AssetExecutionContext, catalog: Catalog, job_id: str | None, *, trained: bool
) -> dict[str, Any]:
    """The configured job; else the one this run trained; else the partition's latest with a
    trained adapter (``trained``) or that succeeded."""
    if job_id:
        job = catalog.fine_tuning.get(job_id)
        if job is None or job["dataset_version"] != context.partition_key:
            raise dg.Failure(f"No fine-tuning job {job_id} trained on {context.partition_key}.")
        return job
    jobs = catalog.fine_tuning.list(limit=50, dataset_version=context.partition_key)
    for job in jobs:
        if job["run_id"] == context.run_id and is_trained(job):
            return job
    for job in jobs:
        if job["status"] == "succeeded" or (trained and is_trained(job)):
            return job
    what = "trained adapter" if trained else "evaluated adapter"
    raise dg.Failure(f"{context.partition_key} has no {what}: materialize the one upstream.")


def loss_plot(logs: list[TrainLog]) -> str:
    """The loss curve (train per step, eval at the end) as a PNG in Markdown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(log.step, log.loss) for log in logs if log.loss is not None]
    evals = [(log.step, log.eval_loss) for log in logs if log.eval_loss is not None]
    figure, axes = plt.subplots(figsize=(6, 3.2), dpi=100)
    if train:
        axes.plot(*zip(*train, strict=True), marker=".", label="train loss")
    if evals:
        axes.plot(*zip(*evals, strict=True), "o", color="tab:red", label="eval loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return f"![loss curve](data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()})"


def _job_for_run(
    context: dg.AssetExecutionContext,
    config: FineTuneConfig,
    lifecycle: FineTuningLifecycle,
    engine: InferenceEngine,
    trainer: Trainer,
    dataset: dict[str, Any],
    max_lora_rank: int,
) -> dict[str, Any]:
    if config.job_id:
        return _job(context, lifecycle.catalog, config.job_id, trained=False)
    overrides = {
        k: v
        for k, v in config.model_dump().items()
        if v is not None and k not in ("job_id", "model", "backend", "suffix", "seed")
    }
    try:
        backend = config.backend or trainer.backend
        if backend_class(backend).remote:  # the remote service's base model, not ours
            base = {"name": config.model or engine.describe()["model"]}
        else:
            base = _base(engine, lifecycle.catalog, config.model)
        return create_job(
            lifecycle,
            model=base["name"],
            dataset_version=dataset["version"],
            training_file=dataset["version"],
            backend=backend,
            hyperparameters=resolve_hyperparameters(
                overrides, seed=config.seed, max_lora_rank=max_lora_rank
            ),
            suffix=config.suffix or dataset["type"],
            metadata={"started_by": context.run.tags.get("dagster/sensor_name", "dagster")},
        )
    except (JobError, TrainingError) as exc:
        raise dg.Failure(description=getattr(exc, "message", str(exc))) from None


@dg.asset(
    name=L.FINE_TUNED_ADAPTER,
    partitions_def=dataset_version_partitions,
    deps=[dg.AssetDep(curated_dataset, partition_mapping=dg.AllPartitionMapping())],
    pool="gpu",
    code_version="1",
    kinds={"pytorch"},
    group_name=L.TRAINING_GROUP,
)
def fine_tuned_adapter(
    context: dg.AssetExecutionContext,
    config: FineTuneConfig,
    bucket: Bucket,
    catalog: Catalog,
    engine: InferenceEngine,
    trainer: Trainer,
    webhooks: Webhooks,
) -> dg.MaterializeResult:
    """A LoRA adapter trained on the partition's dataset version, in ``adapters/<job id>/``
    (PEFT format); the data version is the job id. The job stays ``running`` until
    ``adapter_eval`` has evaluated the adapter."""
    lifecycle = FineTuningLifecycle(catalog, webhooks)
    dataset = _dataset(context, catalog)
    job = _job_for_run(context, config, lifecycle, engine, trainer, dataset, trainer.max_lora_rank)
    job_id = job["id"]
    try:
        remote = backend_class(job["backend"]).remote
    except TrainingError as exc:
        lifecycle.fail(job_id, "training_failed", str(exc))
        raise dg.Failure(description=str(exc)) from None
    base = (
        {"name": job["model"], "path": job["model"]}
        if remote
        else _base(engine, catalog, job["model"])
    )
    # The adapter's place in the bucket (an s3:// URL on an object store), and where the trainer
    # reads and writes: the bucket's own folders when local, else a working folder (the dataset
    # downloaded, the adapter uploaded once it is whole).
    output = bucket.uri(L.adapter_folder(job_id))
    work = _working_folder(bucket, job_id)
    hyperparameters = resolve_hyperparameters(job["hyperparameters"])
    # The retry of a run that died (killed, out of memory) takes its job over and starts clean.
    what = f"Training {base['name']} on {dataset['version']} with {job['backend']}"
    if not lifecycle.start(job_id, context.run_id, what):
        status = (catalog.fine_tuning.get(job_id) or {}).get("status")
        raise dg.Failure(f"{job_id} is {status}; create another job to train again.")
    context.log.info(
        f"{job_id}: {job['backend']} on {dataset['version']} "
        f"({dataset['train_count']} train, {dataset['eval_count']} eval)"
    )

    def on_log(log: TrainLog) -> None:
        if log.loss is not None:
            message = f"Step {log.step}/{log.total_steps}: training loss={log.loss:.4f}"
        else:
            message = f"Step {log.step}/{log.total_steps}: eval loss={log.eval_loss:.4f}"
        context.log.info(f"{job_id}: {message} ({log.elapsed_s:.0f}s)")
        data = {
            "step": log.step,
            "total_steps": log.total_steps,
            "train_loss": log.loss,
            "valid_loss": log.eval_loss,
            "learning_rate": log.learning_rate,
        }
        lifecycle.progress(job_id, message, data)

    def should_stop() -> bool:
        row = catalog.fine_tuning.get(job_id)
        return bool(row and row["cancel_requested"])

    train_job = TrainingJob(
        base_model=base["path"] if remote else local_folder(base["path"]),
        train_file=_local_file(bucket, L.dataset_file(dataset["version"], L.TRAIN), work),
        eval_file=_local_file(bucket, L.dataset_file(dataset["version"], L.EVAL), work)
        if dataset["eval_count"]
        else None,
        output_dir=output if work is None else str(work / "adapter"),
        hyperparameters=hyperparameters,
        on_log=on_log,
        should_stop=should_stop,
        base_name=base["name"],
        suffix=job["suffix"],
        on_event=lambda message: lifecycle.note(job_id, message),
        resume=((catalog.fine_tuning.get(job_id) or {}).get("result") or {}).get("remote"),
        remember=lambda state: lifecycle.remember_remote(job_id, context.run_id, state),
    )
    try:
        # A warm engine server on the same GPUs sleeps while this trains (here).
        with contextlib.nullcontext() if remote else engine.yield_accelerator():
            outcome = trainer.train(train_job, backend=job["backend"])
    except TrainingStopped as exc:
        lifecycle.cancel(job_id, str(exc), expect_run=context.run_id)
        raise dg.Failure(description=f"{job_id} was cancelled: {exc}") from None
    except Exception as exc:
        message = f"Training failed: {type(exc).__name__}: {str(exc)[:500]}"
        lifecycle.fail(job_id, "training_failed", message, expect_run=context.run_id)
        raise
    if outcome.remote_model:
        name, output = outcome.remote_model, None
        _record_remote(catalog, job, dataset, outcome, context.run_id)
    else:
        if work is not None:
            upload_folder(bucket, work / "adapter", L.adapter_folder(job_id))
        name = L.fine_tuned_model_name(base["name"], job["suffix"], job_id)
    if work is not None:
        shutil.rmtree(work, ignore_errors=True)
    result = {**outcome.summary(), "adapter_path": output}
    if not lifecycle.trained(job_id, context.run_id, output, name, result):
        raise dg.Failure(f"{job_id} was cancelled as it finished; its adapter is not kept.")
    return dg.MaterializeResult(
        metadata={
            "job_id": job_id,
            "fine_tuned_model": name,
            "backend": outcome.backend,
            "device": outcome.device,
            "base_model": base["name"],
            "dataset_version": dataset["version"],
            "hyperparameters": dg.MetadataValue.json(hyperparameters.model_dump()),
            "train_loss": outcome.train_loss,
            "eval_loss": outcome.eval_loss,
            "steps": outcome.steps,
            "duration_s": round(outcome.duration_s, 2),
            "seconds_per_step": round(outcome.seconds_per_step, 3),
            "adapter_bytes": outcome.adapter_bytes,
            "peak_rss_mb": round(outcome.peak_rss_mb, 1),
            "path": dg.MetadataValue.path(output or outcome.remote_url or ""),
            "loss_curve": dg.MetadataValue.md(loss_plot(outcome.losses)),
            **({"remote_job_id": outcome.remote_job_id} if outcome.remote_job_id else {}),
        },
        data_version=dg.DataVersion(job_id),
    )


def _job_lineage(job: dict[str, Any], dataset: dict[str, Any], run_id: str) -> dict[str, Any]:
    """What a model made by ``job`` records of where it came from (a deployed adapter's
    lineage, a remote model's)."""
    return {
        "job_id": job["id"],
        "dataset_version": job["dataset_version"],
        "dataset_type": dataset.get("type"),
        "base_model": job["model"],
        "suffix": job["suffix"],
        "backend": job["backend"],
        "hyperparameters": job["hyperparameters"],
        "training_run_id": run_id,
    }


def _record_remote(
    catalog: Catalog,
    job: dict[str, Any],
    dataset: dict[str, Any],
    outcome: TrainingOutcome,
    run_id: str,
) -> None:
    """The remote service's model in the registry (``remote``: never served here), with the
    lineage a deployment would give an adapter."""
    assert outcome.remote_model and outcome.remote_url
    lineage = {
        **_job_lineage(job, dataset, run_id),
        "remote_job_id": outcome.remote_job_id,
        "remote_url": outcome.remote_url,
    }
    try:
        ModelRegistry(catalog).record_remote(
            outcome.remote_model, outcome.remote_url, job["model"], lineage
        )
    except RegistryError as exc:
        raise dg.Failure(f"{outcome.remote_model} is not recorded: {exc.message}") from None


def _working_folder(bucket: Bucket, job_id: str) -> Path | None:
    """Where a job trains when the bucket is an object store (``$VBS_HOME/cache/training/<job
    id>``, emptied first: a retry starts clean); None for a local bucket."""
    if bucket.is_local:
        return None
    work = cache_dir() / "training" / job_id
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    return work


def _local_file(bucket: Bucket, rel: str, work: Path | None) -> str:
    """``rel`` as a local path: the bucket's own file, or a copy in ``work``."""
    if work is None:
        return bucket.path(rel)
    local = work / posixpath.basename(rel)
    bucket.fs.get_file(bucket.path(rel), str(local))
    return str(local)


def _answer(body: dict[str, Any]) -> str:
    try:
        return str(body["choices"][0]["message"]["content"] or "")
    except (KeyError, IndexError, TypeError):
        return ""


def _samples(examples: list[ev.EvalExample], base: list[str], adapter: list[str]) -> str:
    def cell(text: str) -> str:
        return text.replace("\n", " ").replace("|", "\\|")[:120]

    rows = ["| reference | base | adapter |", "|---|---|---|"]
    for example, b, a in list(zip(examples, base, adapter, strict=True))[:5]:
        rows.append(f"| {cell(example.reference)} | {cell(b)} | {cell(a)} |")
    return "\n".join(rows)


@dg.asset(
    name=L.ADAPTER_EVAL,
    partitions_def=dataset_version_partitions,
    deps=[fine_tuned_adapter],
    check_specs=[
        dg.AssetCheckSpec(
            "beats_base",
            asset=L.ADAPTER_EVAL,
            blocking=True,
            description="The adapter scores at least its base plus the margin on the chosen "
            "metric (rouge_l by default); blocks deployed_model in the same run.",
        )
    ],
    pool="gpu",
    code_version="1",
    kinds={"vllm"},
    group_name=L.TRAINING_GROUP,
)
def adapter_eval(
    context: dg.AssetExecutionContext,
    config: AdapterEvalConfig,
    bucket: Bucket,
    catalog: Catalog,
    engine: InferenceEngine,
    webhooks: Webhooks,
) -> dg.MaterializeResult:
    """The base model and the adapter through vLLM on the eval split, scored side by side; the
    job succeeds once this evaluation (or the reason there is none) is recorded."""
    lifecycle = FineTuningLifecycle(catalog, webhooks)
    job = _job(context, catalog, config.job_id, trained=True)
    job_id = job["id"]
    if not is_trained(job) or job["status"] not in ("running", "succeeded"):
        raise dg.Failure(f"{job_id} is {job['status']} with no trained adapter to evaluate.")
    why = f"Run {job['run_id']} died; run {context.run_id} evaluates the adapter"
    if job["status"] == "running" and not lifecycle.adopt(job_id, context.run_id, why):
        raise dg.Failure(f"{job_id} ended while its adapter waited for its evaluation.")
    remote = remote_model(job)
    if remote:
        where = job["result"].get("remote_url")
        return _not_evaluated(
            context, lifecycle, job_id,
            f"{remote} was trained by {where} and is served there, not by this engine",
        )  # fmt: skip
    dataset = _dataset(context, catalog)
    with bucket.open(L.dataset_file(dataset["version"], L.EVAL), "rb") as fh:
        examples = ev.eval_examples(fh.read().decode("utf-8").splitlines())[: config.limit]
    if not examples:
        return _not_evaluated(
            context, lifecycle, job_id, f"{dataset['version']} holds no eval examples to score"
        )
    try:
        return _evaluate(context, config, catalog, engine, lifecycle, job, examples)
    except Exception as exc:
        if not isinstance(exc, dg.Failure):
            message = f"Evaluation failed: {type(exc).__name__}: {str(exc)[:500]}"
            lifecycle.fail(job_id, "evaluation_failed", message, expect_run=context.run_id)
        raise


class EvaluationError(RuntimeError):
    """The evaluation has nothing to score; the job fails with this message."""


def _error_message(result: EngineResult) -> str:
    error = result.body.get("error") if isinstance(result.body, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return f"HTTP {result.status_code}: {message or result.body}"[:500]


def _not_evaluated(
    context: dg.AssetExecutionContext, lifecycle: FineTuningLifecycle, job_id: str, reason: str
) -> dg.MaterializeResult:
    """The job succeeds with the reason it was not evaluated, which deploy then names."""
    evaluation = {
        "passed": False,
        "skipped": reason,
        "examples": 0,
        "run_id": context.run_id,
        "evaluated_at": int(time.time()),
    }
    lifecycle.succeed(job_id, evaluation, f"Not evaluated: {reason}.")
    context.log.warning(f"{job_id}: not evaluated: {reason}")
    return dg.MaterializeResult(
        metadata={"job_id": job_id, "examples": 0, "skipped": reason},
        data_version=dg.DataVersion(job_id),
        check_results=[
            dg.AssetCheckResult(
                check_name="beats_base", passed=False, metadata={"verdict": f"skipped: {reason}"}
            )
        ],
    )


def _evaluate(
    context: dg.AssetExecutionContext,
    config: AdapterEvalConfig,
    catalog: Catalog,
    engine: InferenceEngine,
    lifecycle: FineTuningLifecycle,
    job: dict[str, Any],
    examples: list[ev.EvalExample],
) -> dg.MaterializeResult:
    registry = ModelRegistry(catalog)
    registry.register_configured(engine.configured_models())
    served = registry.snapshot()
    base_name = job["model"]
    adapter_name = f"eval:{job['id']}"
    with fsspec.open(f"{job['adapter_path']}/adapter_config.json", "rb") as fh:
        rank = strict_json.loads(fh.read(1 << 20))["r"]
    highest = max((m["lora_id"] or 0 for m in catalog.models.list(include_retired=True)), default=0)
    candidate = ServedModel(
        adapter_name, "adapter", job["adapter_path"], base_name, highest + 1, rank
    )
    endpoint = "/v1/chat/completions"
    engine.start(endpoint, ServedModels({**served.models, adapter_name: candidate}))
    requests = [
        EngineRequest(
            f"{who}-{i}",
            {
                "model": model,
                "messages": example.messages,
                "max_tokens": config.max_tokens,
                "temperature": 0,
                "seed": 0,
            },
        )
        for who, model in (("base", base_name), ("adapter", adapter_name))
        for i, example in enumerate(examples)
    ]
    started = time.perf_counter()
    results = engine.run(endpoint, requests)
    seconds = time.perf_counter() - started
    failed = {
        who: [r for r in results if r.custom_id.startswith(f"{who}-") and not r.ok]
        for who in ("base", "adapter")
    }
    for who, errors in failed.items():
        if len(errors) == len(examples):
            # Nothing to score (an adapter the engine cannot load: a server without LoRA): the
            # job fails saying why, rather than scoring empty answers.
            raise EvaluationError(
                f"every {who} request of the evaluation failed, the first with: "
                f"{_error_message(errors[0])}"
            )
        if errors:
            context.log.warning(
                f"{len(errors)} of {len(examples)} {who} requests failed and score as empty "
                f"answers; the first: {_error_message(errors[0])}"
            )
    answers = {r.custom_id: _answer(r.body) if r.ok else "" for r in results}
    base_answers = [answers[f"base-{i}"] for i in range(len(examples))]
    adapter_answers = [answers[f"adapter-{i}"] for i in range(len(examples))]
    references = [e.reference for e in examples]
    base_scores = ev.score(references, base_answers)
    adapter_scores = ev.score(references, adapter_answers)
    try:
        verdict = ev.compare(base_scores, adapter_scores, config.metric, config.margin)
    except ValueError as exc:
        raise dg.Failure(description=str(exc)) from None
    context.log.info(verdict.describe())
    evaluation = {
        "base": base_scores,
        "adapter": adapter_scores,
        "metric": verdict.metric,
        "margin": verdict.margin,
        "passed": verdict.passed,
        "examples": len(examples),
        "failed_requests": {who: len(errors) for who, errors in failed.items()},
        "run_id": context.run_id,
        "evaluated_at": int(time.time()),
    }
    if not lifecycle.succeed(job["id"], evaluation, verdict.describe()):
        raise dg.Failure(f"{job['id']} ended while its adapter was evaluated.")
    return dg.MaterializeResult(
        metadata={
            "job_id": job["id"],
            "examples": len(examples),
            "comparison": dg.MetadataValue.md(ev.table(base_scores, adapter_scores)),
            "samples": dg.MetadataValue.md(_samples(examples, base_answers, adapter_answers)),
            "generation_seconds": round(seconds, 2),
            **{f"{who}_failed_requests": len(errors) for who, errors in failed.items()},
            **{f"base_{k}": v for k, v in base_scores.items() if v is not None},
            **{f"adapter_{k}": v for k, v in adapter_scores.items() if v is not None},
        },
        data_version=dg.DataVersion(job["id"]),
        check_results=[
            dg.AssetCheckResult(
                check_name="beats_base",
                passed=verdict.passed,
                metadata={
                    "metric": verdict.metric,
                    "base": verdict.base,
                    "adapter": verdict.adapter,
                    "margin": verdict.margin,
                    "verdict": verdict.describe(),
                },
            )
        ],
    )


@dg.asset(
    name=L.DEPLOYED_MODEL,
    partitions_def=dataset_version_partitions,
    deps=[adapter_eval],
    code_version="1",
    kinds={"vllm"},
    group_name=L.TRAINING_GROUP,
)
def deployed_model(
    context: dg.AssetExecutionContext,
    config: DeployConfig,
    catalog: Catalog,
    trainer: Trainer,
    webhooks: Webhooks,
) -> dg.MaterializeResult:
    """The evaluated adapter in the model registry as ``ft:<base>:<suffix>:<id>``, with its
    lineage; the next batch naming it is answered by it. Each deployment is recorded with its
    outcome in the job's events."""
    lifecycle = FineTuningLifecycle(catalog, webhooks)
    job = _job(context, catalog, config.job_id, trained=False)
    if job["status"] != "succeeded":
        raise dg.Failure(f"{job['id']} is {job['status']}: only a trained, evaluated job deploys.")
    deployment_id = config.deployment_id
    if deployment_id is None:
        deployment, created = lifecycle.create_deployment(job, config.force)
        if not created:
            raise dg.Failure(f"{job['id']} is being deployed already ({deployment['id']}).")
        deployment_id = deployment["id"]
    if not lifecycle.deployment_started(deployment_id, context.run_id):
        raise dg.Failure(f"{deployment_id} is not queued: it ran already or ended.")
    try:
        return _deploy(context, config, catalog, trainer, lifecycle, job, deployment_id)
    except dg.Failure as exc:
        lifecycle.deployment_failed(deployment_id, "deployment_refused", exc.description or "")
        raise
    except Exception as exc:
        message = f"{type(exc).__name__}: {str(exc)[:500]}"
        lifecycle.deployment_failed(deployment_id, "deployment_failed", message)
        raise


def _deploy(
    context: dg.AssetExecutionContext,
    config: DeployConfig,
    catalog: Catalog,
    trainer: Trainer,
    lifecycle: FineTuningLifecycle,
    job: dict[str, Any],
    deployment_id: str,
) -> dg.MaterializeResult:
    remote = remote_model(job)
    if remote:
        raise dg.Failure(
            description=f"{remote} is a remote model, served by {job['result'].get('remote_url')}: "
            "this engine cannot deploy it. Use it there."
        )
    evaluation = job["evaluation"] or {}
    if not evaluation.get("passed") and not config.force:
        raise dg.Failure(
            description=f"{job['id']} is not deployed: {evaluation_refusal(evaluation)}. Deploy "
            "with force to override."
        )
    dataset = catalog.datasets.get(job["dataset_version"]) or {}
    now = int(time.time())
    deployment = {
        "at": now,
        "run_id": context.run_id,
        "forced": config.force,
        "deployment_id": deployment_id,
    }
    lineage = {
        **_job_lineage(job, dataset, job["run_id"]),
        "evaluation": evaluation or None,
        "forced": config.force,
        "deployed_at": now,
        "deploy_run_id": context.run_id,
        "deployments": [deployment],
    }
    name = job["fine_tuned_model"]
    try:
        row, retired = ModelRegistry(catalog, trainer.max_lora_rank).deploy(
            name, job["adapter_path"], job["model"], lineage
        )
    except RegistryError as exc:
        raise dg.Failure(description=f"{name} is not deployed: {exc.message}") from None
    lifecycle.deployment_succeeded(deployment_id, name, retired)
    context.log.info(f"{name} deployed{'; retired ' + ', '.join(retired) if retired else ''}")
    return dg.MaterializeResult(
        metadata={
            "model": name,
            "job_id": job["id"],
            "deployment_id": deployment_id,
            "dataset_version": job["dataset_version"],
            "forced": config.force,
            "retired": dg.MetadataValue.json(retired),
            "lineage": dg.MetadataValue.json(row["lineage"]),
        },
        data_version=dg.DataVersion(name),
    )
