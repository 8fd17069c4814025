"""``vbs serve``: Dagster's production processes (the code location's gRPC server, the
webserver and the daemon, each a process of its own), the Batch API, Label Studio and, in
server mode, the vLLM engine server, side by side, supervised.

A process that dies (killed, out of memory) is restarted alone, after 1 s when it had run a
minute or more and with doubling backoff up to a minute when it keeps dying; the others keep
running, and ``$VBS_HOME/serve-status.json`` (shown by the API's ``/health``) says which is
restarting, how often it was, and how it last exited.

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
from dataclasses import dataclass
from pathlib import Path

import psutil

from vbs_resources import Settings, strict_json
from vbs_resources.curation.label_studio import ADMIN_USERNAME, label_studio_command
from vbs_resources.dagster_instance import (
    LOCATION_NAME,
    code_server_address,
    write_instance,
    write_workspace,
)
from vbs_resources.settings import SettingsError, is_loopback, redact_url

PROJECT_ROOT = Path(__file__).resolve().parent.parent
GRACE_SECONDS = 5.0
# How often `vbs serve` asks whether the code location is in error (its code server died).
WATCH_SECONDS = 15.0


Named = list[tuple[str, list[str], dict[str, str]]]


def serve_commands(settings: Settings) -> Named:
    """Dagster's production processes (the code location's gRPC server, the webserver, the
    daemon), the API server and, where they are local, Label Studio and the engine's servers
    (in server mode with no ``VBS_ENGINE_URL``: one, or the replicas and vLLM's router): each
    named, with its command line and environment, in the order they start."""
    write_instance(settings)
    workspace = str(write_workspace(settings))
    extra = {}
    if settings.dagster_url is None:
        # The API launches the runs of the batches it creates through this webserver.
        extra["VBS_DAGSTER_URL"] = settings.resolved_dagster_url
    env = settings.child_environment(**extra)
    bin_dir = Path(sys.executable).parent
    logs = ["--log-format", "json"] if settings.log_format == "json" else []
    code_server = [str(bin_dir / "dagster"), "code-server", "start"]
    code_server += ["-h", settings.code_server_host, "-p", str(settings.code_server_port)]
    code_server += ["-m", "vbs_definitions", "-d", str(PROJECT_ROOT)]
    code_server += ["--location-name", LOCATION_NAME, *logs]
    webserver = [str(bin_dir / "dagster-webserver"), "-h", settings.dagster_host]
    webserver += ["-p", str(settings.dagster_port), "-w", workspace, *logs]
    daemon = [str(bin_dir / "dagster-daemon"), "run", "-w", workspace, *logs]
    api = [sys.executable, "-m", "vbs_api.server", "--host", settings.api_host]
    api += ["--port", str(settings.api_port)]
    commands = [
        ("code-server", code_server, env),
        ("webserver", webserver, env),
        ("daemon", daemon, env),
        ("api", api, env),
    ]
    label_studio = label_studio_server(settings)
    if label_studio is not None:
        commands.append(("label-studio", *label_studio))
    if settings.engine == "server" and settings.engine_url is None:
        # Server mode with no server named: warm ones beside the platform, stopped with it.
        from vbs_cli.engine import engine_commands

        commands += engine_commands(settings)
    return commands


# What `vbs serve --only` may start (a container's one process). `engine` is one vLLM server
# on VBS_ENGINE_PORT whatever VBS_ENGINE_REPLICAS says: a container is one replica (and the
# router runs from its own command, deploy/k8s).
PROCESSES = ("code-server", "webserver", "daemon", "api", "label-studio", "engine")


def serve_one(settings: Settings, name: str) -> int:
    """``vbs serve --only NAME``: that one process in the foreground, with the command line and
    environment `vbs serve` gives it (a container's command; its runtime restarts it). The
    instance and workspace files are written first; `vbs migrate` has brought the state up."""
    commands = {n: (command, env) for n, command, env in serve_commands(settings)}
    if name == "engine" and settings.engine == "server" and settings.engine_url is None:
        from vbs_cli.engine import server_command

        commands[name] = server_command(settings.model_copy(update={"engine_replicas": 1}))
    if name not in commands:
        why = {
            "label-studio": "VBS_LABEL_STUDIO_URL names another, VBS_LABEL_STUDIO_START=false, "
            "or it is not installed",
            "engine": "it starts only with VBS_ENGINE=server and no VBS_ENGINE_URL",
        }.get(name, "")
        raise SettingsError(f"--only {name}: these settings start no {name} ({why})")
    command, env = commands[name]
    print(f"vbs: {name}: {' '.join(command)}", file=sys.stderr, flush=True)
    os.execve(command[0], command, env)
    return 1  # not reached


def code_server_ready(settings: Settings) -> Callable[[], bool]:
    """Whether the code location's gRPC server answers (its proxy forwards the ping to the
    process that loaded the code)."""
    host, port = code_server_address(settings)

    def ready() -> bool:
        from dagster._grpc.client import DagsterGrpcClient

        try:
            DagsterGrpcClient(port=port, host=host).ping("vbs")
        except Exception:  # noqa: BLE001 - any failure means "not yet"
            return False
        return True

    return ready


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
    from vbs_resources.bucket import Bucket

    bucket = Bucket(url=settings.resolved_bucket_url)  # made when missing (a folder, an S3 bucket)
    try:
        bucket.fs.makedirs(bucket.path("inbox"), exist_ok=True)
    except Exception as exc:  # noqa: BLE001 - unreachable, refused, a bad name: one line
        raise SettingsError(
            f"VBS_BUCKET_URL={redact_url(bucket.url)}: the bucket cannot be used "
            f"({type(exc).__name__}: {str(exc)[:200]})"
        ) from None
    if not is_loopback(settings.dagster_host):
        print(
            f"vbs: warning: the Dagster UI on {settings.dagster_host} has no authentication",
            file=sys.stderr,
        )
    with platform_lock(settings):
        check_port_free(
            settings.code_server_host, settings.code_server_port, "VBS_CODE_SERVER_PORT"
        )
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
            f"drop files into {bucket.uri('inbox')}/"
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
        return supervise(
            commands,
            watch=LocationWatch(settings.resolved_dagster_url),
            status=settings.home / STATUS_FILE,
            ready={"code-server": code_server_ready(settings), **engine_ready(settings)},
        )


def engine_ready(settings: Settings) -> dict[str, Callable[[], bool]]:
    """With replicas, the router starts once every replica answers (after the last one)."""
    if settings.engine != "server" or settings.engine_url or settings.engine_replicas == 1:
        return {}
    from vbs_cli.engine import replicas_ready

    return {f"engine-{settings.engine_replicas}": replicas_ready(settings)}


def check_port_free(host: str, port: int, setting: str) -> None:
    """Refuse to start on a port another process holds. gRPC servers bind with SO_REUSEPORT: a
    second code server on the same port would start, and the kernel would split the calls of
    two platforms between them."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # Connections of an earlier server waiting out TIME_WAIT are no reason to refuse.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            raise SettingsError(
                f"{setting}={port}: {host}:{port} is in use (another `vbs serve`?); choose "
                "another port"
            ) from None


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


