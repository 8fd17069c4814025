"""``vbs serve``: the Dagster webserver and daemon (``dagster dev``) and the Batch API, side by
side, stopped together.

One platform per ``VBS_HOME`` at a time (a lock file the kernel releases when the process dies).
Stopping (Ctrl-C, SIGTERM) ends the batch runs in flight with SIGKILL first, exactly as a crash
would, so that Dagster does not record them as terminated by a user (which would cancel their
batches); the next start resumes them from their checkpoints through the reconciler. Then the
servers get SIGTERM, and whatever is left after a few seconds SIGKILL: nothing outlives it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil

from vbs_resources import Settings
from vbs_resources.curation.label_studio import ADMIN_USERNAME, label_studio_command
from vbs_resources.dagster_instance import write_instance
from vbs_resources.settings import is_loopback

PROJECT_ROOT = Path(__file__).resolve().parent.parent
GRACE_SECONDS = 5.0
# How often `vbs serve` asks whether the code location is in error (its code server died).
WATCH_SECONDS = 15.0


def serve_commands(settings: Settings) -> list[tuple[list[str], dict[str, str]]]:
    """The ``dagster dev`` and API server command lines (and the engine server's, in server
    mode with no ``VBS_ENGINE_URL``), each with its environment."""
    write_instance(settings)
    extra = {}
    if settings.dagster_url is None:
        # The API launches the runs of the batches it creates through this webserver.
        extra["VBS_DAGSTER_URL"] = settings.resolved_dagster_url
    env = settings.child_environment(**extra)
    dagster = Path(sys.executable).with_name("dagster")
    webserver = [str(dagster), "dev", "-h", settings.dagster_host, "-p", str(settings.dagster_port)]
    webserver += ["-w", str(PROJECT_ROOT / "workspace.yaml")]
    api = [sys.executable, "-m", "vbs_api.server", "--host", settings.api_host]
    api += ["--port", str(settings.api_port)]
    commands = [(webserver, env), (api, env)]
    label_studio = label_studio_server(settings)
    if label_studio is not None:
        commands.append(label_studio)
    if settings.engine == "server" and settings.engine_url is None:
        # Server mode with no server named: a warm one beside the platform, stopped with it.
        from vbs_cli.engine import server_command

        commands.append(server_command(settings))
    return commands


def label_studio_server(settings: Settings) -> tuple[list[str], dict[str, str]] | None:
    """The local Label Studio's command and environment, unless ``VBS_LABEL_STUDIO_URL`` names
    another or ``VBS_LABEL_STUDIO_START=false``; None (with a warning) when it is not installed."""
    if settings.label_studio_url is not None or not settings.label_studio_start:
        return None
    token = settings.label_studio_token
    command, extra = label_studio_command(
        settings.label_studio_home,
        settings.label_studio_host,
        settings.label_studio_port,
        token.get_secret_value() if token is not None else None,
        settings.label_studio_bin,
    )
    if not Path(command[0]).exists():
        print(
            f"vbs: warning: {command[0]} is missing (`make setup` installs Label Studio); "
            "curation runs without it",
            file=sys.stderr,
        )
        return None
    # Label Studio gets only what it needs: none of vbs's own secrets.
    env = {k: v for k, v in os.environ.items() if not k.startswith("VBS_")}
    return command, {**env, **extra}


@contextlib.contextmanager
def platform_lock(settings: Settings) -> Iterator[None]:
    settings.home.mkdir(parents=True, exist_ok=True)
    path = settings.home / "serve.lock"
    with open(path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            raise SystemExit(
                f"vbs: another `vbs serve` (pid {holder}) runs on {settings.home}; stop it first"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        yield


def serve(settings: Settings) -> int:
    write_instance(settings)  # first: a team's instance file that would lose runs is refused
    (Path(settings.resolved_bucket_url) / "inbox").mkdir(parents=True, exist_ok=True)
    if not is_loopback(settings.dagster_host):
        print(
            f"vbs: warning: the Dagster UI on {settings.dagster_host} has no authentication",
            file=sys.stderr,
        )
    with platform_lock(settings):
        from vbs_resources import build_resources
        from vbs_resources.registry import ModelRegistry

        # The catalog is upgraded and the configured models registered once, here, first.
        resources = build_resources(settings)
        ModelRegistry(resources["catalog"]).register_configured(
            resources["engine"].configured_models()
        )
        resources["catalog"].engine.dispose()
        commands = serve_commands(settings)
        print(
            f"vbs: Dagster UI on http://{settings.dagster_host}:{settings.dagster_port}, "
            f"API on http://{settings.api_host}:{settings.api_port}/v1, "
            f"drop files into {settings.resolved_bucket_url}/inbox/"
            + (
                f", engine server {settings.resolved_engine_url}"
                if settings.engine == "server"
                else ""
            ),
            flush=True,
        )
        if settings.label_studio_url is None and settings.label_studio_start:
            where = settings.label_studio_home
            print(
                f"vbs: Label Studio on {settings.resolved_label_studio_url} (user "
                f"{ADMIN_USERNAME}, password in {where / 'password'}, API token in "
                f"{where / 'token'}; the first start takes about a minute)",
                flush=True,
            )
        return supervise(commands, watch=LocationWatch(settings.resolved_dagster_url))


def _signal(processes: list[psutil.Process], sig: int) -> None:
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.send_signal(sig)


def _cmdline(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def run_workers(procs: list[subprocess.Popen]) -> list[psutil.Process]:
    """The processes executing Dagster runs: everything below a code server's gRPC process
    (the run worker, its engine, its log tailers)."""
    found = []
    for proc in procs:
        for process in _tree_of(proc.pid):
            if "dagster api grpc" in _cmdline(process):
                found += _tree_of(process.pid)
    return found


def _tree_of(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def stop(procs: list[subprocess.Popen]) -> None:
    """The daemon and the runs first (SIGKILL, as a crash: no retry is launched on the way
    down, and the batches resume on the next start), then the servers (SIGTERM), then, after
    ``GRACE_SECONDS``, anything left (SIGKILL)."""
    descendants = [p for proc in procs for p in _tree_of(proc.pid)]
    daemons = [p for p in descendants if "dagster._daemon" in _cmdline(p)]
    _signal(daemons + run_workers(procs), signal.SIGKILL)
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + GRACE_SECONDS
    for proc in procs:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(deadline - time.monotonic(), 0.1))
    leftovers = [p for p in descendants + [p for proc in procs for p in _tree_of(proc.pid)]]
    _signal([p for p in leftovers if p.is_running()], signal.SIGKILL)
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    psutil.wait_procs(leftovers, timeout=5)


def _die_with_parent() -> None:
    """In a child, before exec: get SIGTERM if ``vbs serve`` dies (Linux), so that killing it
    alone never leaves servers holding the ports and the state. SIGTERM, not SIGKILL: ``dagster
    dev`` then shuts its own webserver, daemon and code servers down."""
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class LocationWatch:
    """Brings the code location back when its code server dies: ``dagster dev`` leaves the
    location in error (every sensor stops, the reconciler included) until someone reloads it.
    Every ``WATCH_SECONDS`` it asks the webserver, and reloads a location in error."""

    def __init__(self, dagster_url: str) -> None:
        from vbs_api.launch import BatchLauncher

        self.launcher = BatchLauncher(dagster_url, timeout=10)
        self.next_look = time.monotonic() + WATCH_SECONDS

    def __call__(self) -> None:
        if time.monotonic() < self.next_look:
            return
        self.next_look = time.monotonic() + WATCH_SECONDS
        from vbs_api.launch import LaunchFailed, LaunchUnavailable

        try:
            error = self.launcher.location_error()
            if error is None:
                return
            print(f"vbs: the code location is in error ({error[:200]}); reloading it",
                  file=sys.stderr, flush=True)  # fmt: skip
            print(f"vbs: reload: {self.launcher.reload_location()}", file=sys.stderr, flush=True)
        except (LaunchFailed, LaunchUnavailable):
            pass  # the webserver is starting or stopping: look again next time


def supervise(
    commands: list[tuple[list[str], dict[str, str]]], watch: Callable[[], None] | None = None
) -> int:
    """Run the servers side by side; when one exits or we are told to stop, stop them all.
    ``watch`` is called between looks at the processes (the code location's watch).

    Each server runs in a session of its own: a Ctrl-C in the terminal reaches only this
    process, which stops the runs first (see ``stop``), instead of every process at once (a
    run worker interrupted by a signal would be recorded as terminated by a user)."""
    procs = [
        subprocess.Popen(c, env=env, start_new_session=True, preexec_fn=_die_with_parent)
        for c, env in commands
    ]
    stopping = False

    def on_signal(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    exited: subprocess.Popen | None = None
    try:
        while not stopping and exited is None:
            exited = next((p for p in procs if p.poll() is not None), None)
            if watch is not None and exited is None:
                watch()
            time.sleep(0.2)
    finally:
        started = time.monotonic()
        stop(procs)
        print(f"vbs: stopped in {time.monotonic() - started:.1f}s", flush=True)
    if exited is None:
        return 0  # told to stop
    # A server ended on its own: that is a failure, whatever its code (a signal is 128 + N).
    code = exited.returncode
    print(f"vbs: {' '.join(exited.args[:3])} exited with {code}", file=sys.stderr)
    return 128 - code if code < 0 else max(code, 1)
