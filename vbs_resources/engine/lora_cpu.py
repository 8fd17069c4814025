"""Fused LoRA kernels for vLLM's CPU build.

vLLM's CPU LoRA ops (``vllm.lora.ops.torch_ops``) gather a copy of the adapter weights for
every token of a step (``weights[indices]``) and multiply token by token. On a 2-core machine
that copying costs more than the base model itself: a batch naming two adapters ran at 0.19 of
the base model's throughput, and a base-only batch on an engine with LoRA on at 0.63. Tokens of
no adapter (index -1) are multiplied by the last slot's weights too (zeros unless every slot is
in use, when base requests would get the last adapter's delta).

Replacements, with vLLM's results:

- ``add_lora_linear`` (every LoRA-wrapped linear layer): two products over every slot holding
  weights, the middle one masked to each token's own slot, the second summed into the layer's
  output by ``addmm``; nothing at all in a step naming no adapter or a layer no adapter touches.
- the ``bgmv``/``sgmv`` ops (still called directly for embeddings and logits): tokens grouped
  by adapter, one product per group, no delta for tokens of no adapter.

They are installed as a vLLM general plugin (``vllm.general_plugins`` entry point in
pyproject.toml), so every vLLM process of this environment uses them, the in-process engine and
``vbs engine serve`` alike, and only on the CPU platform. ``VBS_LORA_CPU_KERNELS=false`` keeps
vLLM's own.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

_OPS = (
    "bgmv_shrink",
    "bgmv_expand",
    "bgmv_expand_slice",
    "sgmv_shrink",
    "sgmv_expand",
    "sgmv_expand_slice",
)


# The grouping of the last index tensor seen: every LoRA layer of a step gets the same indices,
# so the grouping is worked out once per step (keyed by the indices' content, never by address).
_PLAN: dict[bytes, tuple[list[tuple[int, Any]], bool]] = {}


def _plan(indices: Any) -> tuple[list[tuple[int, Any]], bool]:
    """The adapters present in ``indices`` with the rows naming each, and whether one adapter
    covers every row."""
    import torch

    key = indices.numpy().tobytes()
    plan = _PLAN.get(key)
    if plan is None:
        present = torch.unique(indices).tolist()
        groups = [(i, (indices == i).nonzero().squeeze(1)) for i in present if i >= 0]
        plan = (groups, len(present) == 1 and bool(groups))
        _PLAN.clear()
        _PLAN[key] = plan
    return plan


# Which slots of a stacked LoRA weight hold anything: vLLM wraps every linear layer, and an
# adapter that leaves a layer alone has zeros there. Recomputed when the weights are written
# (in-place writes bump a tensor's ``_version``, views included).
_LIVE: dict[Any, tuple[int, list[bool]]] | None = None


def _live_slots(weights: Any) -> list[bool]:
    global _LIVE
    if _LIVE is None:
        from torch.utils.weak import WeakIdKeyDictionary  # keys by identity, never by value

        _LIVE = WeakIdKeyDictionary()
    entry = _LIVE.get(weights)
    if entry is None or entry[0] != weights._version:
        flags = weights.reshape(weights.shape[0], -1).ne(0).any(dim=1).tolist()
        entry = _LIVE[weights] = (weights._version, flags)
    return entry[1]


def _grouped(inputs: Any, weights: Any, indices: Any, dtype: Any) -> Any:
    """``inputs[t] @ weights[indices[t]].T`` for every token ``t``, zero where the index is
    negative (no adapter): one product per adapter present whose slot holds weights. None when
    every product would be zero."""
    import torch

    groups, single = _plan(indices)
    if groups:
        live = _live_slots(weights)
        groups = [(index, rows) for index, rows in groups if live[index]]
    if not groups:
        return None

    def weight(index: int) -> Any:
        w = weights[index]
        return (w.squeeze(0) if w.dim() == 3 else w).to(dtype).t()

    if single:
        return inputs.to(dtype) @ weight(groups[0][0])
    outputs = torch.zeros((inputs.shape[0], weights.shape[-2]), dtype=dtype)
    for index, rows in groups:
        outputs.index_copy_(0, rows, inputs.index_select(0, rows).to(dtype) @ weight(index))
    return outputs


def bgmv_shrink(
    inputs: Any,
    lora_b_weights: Any,
    output_tensor: Any,
    lora_indices_tensor: Any,
    scaling: float = 1.0,
) -> None:
    outputs = _grouped(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    rank = lora_b_weights.shape[-2]
    if outputs is None:
        output_tensor[:, :rank] = 0
    else:
        output_tensor[:, :rank] = scaling * outputs


def bgmv_expand(
    inputs: Any,
    lora_b_weights: Any,
    output_tensor: Any,
    lora_indices_tensor: Any,
    add_inputs: bool = True,
) -> None:
    outputs = _grouped(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    common = min(lora_b_weights.shape[-2], output_tensor.shape[1])
    if outputs is None:
        if not add_inputs:
            output_tensor[:, :common] = 0
        return
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def bgmv_expand_slice(
    inputs: Any,
    lora_b_weights: Any,
    output_tensor: Any,
    lora_indices_tensor: Any,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    outputs = _grouped(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if outputs is None:
        if not add_inputs:
            output_tensor[:, slice_offset : slice_offset + slice_size] = 0
        return
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs


_EXPLODED: dict[bytes, Any] = {}


def _per_token(lora_indices_tensor: Any, seq_len_tensor: Any) -> Any:
    """Each token's adapter index from each sequence's (the same for every layer of a step, so
    worked out once per step, keyed by content)."""
    import torch

    key = lora_indices_tensor.numpy().tobytes() + b"|" + seq_len_tensor.numpy().tobytes()
    exploded = _EXPLODED.get(key)
    if exploded is None:
        exploded = torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)
        _EXPLODED.clear()
        _EXPLODED[key] = exploded
    return exploded


def sgmv_shrink(
    inputs: Any,
    lora_a_weights: Any,
    output_tensor: Any,
    b_seq_start_loc: Any,
    seq_len_tensor: Any,
    lora_indices_tensor: Any,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    scaling: float,
) -> None:
    indices = _per_token(lora_indices_tensor, seq_len_tensor)
    bgmv_shrink(inputs, lora_a_weights, output_tensor, indices, scaling)


def sgmv_expand(
    inputs: Any,
    lora_b_weights: Any,
    output_tensor: Any,
    b_seq_start_loc: Any,
    seq_len_tensor: Any,
    lora_indices_tensor: Any,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    add_inputs: bool = False,
) -> None:
    indices = _per_token(lora_indices_tensor, seq_len_tensor)
    bgmv_expand(inputs, lora_b_weights, output_tensor, indices, add_inputs)


def sgmv_expand_slice(
    inputs: Any,
    lora_b_weights: Any,
    output_tensor: Any,
    b_seq_start_loc: Any,
    seq_len_tensor: Any,
    lora_indices_tensor: Any,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = False,
) -> None:
    indices = _per_token(lora_indices_tensor, seq_len_tensor)
    bgmv_expand_slice(
        inputs, lora_b_weights, output_tensor, indices, slice_offset, slice_size, add_inputs
    )


def _step(punica: Any) -> tuple[Any, set[int], dict[Any, Any]]:
    """This step's adapter slot per token, the slots present and a cache of masks, worked out
    once per mapping: vLLM rewrites the wrapper's indices only in ``update_metadata`` (wrapped
    below to forget them)."""
    step = getattr(punica, "_vbs_step", None)
    if step is None:
        indices = punica.token_lora_indices
        step = punica._vbs_step = (indices, {i for i in indices.tolist() if i >= 0}, {})
    return step


def _update_metadata(self: Any, *args: Any, **kwargs: Any) -> Any:
    self._vbs_step = None
    return ORIGINALS["update_metadata"](self, *args, **kwargs)


# Per LoRA-wrapped layer: the live slots' A weights stacked into one matrix and their B weights
# into one block-diagonal matrix, rebuilt when any slot's weights are written.
_FUSED: dict[Any, tuple[tuple[int, ...], list[int], Any, Any]] | None = None


def _fused(
    lora_a_stacked: tuple[Any, ...], lora_b_stacked: tuple[Any, ...]
) -> tuple[list[int], Any, Any]:
    """The slots holding weights in this layer, ``A`` as ``[slices * slots * rank, in]`` and
    ``B`` (transposed) block-diagonal as ``[slices * slots * rank, sum(out)]``."""
    global _FUSED
    import torch

    if _FUSED is None:
        from torch.utils.weak import WeakIdKeyDictionary

        _FUSED = WeakIdKeyDictionary()
    versions = tuple(w._version for w in (*lora_a_stacked, *lora_b_stacked))
    entry = _FUSED.get(lora_a_stacked[0])
    if entry is None or entry[0] != versions:
        flags = [_live_slots(a) for a in lora_a_stacked]
        live = [slot for slot in range(len(flags[0])) if any(f[slot] for f in flags)]
        a = torch.cat([w[live].flatten(0, 2) for w in lora_a_stacked])
        b = torch.block_diag(
            *(w[live].squeeze(1).permute(0, 2, 1).flatten(0, 1) for w in lora_b_stacked)
        )
        entry = _FUSED[lora_a_stacked[0]] = (versions, live, a, b)
    return entry[1], entry[2], entry[3]


def _add_lora_linear(
    self: Any,
    y: Any,
    x: Any,
    lora_a_stacked: tuple[Any, ...],
    lora_b_stacked: tuple[Any, ...],
    scale: float,
    output_slices: tuple[int, ...],
    *,
    buffer: Any = None,
    **kwargs: Any,
) -> Any:
    """vLLM's ``add_lora_linear`` (``y += x @ A[slot] @ B[slot] * scale`` per token, for every
    slice of the layer) as two matrix products over every live slot at once, each token's rows
    of the middle product masked to its own slot. A layer no adapter touches, or a step naming no
    adapter, adds nothing and costs nothing."""
    import torch

    indices, present, masks = _step(self)
    if not present:
        return y
    x2 = x.view(-1, x.shape[-1])
    usual = buffer is None and kwargs.get("add_inputs", True) is True
    if usual and x2.shape[0] == indices.shape[0]:
        live, a, b = _fused(lora_a_stacked, lora_b_stacked)
    if not usual or x2.shape[0] != indices.shape[0] or b.shape[1] != sum(output_slices):
        return ORIGINALS["add_lora_linear"](
            self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices,
            buffer=buffer, **kwargs,
        )  # fmt: skip
    if not present.intersection(live):
        return y
    key = (tuple(live), a.dtype, scale)
    mask = masks.get(key)
    if mask is None:
        slots = torch.tensor(live, dtype=indices.dtype)
        mask = masks[key] = (indices.unsqueeze(1) == slots).to(a.dtype).mul_(scale)
    slices, rank = len(lora_a_stacked), lora_a_stacked[0].shape[-2]
    shrunk = torch.nn.functional.linear(x2.to(a.dtype), a)
    shrunk.view(-1, slices, len(live), rank).mul_(mask.view(-1, 1, len(live), 1))
    out = y.view(-1, y.shape[-1])
    if out.shape[1] != b.shape[1]:
        out = out[:, : b.shape[1]]
    if out.dtype == b.dtype:
        out.addmm_(shrunk, b)  # the sum into y inside the product: one pass over y, not two
    else:
        out += (shrunk @ b).to(out.dtype)
    return y


# vLLM's own ops, kept when they are replaced (the tests compare against them).
ORIGINALS: dict[str, Any] = {}


def install(enabled: bool = True) -> bool:
    """Put vbs's ops where vLLM's CPU LoRA wrapper looks them up; False when not
    ``enabled`` or not on vLLM's CPU platform."""
    if not enabled:
        return False
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    import vllm.lora.ops.torch_ops as package
    import vllm.lora.ops.torch_ops.lora_ops as module
    import vllm.lora.punica_wrapper.punica_cpu as wrapper

    for name in _OPS:
        ORIGINALS.setdefault(name, getattr(module, name))
        for target in (package, module, wrapper):
            if hasattr(target, name):
                setattr(target, name, globals()[name])
    punica = wrapper.PunicaWrapperCPU
    for name, replacement in (
        ("add_lora_linear", _add_lora_linear),
        ("update_metadata", _update_metadata),
    ):
        if name not in ORIGINALS:
            ORIGINALS[name] = getattr(punica, name)
            setattr(punica, name, replacement)
    log.debug("vbs: fused LoRA kernels installed for vLLM's CPU build")
    return True


def register() -> None:
    """vLLM's general-plugin hook (called in every vLLM process of this environment): installs
    the ops unless the deployment's settings turn them off (``VBS_LORA_CPU_KERNELS=false``),
    and in `vbs engine serve`'s CPU servers, the threads that follow the machine's load."""
    from vbs_resources.settings import SettingsError, load_settings

    try:
        settings = load_settings()
    except SettingsError:  # a vLLM process of someone else's, with settings vbs cannot read
        install(True)
        return
    install(settings.lora_cpu_kernels)
    if settings.engine_follow_load:
        # A CPU server of `vbs engine serve`: its threads follow the machine's load.
        from vbs_resources.engine.cpu_share import follow_load_in_workers

        follow_load_in_workers()