def stop(procs: list[subprocess.Popen], first: list[subprocess.Popen] = ()) -> None:
    """``first`` (the daemon) and the runs first (SIGKILL, as a crash: no retry is launched on
    the way down, and the batches resume on the next start), then the servers (SIGTERM), then,
    after ``GRACE_SECONDS``, anything left (SIGKILL)."""
    descendants = [p for proc in procs for p in _tree_of(proc.pid)]
    daemons = [psutil.Process(proc.pid) for proc in first if proc.poll() is None]
    daemons += [p for p in descendants if "dagster._daemon" in _cmdline(p)]
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
    alone never leaves servers holding the ports and the state. SIGTERM, not SIGKILL: a server
    then shuts its own children down."""
    import ctypes

    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class LocationWatch:
    """Brings the code location back when the process that loaded the code dies: the code
    server (a proxy) stays up but leaves the location in error (every sensor stops, the
    reconciler included) until someone reloads it. Every ``WATCH_SECONDS`` it asks the
    webserver, and reloads a location in error (the proxy then starts a new process)."""

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


# A child that ran this long before dying is restarted after 1 s; one that dies sooner waits
# twice as long as the time before, up to MAX_BACKOFF_S.
STABLE_S = 60.0
MAX_BACKOFF_S = 60.0
STATUS_FILE = "serve-status.json"
# How long the code server may take to load the code before the rest start anyway.
READY_S = 180.0


@dataclass
class Child:
    """One process `vbs serve` keeps running: started, and restarted with backoff when it dies."""

    name: str
    command: list[str]
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    restarts: int = 0
    started_at: float = 0.0
    backoff: float = 0.0
    due: float | None = None  # when a dead child starts again
    last_exit: int | None = None
    last_exit_at: float | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.command, env=self.env, start_new_session=True, preexec_fn=_die_with_parent
        )
        self.started_at, self.due = time.time(), None

    def reap(self) -> bool:
        """True when the child has just been found dead: what is left of its session is killed
        (a code server's runs, an engine server's engine core), and its restart is
        scheduled. A run killed so is resumed from its checkpoint by the retry Dagster starts
        once the reconciler reports it failed."""
        if self.proc is None or self.proc.poll() is None:
            return False
        code = self.proc.returncode
        _signal([p for p in _session_of(self.proc.pid)], signal.SIGKILL)
        ran = time.time() - self.started_at
        self.backoff = 1.0 if ran >= STABLE_S or not self.backoff else min(
            self.backoff * 2, MAX_BACKOFF_S
        )  # fmt: skip
        self.due = time.monotonic() + self.backoff
        self.last_exit, self.last_exit_at, self.proc = code, time.time(), None
        return True

    def state(self) -> dict[str, object]:
        return {
            "state": "running" if self.proc is not None else "restarting",
            "pid": self.proc.pid if self.proc is not None else None,
            "restarts": self.restarts,
            "last_exit_code": self.last_exit,
            "last_exit_at": self.last_exit_at,
        }


def _session_of(sid: int) -> list[psutil.Process]:
    """The processes still in session ``sid`` (each child starts a session of its own)."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getsid(process.pid) == sid:
                found.append(process)
    return found


