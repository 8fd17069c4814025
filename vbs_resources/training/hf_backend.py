"""The ``hf`` backend: transformers loads the base, peft wraps it in LoRA, trl trains."""

from __future__ import annotations

from vbs_resources.training import (
    TrainingBackend,
    TrainingJob,
    TrainingOutcome,
    register_backend,
)
from vbs_resources.training.sft import device, run_sft


@register_backend
class HFBackend(TrainingBackend):
    name = "hf"
    summary = (
        "transformers loads the base model, peft wraps it in LoRA, trl trains it, in the run's "
        "process (CUDA when there is a GPU)."
    )
    install = "in vbs's environment: the cpu and gpu extras (`make setup`)"
    requires = ("transformers", "peft", "trl")

    def train(self, job: TrainingJob) -> TrainingOutcome:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        hp = job.hyperparameters
        on_cuda = device() == "cuda"
        dtype = torch.bfloat16 if on_cuda and torch.cuda.is_bf16_supported() else torch.float32
        tokenizer = AutoTokenizer.from_pretrained(job.base_model)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = AutoModelForCausalLM.from_pretrained(job.base_model, dtype=dtype)
        if on_cuda:
            model = model.to("cuda")
        lora = LoraConfig(
            r=hp.lora_r,
            lora_alpha=hp.lora_alpha,
            lora_dropout=hp.lora_dropout,
            target_modules=hp.target_modules,
            bias="none",
            task_type="CAUSAL_LM",
        )
        torch.manual_seed(hp.seed)
        return run_sft(get_peft_model(model, lora), tokenizer, job, backend=self.name)
