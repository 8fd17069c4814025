"""A training backend that lives in the test folder alone: vbs finds it through
``VBS_TRAINING_BACKEND_MODULES=tests.plugin_backend`` and no file of vbs names it. It "trains"
no step: peft wraps the base model in a fresh LoRA (``init_lora_weights`` as its option says;
the default leaves B at zero, so the adapter answers as the base) and saves it."""

from __future__ import annotations

import time

from pydantic import Field

from vbs_resources.training import (
    BackendOptions,
    TrainingBackend,
    TrainingJob,
    TrainingOutcome,
    read_chat_examples,
    register_backend,
)


class UntrainedLoraOptions(BackendOptions):
    untrained_lora_init: str = Field(
        default="true", description="peft's init_lora_weights: true, gaussian, ..."
    )


@register_backend
class UntrainedLoraBackend(TrainingBackend):
    name = "untrained_lora"
    summary = "A LoRA adapter of zero training steps (the test folder's own backend)."
    install = "nothing: tests/plugin_backend.py, on the path of the tests"
    requires = ("peft", "transformers")
    Options = UntrainedLoraOptions

    def train(self, job: TrainingJob) -> TrainingOutcome:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        started = time.monotonic()
        options = self.options()
        assert isinstance(options, UntrainedLoraOptions)
        init = options.untrained_lora_init
        hp = job.hyperparameters
        model = AutoModelForCausalLM.from_pretrained(job.base_model)
        lora = LoraConfig(
            r=hp.lora_r,
            lora_alpha=hp.lora_alpha,
            target_modules=hp.target_modules,
            task_type="CAUSAL_LM",
            init_lora_weights=init == "true" or init,
        )
        get_peft_model(model, lora).save_pretrained(job.output_dir)
        return TrainingOutcome(
            backend=self.name,
            device="cpu",
            steps=0,
            train_loss=None,
            eval_loss=None,
            losses=[],
            duration_s=time.monotonic() - started,
            train_examples=len(read_chat_examples(job.train_file)),
            eval_examples=0,
        )
