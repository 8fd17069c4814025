"""``vbs``: prepare models and start the platform (Dagster webserver + daemon)."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from vbs_cli import client
from vbs_resources import vbs_home
from vbs_resources.model_store import prepare_default_model

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def dagster_home(home: Path) -> Path:
    """``$VBS_HOME/dagster`` holding the embedded instance config (a copy of dagster.yaml)."""
    target = home / "dagster"
    target.mkdir(parents=True, exist_ok=True)
    config = target / "dagster.yaml"
    source = PROJECT_ROOT / "dagster.yaml"
    if not config.exists() or config.read_bytes() != source.read_bytes():
        shutil.copyfile(source, config)
    return target


def serve_command(home: Path, host: str, port: int) -> tuple[list[str], dict[str, str]]:
    """The ``dagster dev`` command line and environment that run vbs on its embedded defaults
    (the API server gets the same environment)."""
    env = dict(os.environ)
    env["VBS_HOME"] = str(home)
    env["DAGSTER_HOME"] = str(dagster_home(home))
    env.setdefault("HF_HUB_OFFLINE", "1")
    # Caches stay inside VBS_HOME instead of the user's home folder.
    env.setdefault("VLLM_CACHE_ROOT", str(home / "cache" / "vllm"))
    env.setdefault("HF_HOME", str(home / "cache" / "hf"))
    env.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
    dagster = Path(sys.executable).with_name("dagster")
    command = [
        str(dagster),
        "dev",
        "-h",
        host,
        "-p",
        str(port),
        "-w",
        str(PROJECT_ROOT / "workspace.yaml"),
    ]
    return command, env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vbs", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    model = sub.add_parser("model", help="manage local model folders")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    model_sub.add_parser("prepare", help="convert the packaged SmolLM2 into $VBS_HOME/models")
    serve = sub.add_parser("serve", help="run the Dagster webserver and daemon")
    serve.add_argument("--host", default=os.environ.get("VBS_DAGSTER_HOST", "127.0.0.1"))
    serve.add_argument("--port", type=int, default=int(os.environ.get("VBS_DAGSTER_PORT", "3000")))
    serve.add_argument("--api-host", default=os.environ.get("VBS_API_HOST", "127.0.0.1"))
    serve.add_argument("--api-port", type=int, default=int(os.environ.get("VBS_API_PORT", "8000")))
    client.add_commands(sub)
    args = parser.parse_args(argv)
    if args.command in ("submit", "batches", "results"):
        return client.run(args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    home = vbs_home()
    if args.command == "model":
        path = prepare_default_model(home)
        print(f"default model ready: {path}")
        return 0
    (home / "bucket" / "inbox").mkdir(parents=True, exist_ok=True)
    command, env = serve_command(home, args.host, args.port)
    # The API launches the runs of the batches it creates through this webserver.
    env.setdefault("VBS_DAGSTER_URL", f"http://{_loopback(args.host)}:{args.port}")
    api = [sys.executable, "-m", "vbs_api.server", "--host", args.api_host]
    api += ["--port", str(args.api_port)]
    print(
        f"vbs: Dagster UI on http://{args.host}:{args.port}, "
        f"API on http://{args.api_host}:{args.api_port}/v1, "
        f"drop files into {home}/bucket/inbox/",
        flush=True,
    )
    return supervise([command, api], env)


def _loopback(host: str) -> str:
    """Where to reach a server bound to ``host`` from this machine."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def supervise(commands: list[list[str]], env: dict[str, str]) -> int:
    """Run the servers side by side; when one exits or we are told to stop, stop them all."""
    procs = [subprocess.Popen(c, env=env) for c in commands]

    def stop(*_: object) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
    finally:
        stop()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return max(p.returncode or 0 for p in procs)


if __name__ == "__main__":
    sys.exit(main())
