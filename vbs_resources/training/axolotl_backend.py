"""The ``axolotl`` backend: Axolotl trains the job, in a virtual environment of its own.

Axolotl pins other versions of transformers, trl and peft than vbs does, so it runs as
``axolotl train`` from ``.venv-axolotl`` (``make axolotl``), as Label Studio runs from its own.
The job becomes an Axolotl YAML config (``axolotl_config``): the base model folder, LoRA rank,
alpha, dropout and target modules, epochs or steps, learning rate, batch size, sequence length,
seed, and the chat dataset in Axolotl's ``chat_template`` format with the loss on the assistant's
turns alone. Axolotl's log lines give the steps and losses; a stop asked between them ends the
process group; the adapter (``adapter_config.json`` and its weights) is copied out of Axolotl's
output folder.
"""

from __future__ import annotations

import ast
import os
import queue
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from vbs_resources.training import (
    BackendOptions,
    TrainingBackend,
    TrainingError,
    TrainingJob,
    TrainingOutcome,
    TrainLog,
    register_backend,
)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Axolotl's log of one training step (or evaluation): a dict of strings, as transformers logs it.
_LOG_LINE = re.compile(r"\{'(?:loss|eval_loss)': [^{}]*\}")
_PROGRESS = re.compile(r"\b(\d+)/(\d+) \[")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


class AxolotlOptions(BackendOptions):
    axolotl_command: str = Field(
        default=str(PROJECT_ROOT / ".venv-axolotl" / "bin" / "axolotl"),
        description="The axolotl command; the project's .venv-axolotl (`make axolotl`).",
    )
    axolotl_device: Literal["auto", "cuda", "cpu"] = Field(
        default="auto",
        description="cuda or cpu; auto: cuda when torch in vbs's environment sees a GPU.",
    )


def axolotl_config(
    job: TrainingJob, output_dir: str, prepared_dir: str, device: str
) -> dict[str, Any]:
    """The Axolotl config of ``job`` (a dict to dump as YAML)."""
    hp = job.hyperparameters

    def dataset(path: str) -> dict[str, Any]:
        return {
            "path": path,
            "ds_type": "json",
            "split": "train",
            "type": "chat_template",
            "field_messages": "messages",
            "roles_to_train": ["assistant"],
        }

    on_cuda = device == "cuda"
    config: dict[str, Any] = {
        "base_model": job.base_model,
        "adapter": "lora",
        "lora_r": hp.lora_r,
        "lora_alpha": hp.lora_alpha,
        "lora_dropout": hp.lora_dropout,
        "lora_target_modules": list(hp.target_modules),
        # The base model's own template, as vLLM applies it when the adapter is served.
        "chat_template": "tokenizer_default",
        "datasets": [dataset(job.train_file)],
        "dataset_prepared_path": prepared_dir,
        "output_dir": output_dir,
        "sequence_len": hp.max_seq_length,
        "sample_packing": False,
        "micro_batch_size": hp.batch_size,
        "gradient_accumulation_steps": hp.gradient_accumulation_steps,
        "num_epochs": hp.num_train_epochs,
        "learning_rate": hp.learning_rate,
        "optimizer": "adamw_torch",
        "lr_scheduler": "linear",
        "warmup_steps": hp.warmup_steps,
        "weight_decay": hp.weight_decay,
        "seed": hp.seed,
        "bf16": "auto" if on_cuda else False,
        "fp16": False,
        "tf32": "auto" if on_cuda else False,
        "logging_steps": 1,
        "save_strategy": "no",
        "save_safetensors": True,
    }
    if not on_cuda:
        # Axolotl turns its fused LoRA kernels on by itself when the MLP is targeted: Triton
        # kernels that allocate on CUDA ("Torch not compiled with CUDA enabled" on a CPU).
        config.update({f"lora_{part}_kernel": False for part in ("mlp", "qkv", "o", "embedding")})
    if hp.max_steps > 0:
        config["max_steps"] = hp.max_steps
    if job.eval_file:
        config["test_datasets"] = [dataset(job.eval_file)]
        config["eval_strategy"] = "epoch"
    return config


def parse_log(line: str) -> dict[str, float]:
    """Axolotl's metrics on one output line (``{'loss': '5.097', ...}``), as numbers; empty
    when the line has none."""
    found = _LOG_LINE.search(line)
    if found is None:
        return {}
    try:
        values = ast.literal_eval(found.group(0))
    except (ValueError, SyntaxError):
        return {}
    numbers = {}
    for key, value in values.items():
        try:
            numbers[str(key)] = float(value)
        except (TypeError, ValueError):
            continue
    return numbers


def _device(option: str) -> str:
    if option != "auto":
        return option
    from vbs_resources.training.sft import device

    return device()


