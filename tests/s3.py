"""A real S3-protocol server for the tests: moto's server mode (``moto_server``, from the
project's ``.venv-s3``, which `make s3-server` installs) on a free port of 127.0.0.1. One per
pytest session (each xdist worker is a session); each test gets buckets of its own. Clients
find it through the standard AWS variables, as they would find AWS."""

from __future__ import annotations

import contextlib
import ctypes
import signal
import subprocess
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
MOTO_SERVER = ROOT / ".venv-s3" / "bin" / "moto_server"


def _die_with_parent() -> None:  # a preexec_fn: the server goes when the test process dies
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


class S3Server:
    def __init__(self, port: int, log: Path) -> None:
        if not MOTO_SERVER.exists():
            raise RuntimeError(f"{MOTO_SERVER} is missing: `make s3-server` installs it")
        self.port, self.log = port, log
        self.url = f"http://127.0.0.1:{port}"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)],
                stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{self.url}/moto-api/", timeout=2).raise_for_status()
                break
            except httpx.HTTPError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    tail = log.read_text()[-2000:]
                    raise RuntimeError(f"moto_server did not start: {tail}") from None
                time.sleep(0.2)

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS variables that point a client (s3fs, botocore) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "vbs-test",
            "AWS_SECRET_ACCESS_KEY": "vbs-test-secret",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def bucket_url(self, prefix: str = "vbs") -> str:
        """A URL in a new bucket (made by the first write, as in production)."""
        return f"s3://vbs-{uuid.uuid4().hex[:16]}/{prefix}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
