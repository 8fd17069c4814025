"""``vbs finetune`` (OpenAI's fine-tuning jobs through the official client) and ``vbs lineage``.

``vbs finetune create --model M --dataset VERSION`` (or ``--file train.jsonl``, uploaded with
purpose ``fine-tune``) starts a job; ``--wait`` follows it with a progress bar of training steps
and prints the finished job as one JSON line. ``deploy`` serves its model once evaluated.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from vbs_cli.client import add_api_url, add_json, openai_client, print_json
from vbs_resources import Settings

TERMINAL = ("succeeded", "failed", "cancelled")


def add_commands(sub: Any) -> None:
    finetune = sub.add_parser("finetune", help="fine-tuning jobs: create, list, follow, deploy")
    actions = finetune.add_subparsers(dest="finetune_command", required=True)
    create = actions.add_parser("create", help="start a fine-tuning job")
    create.add_argument("--model", required=True, help="the base model's served name")
    source = create.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", help="a curated dataset version")
    source.add_argument("--file", type=Path, help="a chat-format JSONL file to upload")
    create.add_argument("--validation-file", type=Path)
    create.add_argument(
        "--backend",
        help="a training backend (`vbs finetune backends`; the server checks it); "
        "VBS_TRAINER_BACKEND when left out",
    )
    create.add_argument("--suffix")
    create.add_argument("--epochs", type=float)
    create.add_argument("--batch-size", type=int)
    create.add_argument("--lr-multiplier", type=float)
    create.add_argument("--max-steps", type=int)
    create.add_argument("--seed", type=int)
    create.add_argument("--wait", action="store_true", help="follow the job until it ends")
    listing = actions.add_parser("list", help="jobs, newest first")
    listing.add_argument("--limit", type=int, default=20)
    for name, text in (
        ("show", "one job"),
        ("events", "a job's events, oldest first"),
        ("cancel", "cancel a job"),
        ("wait", "follow a job until it ends"),
    ):
        actions.add_parser(name, help=text).add_argument("job_id")
    backends = actions.add_parser(
        "backends",
        help="the training backends of this installation, their options, what is missing",
    )
    add_json(backends)
    deploy = actions.add_parser("deploy", help="serve a succeeded job's model")
    deploy.add_argument("job_id")
    deploy.add_argument("--force", action="store_true", help="deploy although beats_base failed")
    deploy.add_argument("--wait", action="store_true", help="wait until the model is served")
    for parser in (create, listing, deploy, *(actions.choices[n] for n in ("show", "events"))):
        add_api_url(parser)
    for name in ("cancel", "wait"):
        add_api_url(actions.choices[name])
    add_json(listing)
    add_json(actions.choices["events"])
    lineage = sub.add_parser("lineage", help="where a model came from, down to input hashes")
    lineage.add_argument("model")
    lineage.add_argument("--json", action="store_true", help="the whole chain as JSON")
    add_api_url(lineage)


def _print_job(job: Any) -> None:
    print_json(job)


def follow(client: Any, job_id: str, poll: float = 1.0) -> Any:
    """Show a progress bar of training steps until the job ends; returns the job."""
    from tqdm import tqdm

    bar = tqdm(total=0, unit="step", desc=job_id, file=sys.stderr)
    seen = 0
    try:
        while True:
            job = client.fine_tuning.jobs.retrieve(job_id)
            events = client.fine_tuning.jobs.list_events(job_id, limit=5).data
            for event in events:
                data = event.data if isinstance(event.data, dict) else {}
                step = data.get("step")
                if event.type == "metrics" and isinstance(step, int) and step > seen:
                    bar.total = data.get("total_steps") or bar.total
                    bar.update(step - seen)
                    seen = step
                    if data.get("train_loss") is not None:
                        bar.set_postfix(loss=f"{data['train_loss']:.4f}")
                    break
            bar.set_description(f"{job_id} {job.status}")
            if job.status in TERMINAL:
                return job
            time.sleep(poll)
    finally:
        bar.close()


def list_backends(args: argparse.Namespace, settings: Settings) -> int:
    """The registry as this installation has it (``VBS_TRAINING_BACKEND_MODULES`` included:
    ``settings`` imported them)."""
    from vbs_resources.training import describe_backends

    described = describe_backends()
    if args.json:
        for backend in described:
            print_json(backend)
        return 0
    for backend in described:
        default = " (default)" if backend["name"] == settings.trainer_backend else ""
        ready = "ready" if not backend["missing"] else "missing " + ", ".join(backend["missing"])
        print(f"{backend['name']}{default}: {ready}")
        print(f"  {backend['summary']}")
        print(f"  install: {backend['install']}")
        for option in backend["options"]:
            shown = "" if option["default"] is None else f" (default {option['default']})"
            print(f"  {option['variable']}{shown}: {option['description']}")
    return 0


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.command == "finetune" and args.finetune_command == "backends":
        return list_backends(args, settings)
    client = openai_client(args, settings)
    if args.command == "lineage":
        return _lineage(client, args)
    action = args.finetune_command
    if action == "create":
        return _create(client, args)
    if action == "list":
        for job in client.fine_tuning.jobs.list(limit=args.limit).data:
            if args.json:
                print_json(job)
            else:
                print(f"{job.id}  {job.status:<16}  {job.model}  {job.fine_tuned_model or '-'}")
        return 0
    if action == "show":
        _print_job(client.fine_tuning.jobs.retrieve(args.job_id))
        return 0
    if action == "events":
        events = client.fine_tuning.jobs.list_events(args.job_id, limit=1000).data
        for event in reversed(events):
            if args.json:
                print_json(event)
            else:
                print(f"{event.created_at}  {event.level:<5}  {event.message}")
        return 0
    if action == "cancel":
        _print_job(client.fine_tuning.jobs.cancel(args.job_id))
        return 0
    if action == "wait":
        job = follow(client, args.job_id)
        _print_job(job)
        return 0 if job.status == "succeeded" else 1
    return _deploy(client, args)


def _create(client: Any, args: argparse.Namespace) -> int:
    training = args.dataset
    validation = None
    if args.file:
        with args.file.open("rb") as fh:
            training = client.files.create(file=fh, purpose="fine-tune").id
    if args.validation_file:
        with args.validation_file.open("rb") as fh:
            validation = client.files.create(file=fh, purpose="fine-tune").id
    hyperparameters = {
        k: v
        for k, v in (
            ("n_epochs", args.epochs),
            ("batch_size", args.batch_size),
            ("learning_rate_multiplier", args.lr_multiplier),
        )
        if v is not None
    }
    extra = {k: v for k, v in (("backend", args.backend), ("max_steps", args.max_steps)) if v}
    options: dict[str, Any] = {"hyperparameters": hyperparameters} if hyperparameters else {}
    if validation:
        options["validation_file"] = validation
    if args.suffix:
        options["suffix"] = args.suffix
    if args.seed is not None:
        options["seed"] = args.seed
    job = client.fine_tuning.jobs.create(
        model=args.model, training_file=training, extra_body=extra or None, **options
    )
    if args.wait:
        job = follow(client, job.id)
    _print_job(job)
    return 0 if job.status not in ("failed", "cancelled") else 1


def _deploy(client: Any, args: argparse.Namespace) -> int:
    body = {"force": True} if args.force else {}
    found = client.post(f"/fine_tuning/jobs/{args.job_id}/deploy", body=body, cast_to=object)
    deployment = {k: v for k, v in found.items() if k != "job"}
    if args.wait:
        deadline = time.monotonic() + 600
        while deployment["status"] in ("queued", "running"):
            if time.monotonic() > deadline:
                print(f"vbs: {deployment['id']} is still {deployment['status']}", file=sys.stderr)
                return 1
            time.sleep(1)
            job = client.get(f"/fine_tuning/jobs/{args.job_id}", cast_to=object)
            deployment = job.get("deployment") or deployment
    print_json(deployment)
    if deployment["status"] == "failed":
        error = deployment.get("error") or {}
        print(f"vbs: {deployment['id']} failed: {error.get('message')}", file=sys.stderr)
        return 1
    return 0


def _lineage(client: Any, args: argparse.Namespace) -> int:
    from urllib.parse import quote

    chain = client.get(f"/models/{quote(args.model, safe='')}/lineage", cast_to=object)
    if args.json:
        print(json.dumps(chain, indent=2, default=str))
        return 0
    model = chain["model"]
    print(f"model    {model['id']} ({model['status']}, base {model['base']})")
    if "adapter" in chain:
        a = chain["adapter"]
        losses = a.get("result") or {}
        print(f"adapter  {a['job_id']} ({a['backend']}) at {a['path']}")
        print(
            f"         training run {a['training_run_id']}, train loss {losses.get('train_loss')}"
        )
        if a.get("evaluation"):
            e = a["evaluation"]
            print(f"         eval {e['metric']}: adapter {e['adapter'][e['metric']]:.4f} "
                  f"base {e['base'][e['metric']]:.4f} passed={e['passed']}")  # fmt: skip
    if "dataset" in chain:
        d = chain["dataset"]
        print(f"dataset  {d['version']} ({d['counts']['train']} train, {d['counts']['eval']} eval)")
    for b in chain.get("batches", []):
        print(
            f"batch    {b['batch_id']} ({b['conquests']} conquests) input sha256 {b['input_sha256']}"
        )
    for f in chain.get("files", []):
        print(f"file     {f['file_id']} ({f['examples']} examples) sha256 {f['sha256']}")
    if chain.get("note"):
        print(chain["note"])
    return 0