@register_backend
class AxolotlBackend(TrainingBackend):
    name = "axolotl"
    summary = (
        "Axolotl trains a LoRA adapter from a generated YAML config, as `axolotl train` in a "
        "virtual environment of its own."
    )
    install = (
        "`make axolotl`: .venv-axolotl (axolotl 0.19.0, about 4.3 GB; pins its own torch stack)"
    )
    Options = AxolotlOptions

    @classmethod
    def missing(cls) -> list[str]:
        options = cls.options()
        assert isinstance(options, AxolotlOptions)
        command = options.axolotl_command
        found = Path(command).is_file() if os.sep in command else shutil.which(command)
        return [] if found else [f"the axolotl command {command} (make axolotl)"]

    def train(self, job: TrainingJob) -> TrainingOutcome:
        import yaml

        options = self.options()
        assert isinstance(options, AxolotlOptions)
        if self.missing():
            raise TrainingError(f"The axolotl backend is not installed: {self.missing()[0]}.")
        device = _device(options.axolotl_device)
        work = Path(job.output_dir) / ".axolotl"
        work.mkdir(parents=True, exist_ok=True)
        config = axolotl_config(job, str(work / "out"), str(work / "prepared"), device)
        config_file = work / "config.yml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        started = time.monotonic()
        logs, stopped, tail = self._run(options.axolotl_command, config_file, job, started, device)
        if stopped:
            shutil.rmtree(work, ignore_errors=True)
            return TrainingOutcome.from_logs(self.name, device, job, logs, started, stopped=True)
        made = work / "out"
        if not (made / "adapter_config.json").is_file():
            raise TrainingError(f"axolotl saved no adapter: {tail[-800:]}")
        for name in ADAPTER_FILES:
            if (made / name).is_file():
                shutil.copy2(made / name, Path(job.output_dir) / name)
        (Path(job.output_dir) / "axolotl.yml").write_text(config_file.read_text())
        shutil.rmtree(work, ignore_errors=True)
        return TrainingOutcome.from_logs(self.name, device, job, logs, started)

    def _run(
        self, command: str, config_file: Path, job: TrainingJob, started: float, device: str
    ) -> tuple[list[TrainLog], bool, str]:
        """``axolotl train`` until it ends or ``job.should_stop()``; the steps it logged,
        whether it was stopped, and the end of its output."""
        # The environment passed on, with its own environment's commands (accelerate) first.
        env = dict(os.environ)
        env.update(
            AXOLOTL_DO_NOT_TRACK="1",
            WANDB_MODE="disabled",
            HF_HUB_OFFLINE="1",
            PATH=f"{Path(command).parent}{os.pathsep}{env.get('PATH', '')}",
        )
        if device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        process = subprocess.Popen(
            [command, "train", str(config_file), "--launcher", "python"],
            cwd=config_file.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, errors="replace", start_new_session=True,
        )  # fmt: skip
        lines: queue.Queue[str | None] = queue.Queue()

        def read() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        logs: list[TrainLog] = []
        tail: list[str] = []
        total = job.hyperparameters.max_steps if job.hyperparameters.max_steps > 0 else 0
        stopped = False
        asked = 0.0
        while True:
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                line = ""
            if line is None:
                break
            tail = (tail + [line])[-40:] if line else tail
            if job.hyperparameters.max_steps <= 0:
                # The training's progress bar has the most steps (the evaluations' have fewer).
                for found in _PROGRESS.finditer(line or ""):
                    total = max(total, int(found.group(2)))
            log = self._step(parse_log(line or ""), logs, total, started)
            if log is not None:
                logs.append(log)
                if job.on_log:
                    job.on_log(log)
            if not stopped and job.should_stop and time.monotonic() - asked >= 1.0:
                asked = time.monotonic()  # at most once a second: a catalog read each time
                if job.should_stop():
                    stopped = True
                    os.killpg(process.pid, signal.SIGTERM)
        code = process.wait()
        if code != 0 and not stopped:
            raise TrainingError(f"axolotl train exited with {code}: {''.join(tail)[-1500:]}")
        return logs, stopped, "".join(tail)

    @staticmethod
    def _step(
        values: dict[str, float], logs: list[TrainLog], total: int, started: float
    ) -> TrainLog | None:
        if "loss" in values:
            step = sum(1 for log in logs if log.loss is not None) + 1
            return TrainLog(step, total, loss=values["loss"],
                            learning_rate=values.get("learning_rate"), epoch=values.get("epoch"),
                            elapsed_s=time.monotonic() - started)  # fmt: skip
        if "eval_loss" in values:
            step = max((log.step for log in logs), default=0)
            return TrainLog(step, total, eval_loss=values["eval_loss"], epoch=values.get("epoch"),
                            elapsed_s=time.monotonic() - started)  # fmt: skip
        return None
