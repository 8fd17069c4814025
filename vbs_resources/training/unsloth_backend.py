"""The ``unsloth`` backend: Unsloth's FastLanguageModel recipe (its fused kernels on CUDA, its
CPU fallback elsewhere), trained by trl's SFTTrainer as Unsloth patches it."""

from __future__ import annotations

from vbs_resources.settings import cache_dir, set_library_defaults
from vbs_resources.training import (
    TrainingBackend,
    TrainingJob,
    TrainingOutcome,
    register_backend,
)
from vbs_resources.training.sft import device, run_sft


def _guard_vllm_probe() -> None:
    """Unsloth probes vLLM on import by loading ``vllm._C``. vLLM's CPU build ships that name for
    AVX512-BF16 machines and loads ``_C_AVX2`` or ``_C_AVX512`` elsewhere; on an AVX2 machine the
    probe dies with SIGILL. Training uses no vLLM kernel, so the probe gets an empty module."""
    import importlib.util
    import sys
    import types

    import torch

    if "vllm._C" in sys.modules or torch.cuda.is_available():
        return
    if importlib.util.find_spec("vllm") is None or torch.cpu._is_avx512_bf16_supported():
        return
    sys.modules["vllm._C"] = types.ModuleType("vllm._C")


def prepare_import() -> None:
    """What must hold before Unsloth is imported: its GPU compile cache (generated sources it
    imports back) under ``$VBS_HOME/cache`` rather than the working directory, which is the
    repository's when `vbs serve` runs from a checkout; the vLLM probe guarded."""
    set_library_defaults(UNSLOTH_COMPILE_LOCATION=str(cache_dir() / "unsloth_compiled_cache"))
    _guard_vllm_probe()


@register_backend
class UnslothBackend(TrainingBackend):
    name = "unsloth"
    summary = (
        "Unsloth's FastLanguageModel LoRA recipe, trained in the run's process: its fused "
        "kernels on CUDA, its CPU fallback elsewhere. The default."
    )
    install = "in vbs's environment: the cpu and gpu extras (`make setup`)"
    requires = ("unsloth", "trl", "peft")

    def train(self, job: TrainingJob) -> TrainingOutcome:
        # Unsloth patches transformers and trl when imported: first, before either is used.
        prepare_import()
        from unsloth import FastLanguageModel

        hp = job.hyperparameters
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=job.base_model,
            max_seq_length=hp.max_seq_length,
            dtype=None,
            load_in_4bit=False,
            local_files_only=True,
        )
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = FastLanguageModel.get_peft_model(
            model,
            r=hp.lora_r,
            lora_alpha=hp.lora_alpha,
            lora_dropout=hp.lora_dropout,
            target_modules=hp.target_modules,
            bias="none",
            use_gradient_checkpointing="unsloth" if device() == "cuda" else False,
            random_state=hp.seed,
        )
        return run_sft(model, tokenizer, job, backend=self.name)