def write_status(path: Path | None, children: list[Child]) -> None:
    """What ``/health`` shows: each child's state, pid, restarts and last exit."""
    if path is None:
        return
    status = {"pid": os.getpid(), "updated_at": time.time(),
              "processes": {c.name: c.state() for c in children}}  # fmt: skip
    partial = path.with_name(f".{path.name}.part")
    partial.write_text(strict_json.dumps(status))
    partial.replace(path)


def _wait_ready(child: Child, ready: Callable[[], bool], stopping: Callable[[], bool]) -> None:
    """Until ``ready()`` (at most ``READY_S``), unless the child dies or a stop is asked."""
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline and not stopping():
        if child.proc is None or child.proc.poll() is not None or ready():
            return
        time.sleep(0.5)
    print(f"vbs: {child.name} is not ready after {READY_S:.0f} s; starting the rest",
          file=sys.stderr, flush=True)  # fmt: skip


def supervise(
    commands: Named,
    watch: Callable[[], None] | None = None,
    status: Path | None = None,
    ready: dict[str, Callable[[], bool]] | None = None,
) -> int:
    """Run the servers side by side until told to stop; a server that dies is restarted with
    backoff, and the others keep running. ``watch`` is called between looks at the processes
    (the code location's watch); ``status`` is the file ``/health`` reads; the children named
    in ``ready`` are waited for before the next ones start (the code server, which the
    webserver and the daemon load the location from).

    Each server runs in a session of its own: a Ctrl-C in the terminal reaches only this
    process, which stops the runs first (see ``stop``), instead of every process at once (a
    run worker interrupted by a signal would be recorded as terminated by a user)."""
    children = [Child(name, command, env) for name, command, env in commands]
    stopping = False

    def on_signal(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        for child in children:
            if stopping:
                break
            child.start()
            if child.name in (ready or {}):
                _wait_ready(child, ready[child.name], lambda: stopping)
        write_status(status, children)
        while not stopping:
            changed = False
            for child in children:
                if child.reap():
                    print(f"vbs: {child.name} exited with {child.last_exit}; restarting it in "
                          f"{child.backoff:.0f} s", file=sys.stderr, flush=True)  # fmt: skip
                    changed = True
                elif child.proc is None and child.due is not None and time.monotonic() >= child.due:
                    child.start()
                    child.restarts += 1
                    print(f"vbs: {child.name} restarted (restart {child.restarts})",
                          file=sys.stderr, flush=True)  # fmt: skip
                    changed = True
            if changed:
                write_status(status, children)
            if watch is not None:
                watch()
            time.sleep(0.2)
    finally:
        started = time.monotonic()
        stop(
            [c.proc for c in children if c.proc is not None],
            first=[c.proc for c in children if c.name == "daemon" and c.proc is not None],
        )
        print(f"vbs: stopped in {time.monotonic() - started:.1f}s", flush=True)
        if status is not None:
            status.unlink(missing_ok=True)
    return 0
