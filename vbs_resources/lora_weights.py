"""A LoRA adapter's weights, read without loading them: the safetensors header (a length and a
JSON table of tensor names, dtypes, shapes and byte ranges) is checked against the file's size,
and each ``lora_A`` / ``lora_B`` pair against the adapter's rank and target modules and the base
model's sizes. An adapter that passes can be loaded by vLLM for that base; garbage, a truncated
file or an adapter of another model is refused when it is registered, naming the tensor.
"""

from __future__ import annotations

import math
import re
from typing import Any

import fsspec

from vbs_resources import strict_json

# Bytes per element of each safetensors dtype.
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip
MAX_HEADER = 100 * 1024 * 1024
# ``base_model.model.model.layers.<n>.<block>.<module>.lora_<A|B>[.<adapter>].weight``
_LORA = re.compile(r"\.lora_([AB])(?:\.[\w-]+)?\.weight$")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


class WeightsError(ValueError):
    """Why an adapter's weights cannot be served; ``tensor`` names the one at fault."""

    def __init__(self, message: str, tensor: str | None = None) -> None:
        super().__init__(message)
        self.message, self.tensor = message, tensor


def safetensors_shapes(path: str) -> dict[str, list[int]]:
    """Tensor name -> shape, from a safetensors file's header, every entry checked against the
    file (dtype, shape, byte range inside the data, size of dtype x shape)."""
    fs, root = fsspec.core.url_to_fs(path)
    size = fs.size(root)
    with fs.open(root, "rb") as fh:
        length = int.from_bytes(fh.read(8), "little") if size >= 8 else 0
        if not 2 <= length <= min(MAX_HEADER, size - 8):
            raise WeightsError("the file is not safetensors (its header length does not fit)")
        try:
            header = strict_json.loads(fh.read(length))
        except strict_json.JSONError as exc:
            raise WeightsError(f"the safetensors header is not JSON: {exc.message}") from None
    if not isinstance(header, dict):
        raise WeightsError("the safetensors header is not a JSON object")
    data = size - 8 - length
    shapes: dict[str, list[int]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shown = name[:200]
        if not isinstance(entry, dict):
            raise WeightsError(f"tensor {shown!r} has no description", shown)
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPE_BYTES:
            raise WeightsError(f"tensor {shown!r} has an unknown dtype {str(dtype)[:20]!r}", shown)
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise WeightsError(f"tensor {shown!r} has no valid shape", shown)
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data
        ):
            raise WeightsError(f"tensor {shown!r} lies outside the file's data", shown)
        if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise WeightsError(
                f"tensor {shown!r} holds a number of bytes its shape does not", shown
            )
        shapes[name] = shape
    return shapes


def base_sizes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in features, out features) of a decoder's linear modules, from its ``config.json``."""
    hidden = config.get("hidden_size")
    heads = config.get("num_attention_heads")
    if not isinstance(hidden, int) or not isinstance(heads, int) or not heads:
        return {}
    head_dim = config.get("head_dim") or hidden // heads
    kv = (config.get("num_key_value_heads") or heads) * head_dim
    inter = config.get("intermediate_size")
    sizes = {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (heads * head_dim, hidden),
    }
    if isinstance(inter, int):
        sizes.update(gate_proj=(hidden, inter), up_proj=(hidden, inter), down_proj=(inter, hidden))
    return sizes


def check_lora_weights(
    shapes: dict[str, list[int]], adapter: dict[str, Any], base: dict[str, Any] | None
) -> int:
    """Check the adapter's tensors against its config (rank, target modules) and its base's
    config (layers, module sizes); returns how many LoRA pairs it holds."""
    ranks = {adapter.get("r")} | set((adapter.get("rank_pattern") or {}).values())
    targets = adapter.get("target_modules")
    listed = set(targets) if isinstance(targets, list) else None
    sizes = base_sizes(base or {})
    layers = (base or {}).get("num_hidden_layers")
    pairs: dict[str, dict[str, list[int]]] = {}
    for name, shape in shapes.items():
        found = _LORA.search(name)
        if found is None:
            continue
        shown = name[:200]
        if len(shape) != 2:
            raise WeightsError(f"{shown!r} is not a matrix (shape {shape})", shown)
        key = name[: found.start()]
        module, which = key.rsplit(".", 1)[-1], found.group(1)
        numbered = _LAYER.search(key + ".")
        layer = numbered.group(1) if numbered else None
        if listed is not None and module not in listed:
            raise WeightsError(
                f"{shown!r} adapts {module}, which target_modules does not name", shown
            )
        if layer is not None and isinstance(layers, int) and int(layer) >= layers:
            raise WeightsError(f"{shown!r} adapts layer {layer}; the base has {layers}", shown)
        rank = shape[0] if which == "A" else shape[1]
        if rank not in ranks:
            raise WeightsError(
                f"{shown!r} has rank {rank}, not the adapter's r ({adapter.get('r')})", shown
            )
        if module in sizes:
            fan_in, fan_out = sizes[module]
            expected = [rank, fan_in] if which == "A" else [fan_out, rank]
            if shape != expected:
                raise WeightsError(
                    f"{shown!r} has shape {shape}; {module} of the base model needs {expected}",
                    shown,
                )
        pairs.setdefault(key, {})[which] = shape
    if not pairs:
        raise WeightsError("the weights hold no LoRA tensors (lora_A / lora_B)")
    for key, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise WeightsError(f"{key[:200]!r} has no {missing}", key[:200])
    return len(pairs)
