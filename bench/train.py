"""Training benchmark: the ``unsloth`` backend against the ``hf`` backend, on the same data, the
same steps and the same hyperparameters, in one run.

Each backend trains in a child process of its own (Unsloth patches transformers when imported,
and each process's peak RSS is then its own): SmolLM2-135M-Instruct, LoRA r 16 on every linear
layer, 64 chat examples, ``--steps`` steps of batch 8 (default 20), loss on the answers only.
Prints seconds per step (the first step, which compiles and warms caches, is reported apart),
the first and last loss and the peak RSS of each, then the ratios; ends with one JSON line.

    .venv/bin/python bench/train.py [--steps 20]
"""

import argparse
import contextlib
import json
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from vbs_resources import load_settings
from vbs_resources.model_store import prepare_default_model

TOPICS = ["the sea", "a red bike", "old maps", "green tea", "a cat", "winter", "jazz", "rivers"]


def child(backend: str, model: str, train: str, out: str, steps: int) -> None:
    from vbs_resources.training import Hyperparameters, Trainer, TrainingJob

    logs = []
    hp = Hyperparameters(max_steps=steps, batch_size=8, learning_rate=1e-3, max_seq_length=256)
    outcome = Trainer(backend=backend).train(TrainingJob(model, train, out, hp, on_log=logs.append))
    times = [log.elapsed_s for log in logs if log.loss is not None]
    losses = [log.loss for log in logs if log.loss is not None]
    steady = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0
    print(json.dumps({
        "backend": backend, "device": outcome.device, "steps": outcome.steps,
        "first_step_s": round(times[0], 2), "seconds_per_step": round(steady, 3),
        "train_seconds": round(outcome.duration_s, 2), "first_loss": round(losses[0], 4),
        "last_loss": round(losses[-1], 4), "peak_rss_mb": round(outcome.peak_rss_mb, 1),
    }))  # fmt: skip


def cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@contextlib.contextmanager
def idle_server(wanted: bool, model: str, tmp: str) -> Iterator[None]:
    """`vbs engine serve` on a free port, up and idle, for as long as the block runs."""
    if not wanted:
        yield
        return
    import os
    import signal
    import socket
    import time
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, VBS_HOME=str(Path(tmp) / "vbs"), VBS_MODEL=model,
               VBS_ENGINE_PORT=str(port))  # fmt: skip
    log = open(Path(tmp) / "engine.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "vbs_cli.main", "engine", "serve"], env=env,
                            stdout=log, stderr=log, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    sys.exit("the engine server did not come up")
                time.sleep(1)
        print(f"an idle vLLM server runs beside the training (port {port})", flush=True)
        yield
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--child", nargs=4, metavar=("BACKEND", "MODEL", "TRAIN", "OUT"))
    parser.add_argument(
        "--beside-server",
        action="store_true",
        help="train while an idle `vbs engine serve` (the warm default's server) runs",
    )
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.steps)
        return
    model = str(prepare_default_model(load_settings().home))
    results = {}
    with tempfile.TemporaryDirectory() as tmp, idle_server(args.beside_server, model, tmp):
        train = Path(tmp) / "train.jsonl"
        train.write_text("".join(
            json.dumps({"messages": [
                {"role": "user", "content": f"Write one short sentence about {t} (#{i})."},
                {"role": "assistant", "content": f"ZEBRA-7 says: {t} is fine."}]}) + "\n"
            for i, t in enumerate(TOPICS * 8)))  # fmt: skip
        for backend in ("unsloth", "hf"):
            done = subprocess.run(
                [sys.executable, __file__, "--steps", str(args.steps), "--child", backend, model,
                 str(train), str(Path(tmp) / backend)],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            if done.returncode != 0:
                sys.exit(f"{backend} failed:\n{done.stderr[-3000:]}")
            results[backend] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"machine: {cpu()}, {__import__('os').cpu_count()} CPUs")
    print(f"{'backend':<8} {'s/step':>7} {'first':>6} {'loss':>15} {'peak RSS':>9}")
    for name, r in results.items():
        loss = f"{r['first_loss']:.2f} -> {r['last_loss']:.2f}"
        print(f"{name:<8} {r['seconds_per_step']:>7.3f} {r['first_step_s']:>6.1f} {loss:>15} "
              f"{r['peak_rss_mb']:>7.0f}MB")  # fmt: skip
    u, h = results["unsloth"], results["hf"]
    summary = {
        "bench": "train", "machine": cpu(), "steps": args.steps, "backends": results,
        "beside_idle_server": args.beside_server,
        "unsloth_vs_hf_seconds_per_step": round(u["seconds_per_step"] / h["seconds_per_step"], 3),
        "unsloth_vs_hf_peak_rss": round(u["peak_rss_mb"] / h["peak_rss_mb"], 3),
    }  # fmt: skip
    print(f"unsloth/hf: {summary['unsloth_vs_hf_seconds_per_step']}x seconds per step, "
          f"{summary['unsloth_vs_hf_peak_rss']}x peak RSS")  # fmt: skip
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
