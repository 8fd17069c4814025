"""The engine's modes on the same requests, same machine, same run.

Legs (each in a process of its own; the engine is driven through vbs's ``InferenceEngine``, as
``batch_output`` drives it, all requests in one chunk):

- ``in_process`` and ``server`` (``vbs engine serve`` on a free loopback port), base model only;
  the server again beside a busy loop at normal priority (its threads follow the load);
- the same with two LoRA adapters registered (LoRA on): base-only, then a mixed batch where a
  third of the lines name each adapter;
- ``in_process`` beside a competing CPU load (a busy loop at ``nice -n 19``, then at normal
  priority), with vbs's default threads (every core) and with one thread.

``--only in_process|server|busy`` runs one group of legs.

Prints output tokens/s per leg, ``mixed_vs_base`` ratios (target >= 0.8; against the base model
with LoRA off, and against base-only lines on the LoRA engine) and ends with one JSON line. The
adapters are random (rank 8, q_proj/v_proj), made here in PEFT's format. vbs's fused LoRA
kernels are on unless ``VBS_LORA_CPU_KERNELS=false`` (run it both ways to compare).
"""

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "SmolLM2-135M-Instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leg(args: argparse.Namespace) -> None:
    """One measurement, in this process: prints one JSON line."""
    sys.path.insert(0, str(ROOT))
    from tests.adapters import make_adapter
    from vbs_resources import build_resources, load_settings
    from vbs_resources.engine import EngineRequest
    from vbs_resources.registry import ModelRegistry

    home = Path(args.home)
    values = {"VBS_HOME": str(home), "VBS_MODEL": args.model, "VBS_DTYPE": args.dtype}
    if args.engine_url:
        values.update(VBS_ENGINE="server", VBS_ENGINE_URL=args.engine_url)
    for name in ("VBS_ENGINE_CONCURRENCY", "VBS_ENGINE_THREADS"):  # settings a run may vary
        if name in os.environ:
            values[name] = os.environ[name]
    resources = build_resources(load_settings(values))
    registry = ModelRegistry(resources["catalog"])
    engine = resources["engine"]
    registry.register_configured(engine.configured_models())
    names = [MODEL_NAME]
    if args.adapters:
        for seed, name in enumerate(("ad-a", "ad-b"), start=1):
            if resources["catalog"].models.get(name) is None:
                folder = make_adapter(home / name, args.model, seed=seed, targets=args.targets)
                registry.add_adapter(name, str(folder))
            names.append(name)
    models = names if args.mixed else [MODEL_NAME]
    requests = [
        EngineRequest(
            f"r{i}",
            {
                "model": models[i % len(models)],
                "messages": [{"role": "user", "content": f"Tell me about the number {i}."}],
                "max_tokens": args.max_tokens,
                "temperature": 0,
                "ignore_eos": True,
            },
        )
        for i in range(args.requests)
    ]
    started = time.perf_counter()
    engine.start("/v1/chat/completions", registry.snapshot())
    start_s = time.perf_counter() - started
    started = time.perf_counter()
    results = engine.run("/v1/chat/completions", requests)
    seconds = time.perf_counter() - started
    assert all(r.ok for r in results), [r.body for r in results if not r.ok][:2]
    tokens = sum(r.completion_tokens for r in results)
    print(json.dumps({"tok_s": round(tokens / seconds, 1), "seconds": round(seconds, 2),
                      "tokens": tokens, "start_s": round(start_s, 2)}))  # fmt: skip


