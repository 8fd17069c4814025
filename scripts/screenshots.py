"""The documentation's screenshots, taken from a running platform (`make screenshots`).

Starts `vbs serve` (with its Label Studio) on a VBS_HOME of its own, runs what the pictures show
(a typed batch curated in Label Studio, a fine-tuning job trained, evaluated and deployed), then
has headless Chromium (Playwright, in `.venv-docs`) take:

1. the Dagster asset graph, from the batch to the deployed model;
2. a batch partition's metadata (`batch_output`);
3. `fine_tuned_adapter`'s loss curve;
4. `adapter_eval`'s base-versus-adapter table;
5. a Label Studio task of a conquest.

    .venv/bin/python scripts/screenshots.py [--out docs/images] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import (  # noqa: E402 - the suite's own platform helpers
    MODEL,
    free_port,
    jsonl,
    wait_for,
)
from tests.test_training import marker_examples  # noqa: E402

RECORDS = [
    {"custom_id": "t-mug", "ticket_subject": "Broken mug",
     "ticket_body": "My mug arrived in pieces. Can you send a new one?",
     "order_history": [{"id": 12, "item": "mug"}]},
    {"custom_id": "t-late", "ticket_subject": "Late order",
     "ticket_body": "Order 7 was due on Monday and has not arrived."},
    {"custom_id": "t-pass", "ticket_subject": "Password",
     "ticket_body": "I forgot my password. How do I reset it?"},
]  # fmt: skip


def _up(url: str) -> bool:
    try:
        return urllib.request.urlopen(url, timeout=2).status == 200
    except OSError:
        return False


def run_platform(home: Path) -> tuple[subprocess.Popen, dict[str, int], dict[str, str]]:
    from vbs_resources import load_settings
    from vbs_resources.model_store import prepare_default_model

    ports = {"dagster": free_port(), "api": free_port(), "ls": free_port()}
    env = dict(
        os.environ,
        VBS_HOME=str(home),
        # The model `make model` prepared, not another copy in this home.
        VBS_MODEL=str(prepare_default_model(load_settings().home)),
        VBS_DTYPE="float32",
        VBS_LABEL_STUDIO_PORT=str(ports["ls"]),
        VBS_TRAINER_BACKEND="hf",
    )
    log = open(home.parent / "serve.log", "ab")  # noqa: SIM115 - lives as long as the platform
    command = [sys.executable, "-m", "vbs_cli.main", "serve", "--port", str(ports["dagster"]),
               "--api-port", str(ports["api"])]  # fmt: skip
    process = subprocess.Popen(
        command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    wait_for(lambda: _up(f"http://127.0.0.1:{ports['dagster']}/server_info"), 180, "Dagster")
    wait_for(lambda: _up(f"http://127.0.0.1:{ports['api']}/health"), 60, "the API")
    wait_for(lambda: _up(f"http://127.0.0.1:{ports['ls']}/health"), 300, "Label Studio")
    return process, ports, env


def drive(home: Path, ports: dict[str, int], env: dict[str, str]) -> dict[str, str]:
    """What the pictures show; returns the ids they need."""
    from openai import OpenAI

    from vbs_resources import build_resources, load_settings

    api = f"http://127.0.0.1:{ports['api']}/v1"
    client = OpenAI(base_url=api, api_key="none")
    records = home.parent / "tickets.jsonl"
    records.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    submitted = subprocess.run(
        [sys.executable, "-m", "vbs_cli.main", "conquests", "submit", "support_reply",
         str(records), "--max-tokens", "48", "--wait", "--api-url", api],
        env=env, capture_output=True, text=True, timeout=600, check=True,
    )  # fmt: skip
    batch_id = submitted.stdout.strip()
    catalog = build_resources(load_settings({"VBS_HOME": str(home)}))["catalog"]
    wait_for(lambda: catalog.label_studio.project("support_reply", _ls(ports)), 300, "the tasks")
    first = catalog.conquests.of_batch(batch_id)[0]["id"]
    task = wait_for(lambda: catalog.label_studio.task_of(_ls(ports), first), 300, "a task")
    good = client.files.create(file=("zebra.jsonl", jsonl(marker_examples(64))),
                               purpose="fine-tune")  # fmt: skip
    job = client.fine_tuning.jobs.create(
        model=MODEL, training_file=good.id, suffix="zebra",
        hyperparameters={"batch_size": 8, "learning_rate_multiplier": 5},
        extra_body={"max_steps": 12},
    )  # fmt: skip
    done = wait_for(
        lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status
        in ("succeeded", "failed", "cancelled") and j, 900, "the fine-tuning job",
    )  # fmt: skip
    assert done.status == "succeeded", done.error
    client.post(f"/fine_tuning/jobs/{job.id}/deploy", body={}, cast_to=object)
    wait_for(lambda: done.fine_tuned_model in [m.id for m in client.models.list().data], 300,
             "the deployment")  # fmt: skip
    return {
        "batch_id": batch_id,
        "version": done.model_extra["dataset_version"],
        "project_id": str(task[0]),
        "task_id": str(task[1]),
    }


def _ls(ports: dict[str, int]) -> str:
    return f"http://127.0.0.1:{ports['ls']}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--keep", action="store_true", help="leave the platform's home behind")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="vbs-screens-")) / "vbs"
    (home / "bucket" / "inbox").mkdir(parents=True)
    process, ports, env = run_platform(home)
    try:
        ids = drive(home, ports, env)
        dagster = f"http://127.0.0.1:{ports['dagster']}"
        # name -> (URL, the text to scroll to before the picture is taken)
        pages = {
            "asset-graph": (
                f"{dagster}/assets/deployed_model?view=lineage&lineageScope=upstream"
                "&lineageDepth=10",
                None,
            ),
            "batch-partition": (
                f"{dagster}/assets/batch_output?view=partitions&partition={ids['batch_id']}",
                None,
            ),
            "loss-curve": (
                f"{dagster}/assets/fine_tuned_adapter?view=partitions&partition={ids['version']}",
                "loss_curve",
            ),
            "adapter-eval": (
                f"{dagster}/assets/adapter_eval?view=partitions&partition={ids['version']}",
                "comparison",
            ),
            "label-studio-task": (
                f"{_ls(ports)}/projects/{ids['project_id']}/data?task={ids['task_id']}",
                None,
            ),
        }
        spec = {
            "pages": pages,
            "dagster": dagster,
            "label_studio": {
                "url": _ls(ports),
                "username": "admin@vbs.local",
                "password": (home / "label-studio" / "password").read_text().strip(),
            },
            "out": str(args.out),
        }
        args.out.mkdir(parents=True, exist_ok=True)
        shooter = ROOT / ".venv-docs" / "bin" / "python"
        subprocess.run(
            [str(shooter), str(ROOT / "scripts" / "shoot.py")],
            input=json.dumps(spec), text=True, check=True, timeout=600,
        )  # fmt: skip
        print(json.dumps({"ids": ids, "pages": pages}, indent=2))
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
        if not args.keep:
            subprocess.run(["rm", "-rf", str(home.parent)], check=False)
        time.sleep(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
