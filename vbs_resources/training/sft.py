"""The supervised fine-tuning loop both built-in backends share: trl's ``SFTTrainer`` on a
LoRA-wrapped model, with progress sent to the job's ``on_log`` and a stop asked between steps.
A backend differs only in how it loads the model and wraps it in LoRA."""

from __future__ import annotations

import math
import tempfile
import time
from typing import Any

from vbs_resources.training import TrainingJob, TrainingOutcome, TrainLog, read_chat_examples


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def finite(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def run_sft(
    model: Any, tokenizer: Any, job: TrainingJob, *, backend: str, trainer_class: Any = None
) -> TrainingOutcome:
    """Train ``model`` (already LoRA-wrapped) on ``job``'s files and save the adapter into
    ``job.output_dir``; ``trainer_class`` is trl's ``SFTTrainer`` unless a backend patches it."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    hp = job.hyperparameters
    train_rows = read_chat_examples(job.train_file)
    eval_rows = read_chat_examples(job.eval_file) if job.eval_file else []
    if not train_rows:
        from vbs_resources.training import TrainingError

        raise TrainingError("The training file holds no examples.")
    on_cuda = device() == "cuda"
    started = time.monotonic()
    logs: list[TrainLog] = []
    stopped = False

    class Progress(TrainerCallback):
        def on_log(self, args, state, control, logs_=None, **kwargs):  # noqa: ANN001, ANN201
            values = kwargs.get("logs") or logs_ or {}
            if "loss" not in values and "eval_loss" not in values:
                return
            entry = TrainLog(
                step=state.global_step,
                total_steps=state.max_steps,
                loss=finite(values.get("loss")),
                eval_loss=finite(values.get("eval_loss")),
                learning_rate=finite(values.get("learning_rate")),
                epoch=finite(values.get("epoch")),
                elapsed_s=round(time.monotonic() - started, 2),
            )
            logs.append(entry)
            if job.on_log:
                job.on_log(entry)

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201
            nonlocal stopped
            if job.should_stop and job.should_stop():
                stopped = True
                control.should_training_stop = True

    with tempfile.TemporaryDirectory(prefix="vbs-sft-") as scratch:
        config = SFTConfig(
            output_dir=scratch,
            per_device_train_batch_size=hp.batch_size,
            per_device_eval_batch_size=hp.batch_size,
            gradient_accumulation_steps=hp.gradient_accumulation_steps,
            learning_rate=hp.learning_rate,
            num_train_epochs=hp.num_train_epochs,
            max_steps=hp.max_steps,
            warmup_steps=hp.warmup_steps,
            weight_decay=hp.weight_decay,
            lr_scheduler_type="linear",
            max_length=hp.max_seq_length,
            seed=hp.seed,
            data_seed=hp.seed,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            eval_strategy="no",
            # On CPU, checkpointing activations only slows training (1.4-1.8x); memory is not
            # what runs out with LoRA on a small model.
            gradient_checkpointing=False,
            use_cpu=not on_cuda,
            bf16=on_cuda and _bf16_ok(),
            fp16=False,
            dataloader_num_workers=0,
            dataloader_pin_memory=on_cuda,
            disable_tqdm=True,
            packing=False,
            completion_only_loss=True,
        )
        trainer = (trainer_class or SFTTrainer)(
            model=model,
            args=config,
            train_dataset=Dataset.from_list(train_rows),
            eval_dataset=Dataset.from_list(eval_rows) if eval_rows else None,
            processing_class=tokenizer,
            callbacks=[Progress()],
        )
        result = trainer.train()
        eval_loss = None
        if eval_rows and not stopped:
            eval_loss = finite(trainer.evaluate().get("eval_loss"))
        if not stopped:
            model.save_pretrained(job.output_dir)
    train_losses = [log.loss for log in logs if log.loss is not None]
    return TrainingOutcome(
        backend=backend,
        device=device(),
        steps=result.global_step,
        train_loss=train_losses[-1] if train_losses else finite(result.training_loss),
        eval_loss=eval_loss,
        losses=logs,
        duration_s=time.monotonic() - started,
        train_examples=len(train_rows),
        eval_examples=len(eval_rows),
        stopped=stopped,
    )


def _bf16_ok() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
