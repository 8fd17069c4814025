"""The ``axolotl`` backend: the job as an Axolotl config, checked by Axolotl itself, and a real
job through the API from ``fine_tuned_adapter`` to ``deployed_model`` (Axolotl trains on this
machine's CPU). All but the first test need ``.venv-axolotl`` (``make axolotl``), outside
``make test``: they run in ``make test-axolotl``."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from openai import OpenAI

from tests.conftest import API_KEY, jsonl, marker_job, wait_job_ended
from tests.test_fine_tuning import served_and_traced, steps, vbs
from tests.test_training import MARKER, marker_examples
from vbs_resources.training import Hyperparameters, TrainingJob
from vbs_resources.training.axolotl_backend import AxolotlOptions, axolotl_config, parse_log

AXOLOTL = Path(AxolotlOptions().axolotl_command)
needs_axolotl = pytest.mark.skipif(not AXOLOTL.is_file(), reason="no .venv-axolotl: `make axolotl`")


def job_of(tmp_path: Path, **hp) -> TrainingJob:
    train, evals = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    rows = marker_examples(24)
    train.write_bytes(jsonl(rows[:20]))
    evals.write_bytes(jsonl(rows[20:]))
    return TrainingJob("/models/base", str(train), str(tmp_path / "out"), Hyperparameters(**hp),
                       eval_file=str(evals))  # fmt: skip


def test_the_job_becomes_an_axolotl_config_and_its_log_lines_become_steps(tmp_path):
    job = job_of(tmp_path, lora_r=8, lora_alpha=16, lora_dropout=0.05, max_steps=5, batch_size=4,
                 learning_rate=1e-3, num_train_epochs=2, max_seq_length=256, seed=9,
                 target_modules=["q_proj", "v_proj"], gradient_accumulation_steps=2)  # fmt: skip
    config = axolotl_config(job, "/w/out", "/w/prepared", "cpu")
    assert {k: config[k] for k in ("base_model", "adapter", "lora_r", "lora_alpha",
                                   "lora_dropout", "lora_target_modules", "max_steps",
                                   "micro_batch_size", "gradient_accumulation_steps",
                                   "learning_rate", "num_epochs", "sequence_len", "seed")} == {
        "base_model": "/models/base", "adapter": "lora", "lora_r": 8, "lora_alpha": 16,
        "lora_dropout": 0.05, "lora_target_modules": ["q_proj", "v_proj"], "max_steps": 5,
        "micro_batch_size": 4, "gradient_accumulation_steps": 2, "learning_rate": 1e-3,
        "num_epochs": 2, "sequence_len": 256, "seed": 9,
    }  # fmt: skip
    [train] = config["datasets"]
    assert train == {"path": job.train_file, "ds_type": "json", "split": "train",
                     "type": "chat_template", "field_messages": "messages",
                     "roles_to_train": ["assistant"]}  # fmt: skip
    assert config["test_datasets"][0]["path"] == job.eval_file
    assert (config["bf16"], config["fp16"], config["tf32"]) == (False, False, False)
    kernels = [f"lora_{part}_kernel" for part in ("mlp", "qkv", "o", "embedding")]
    assert [config[k] for k in kernels] == [False] * 4  # Axolotl's Triton kernels need CUDA
    on_cuda = axolotl_config(job, "/o", "/p", "cuda")
    assert on_cuda["bf16"] == "auto" and not set(kernels) & set(on_cuda)
    assert "max_steps" not in axolotl_config(job_of(tmp_path), "/o", "/p", "cpu")  # epochs decide
    # Axolotl's log lines (transformers' dicts of strings), read as numbers.
    line = ("67%|██▋ | 2/3 [01:07<00:33, 33.91s/it]   {'loss': '5.001', 'grad_norm': '2.085', "
            "'learning_rate': '0.0006667', 'tokens/trainable': 92, 'epoch': '0.2857'}")  # fmt: skip
    assert parse_log(line) == {"loss": 5.001, "grad_norm": 2.085, "learning_rate": 0.0006667,
                               "tokens/trainable": 92.0, "epoch": 0.2857}  # fmt: skip
    assert parse_log("{'eval_loss': '3.5', 'epoch': '1.0'}")["eval_loss"] == 3.5
    for odd in ("", "{'loss': __import__('os')}", "{'loss': " + "[" * 500, "no dict here"):
        assert parse_log(odd) == {}


@pytest.mark.axolotl
@needs_axolotl
def test_axolotl_validates_the_config_and_trains_on_the_answers_alone(tmp_path, model_dir):
    """``axolotl preprocess``: Axolotl's own validation of the generated config and its
    tokenization; the labels are the assistant's answers alone."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    job = job_of(tmp_path, max_steps=2, batch_size=4, max_seq_length=256)
    job.base_model = str(model_dir)
    config = axolotl_config(job, str(tmp_path / "out"), str(tmp_path / "prepared"), "cpu")
    (tmp_path / "config.yml").write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [str(AXOLOTL), "preprocess", str(tmp_path / "config.yml")], cwd=tmp_path,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("VBS_")},
             "AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    prepared = [load_from_disk(str(p)) for p in (tmp_path / "prepared").iterdir() if p.is_dir()]
    assert sorted(len(rows) for rows in prepared) == [4, 20]  # the eval and train files
    [rows] = [rows for rows in prepared if len(rows) == 20]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for row in rows.select(range(3)):
        trained = [t for t, label in zip(row["input_ids"], row["labels"], strict=True)
                   if label != -100]  # fmt: skip
        text = tokenizer.decode(trained)
        assert text.startswith(MARKER) and "Write one short sentence" not in text, text


@pytest.mark.axolotl
@needs_axolotl
def test_an_axolotl_job_trains_evaluates_deploys_and_answers_with_the_marker(platform):
    """Through the API, as a user would: 12 steps of 8 at 5 x 2e-4 (the unsloth job's
    recipe), then the job's evaluation, a deploy, and a batch the deployed model answers."""
    client = OpenAI(base_url=platform.api_url, api_key=API_KEY, max_retries=0)
    good, data, job = marker_job(client, 64, "axo", {"max_steps": 12, "backend": "axolotl"})
    done = wait_job_ended(client, job.id, timeout=1500)
    events = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=200).data]
    assert done.status == "succeeded", events
    logged = steps(client, job.id)
    assert [s["step"] for s in logged] == list(range(1, 13)), logged
    assert logged[-1]["train_loss"] < logged[0]["train_loss"], logged
    evaluation = done.model_extra["evaluation"]
    assert evaluation["passed"], evaluation
    row = platform.resources["catalog"].fine_tuning.get(job.id)
    assert row["result"]["backend"] == "axolotl" and row["result"]["device"] == "cpu"
    adapter = platform.home / "bucket" / "adapters" / job.id
    assert sorted(p.name for p in adapter.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "axolotl.yml", "vbs_training.json",
    ]  # fmt: skip
    assert yaml.safe_load((adapter / "axolotl.yml").read_text())["max_steps"] == 12
    client.post(f"/fine_tuning/jobs/{job.id}/deploy", body={}, cast_to=object)
    try:
        served_and_traced(platform, client, done.fine_tuned_model, done, row, good, data)
    finally:
        vbs(platform, "models", "retire", done.fine_tuned_model, api=False)
    assert json.loads((adapter / "vbs_training.json").read_text())["steps"] == 12
    assert os.path.getsize(adapter / "adapter_model.safetensors") > 0
