"""LoRA adapters made in the tests, in PEFT's format (what `save_pretrained` writes), with
random nonzero weights large enough to change the small model's answers."""

from __future__ import annotations

import json
from pathlib import Path


def make_adapter(
    folder: Path,
    base: Path | str,
    rank: int = 8,
    std: float = 0.3,
    seed: int = 0,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    **config: object,
) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` for ``base`` (a model
    folder with a Llama ``config.json``) into ``folder``; ``config`` overrides config fields."""
    import torch
    from safetensors.torch import save_file

    model = json.loads((Path(base) / "config.json").read_text())
    hidden = model["hidden_size"]
    head_dim = model.get("head_dim") or hidden // model["num_attention_heads"]
    inter = model["intermediate_size"]
    # target: (module path, in features, out features)
    shapes = {
        "q_proj": ("self_attn", hidden, model["num_attention_heads"] * head_dim),
        "k_proj": ("self_attn", hidden, model["num_key_value_heads"] * head_dim),
        "v_proj": ("self_attn", hidden, model["num_key_value_heads"] * head_dim),
        "o_proj": ("self_attn", hidden, hidden),
        "gate_proj": ("mlp", hidden, inter),
        "up_proj": ("mlp", hidden, inter),
        "down_proj": ("mlp", inter, hidden),
    }
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(model["num_hidden_layers"]):
        for target in targets:
            block, fan_in, fan_out = shapes[target]
            prefix = f"base_model.model.model.layers.{layer}.{block}.{target}"
            tensors[f"{prefix}.lora_A.weight"] = (
                torch.randn(rank, fan_in, generator=generator) * std
            )
            tensors[f"{prefix}.lora_B.weight"] = (
                torch.randn(fan_out, rank, generator=generator) * std
            )
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "target_modules": list(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        **config,
    }
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config))
    return folder
