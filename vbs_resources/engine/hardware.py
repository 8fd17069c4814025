"""Where the engine runs and how: device, dtype, and the settings vLLM and torch read at import.

Decided without importing torch, whose import reads the thread settings that
``configure_vllm_env`` must set first.
"""

from __future__ import annotations

import os
import shutil

from vbs_resources.settings import set_library_defaults


def detect_device(cuda_visible_devices: str | None = None) -> str:
    """'cuda' where an NVIDIA GPU is visible, else 'cpu'. ``cuda_visible_devices`` is the
    ``CUDA_VISIBLE_DEVICES`` setting: an empty value hides every GPU."""
    if cuda_visible_devices == "":
        return "cpu"
    return "cuda" if shutil.which("nvidia-smi") or os.path.exists("/dev/nvidia0") else "cpu"


def cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "")
    except OSError:
        return False
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def resolve_dtype(dtype: str, device: str) -> str:
    """``auto`` keeps the checkpoint's dtype, except on CPUs without native bf16 (no AVX512-BF16
    or AMX), where torch emulates bf16 matmuls over 100x slower than float32."""
    if dtype == "auto" and device == "cpu" and not cpu_has_native_bf16():
        return "float32"
    return dtype


def engine_threads() -> int:
    """The OpenMP threads a CPU engine uses: every core this process may run on."""
    return len(os.sched_getaffinity(0))


def configure_vllm_env(device: str, kvcache_gib: int, threads: int | None = None) -> None:
    """Settings vLLM and torch read at import or engine start; set before the first import.
    These are writes for the libraries' sake: vbs's own settings come from ``Settings``."""
    # One process: the engine core runs in this Dagster step (fast start, and a kill of the
    # step takes the engine with it instead of orphaning a worker).
    set_library_defaults(HF_HUB_OFFLINE="1", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    if device == "cpu":
        set_library_defaults(
            VLLM_CPU_KVCACHE_SPACE=str(kvcache_gib),
            # Unset, vLLM drops torch to one thread "for serving"; a batch owns the machine.
            OMP_NUM_THREADS=str(threads or engine_threads()),
        )