def run_leg(args: argparse.Namespace, home: Path, env: dict, **options: object) -> dict:
    command = [sys.executable, __file__, "--leg", "--home", str(home), "--model", args.model]
    command += ["--dtype", args.dtype, "--requests", str(args.requests)]
    command += ["--max-tokens", str(args.max_tokens)]
    command += ["--targets", ",".join(args.targets)]
    for key, value in options.items():
        if value is True:
            command.append(f"--{key.replace('_', '-')}")
        elif value:
            command += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"leg {options} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class Server:
    """`vbs engine serve` for one home, LoRA on or off."""

    def __init__(self, home: Path, args: argparse.Namespace, env: dict, lora: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(env, VBS_HOME=str(home), VBS_MODEL=args.model, VBS_DTYPE=args.dtype,
                   VBS_ENGINE_PORT=str(self.port), VBS_ENGINE_LORA=lora)  # fmt: skip
        log = open(home.parent / f"server-{self.port}.log", "wb")
        command = [sys.executable, "-m", "vbs_cli.main", "engine", "serve"]
        self.proc = subprocess.Popen(
            command, env=env, stdout=log, stderr=log, cwd=ROOT, start_new_session=True
        )
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if urllib.request.urlopen(f"{self.url}/health", timeout=2).status == 200:
                    return
            except OSError:
                time.sleep(1)
        sys.exit("the engine server did not come up")

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--leg", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--home")
    parser.add_argument("--engine-url")
    parser.add_argument("--adapters", action="store_true")
    parser.add_argument("--mixed", action="store_true")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--model", default=str(ROOT / ".vbs/models/SmolLM2-135M-Instruct"))
    parser.add_argument("--dtype", default=None)
    parser.add_argument(
        "--targets",
        type=lambda value: tuple(value.split(",")),
        default=("q_proj", "v_proj"),
        help="the adapters' target modules, comma-separated (every linear layer: "
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)",
    )
    parser.add_argument(
        "--only",
        choices=("in_process", "server", "busy"),
        help="run one group of legs (the summary gives the ratios it can)",
    )
    args = parser.parse_args()
    if args.dtype is None:
        sys.path.insert(0, str(ROOT))
        from vbs_resources.engine.hardware import detect_device, resolve_dtype

        args.dtype = resolve_dtype("auto", detect_device())
    if args.leg:
        leg(args)
        return

    env = dict(os.environ, HF_HUB_OFFLINE="1", VBS_CPU_KVCACHE_GIB="2")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plain, lora = tmp / "plain" / "vbs", tmp / "lora" / "vbs"
        plain.mkdir(parents=True)
        lora.mkdir(parents=True)
        if args.only in (None, "in_process", "busy"):
            results["in_process_base"] = run_leg(args, plain, env)
        if args.only in (None, "in_process"):
            results["in_process_base_lora_on"] = run_leg(args, lora, env, adapters=True)
            results["in_process_mixed"] = run_leg(args, lora, env, adapters=True, mixed=True)
        for home, mode in ((plain, "off"), (lora, "on")) if args.only in (None, "server") else ():
            server = Server(home, args, env, mode)
            try:
                if mode == "off":
                    results["server_base"] = run_leg(args, home, env, engine_url=server.url)
                    # Beside a busy loop at normal priority: the server's threads follow.
                    busy = subprocess.Popen(["sh", "-c", "while :; do :; done"])
                    try:
                        results["server_base_busy_nice_0"] = run_leg(
                            args, home, env, engine_url=server.url
                        )
                    finally:
                        busy.kill()
                else:
                    results["server_base_lora_on"] = run_leg(
                        args, home, env, adapters=True, engine_url=server.url
                    )
                    results["server_mixed"] = run_leg(
                        args, home, env, adapters=True, mixed=True, engine_url=server.url
                    )
            finally:
                server.stop()
        for niceness in (19, 0) if args.only in (None, "busy") else ():
            label = "busy" if niceness else "busy_nice_0"
            loop = ["nice", "-n", str(niceness), "sh", "-c", "while :; do :; done"]
            busy = subprocess.Popen(loop)
            try:
                results[f"in_process_base_{label}"] = run_leg(args, plain, env)
                results[f"in_process_base_{label}_1_thread"] = run_leg(
                    args, plain, dict(env, OMP_NUM_THREADS="1")
                )
            finally:
                busy.kill()

    for name, figures in results.items():
        print(f"{name:32s} {figures['tok_s']:8.1f} tok/s  ({figures['tokens']} tokens in "
              f"{figures['seconds']} s, engine start {figures['start_s']} s)")  # fmt: skip
    tps = {name: figures["tok_s"] for name, figures in results.items()}
    summary = {
        "bench": "engine_modes",
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "dtype": args.dtype,
        "cores": len(os.sched_getaffinity(0)),
        "lora_cpu_kernels": os.environ.get("VBS_LORA_CPU_KERNELS", "true"),
        **{f"{name}_tok_s": value for name, value in tps.items()},
        "target_mixed_vs_base": 0.8,
        "target_server_busy_vs_idle": 0.5,
    }
    ratios = {
        "server_vs_in_process": ("server_base", "in_process_base"),
        "in_process_mixed_vs_base": ("in_process_mixed", "in_process_base"),
        "in_process_mixed_vs_base_lora_on": ("in_process_mixed", "in_process_base_lora_on"),
        "server_mixed_vs_base": ("server_mixed", "server_base"),
        "in_process_busy_vs_idle": ("in_process_base_busy", "in_process_base"),
        "in_process_busy_nice_0_vs_idle": ("in_process_base_busy_nice_0", "in_process_base"),
        "server_busy_nice_0_vs_idle": ("server_base_busy_nice_0", "server_base"),
    }
    for name, (part, whole) in ratios.items():
        if part in tps and whole in tps:
            summary[name] = round(tps[part] / tps[whole], 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
