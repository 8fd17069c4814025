"""A real PostgreSQL for the tests: Debian's PostgreSQL 15 binaries, a data folder of its own, a
free port on 127.0.0.1, run as a non-root user (PostgreSQL refuses root). One per pytest
session (each xdist worker is a session); each test gets a database of its own."""

from __future__ import annotations

import fcntl
import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import sqlalchemy as sa

USER = "vbs"


def binaries() -> Path | None:
    """The folder of ``initdb`` and ``pg_ctl``: on PATH, else Debian's versioned folder."""
    found = shutil.which("initdb")
    if found:
        return Path(os.path.realpath(found)).parent
    folders = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(folders[-1]).parent if folders else None


def _as_postgres(die_with_parent: bool):  # noqa: ANN202 - a preexec_fn
    """Before exec, in the child: become the ``postgres`` user when root (PostgreSQL refuses
    root), and, for the server, get SIGINT (a fast shutdown) when the test process dies, so that
    a killed pytest never leaves a server behind. Everything is looked up before the fork."""
    import ctypes
    import pwd

    user = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
    libc = ctypes.CDLL("libc.so.6", use_errno=True)

    def demote() -> None:
        if user is not None:
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
        if die_with_parent:  # after setuid, which clears it
            libc.prctl(1, signal.SIGINT)

    return demote


PREFIX = "vbs-test-postgres-"


def _sweep() -> None:
    """Remove the folders of servers that are gone (a test process killed before its cleanup;
    the server itself died with it). A folder whose server is alive, or that is younger than
    ten minutes without a readable pid (another worker's server, still starting: its pid file is
    written in steps), is left alone."""
    for folder in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
        try:
            age = time.time() - folder.stat().st_mtime
            pid = int((folder / "data" / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pid = None
        if pid is not None:
            try:
                os.kill(pid, 0)
                continue  # alive
            except ProcessLookupError:
                pass  # gone: remove it
            except OSError:
                continue
        elif age < 600:
            continue
        shutil.rmtree(folder, ignore_errors=True)


class PostgresServer:
    def __init__(self, port: int) -> None:
        folder = binaries()
        if folder is None:
            raise RuntimeError("PostgreSQL is not installed: `make setup` installs it")
        self.bin, self.port = folder, port
        # One initdb and start at a time on this machine: concurrent initdb runs (one per pytest
        # worker) failed in their bootstrap now and then.
        with open(Path(tempfile.gettempdir()) / f"{PREFIX}start.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self._start(folder, port)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _start(self, folder: Path, port: int) -> None:
        _sweep()
        # Outside pytest's temporary folders: those are root's alone (mode 700), and the server
        # runs as the `postgres` user when the tests run as root.
        self.root = Path(tempfile.mkdtemp(prefix=PREFIX))
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        initdb = [str(folder / "initdb"), "-D", str(self.data), "-U", USER, "--auth=trust"]
        done = subprocess.run(
            [*initdb, "-E", "UTF8", "--no-sync"],
            capture_output=True, text=True, preexec_fn=_as_postgres(False), cwd=self.root,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed: {done.stdout[-1500:]}{done.stderr[-1500:]}")
        command = [str(folder / "postgres"), "-D", str(self.data), "-h", "127.0.0.1"]
        command += ["-p", str(port), "-k", str(self.data), "-c", "fsync=off"]
        command += ["-c", "max_connections=300"]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, cwd=self.root,
                preexec_fn=_as_postgres(True),
            )  # fmt: skip
        self.admin = sa.create_engine(self.url("postgres"), isolation_level="AUTOCOMMIT")
        deadline = time.monotonic() + 60
        while True:
            try:
                with self.admin.connect():
                    break
            except sa.exc.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = self.log.read_text()[-2000:]
                    raise RuntimeError(f"PostgreSQL did not start: {log}") from None
                time.sleep(0.2)

    def url(self, database: str) -> str:
        return f"postgresql+psycopg2://{USER}@127.0.0.1:{self.port}/{database}"

    def database(self, prefix: str = "t") -> str:
        """A new, empty database; its URL."""
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        with self.admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        return self.url(name)

    def stop(self) -> None:
        self.admin.dispose()
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)
