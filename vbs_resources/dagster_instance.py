"""The Dagster instance vbs runs on: its ``dagster.yaml``, written from the settings.

``vbs serve`` writes ``$VBS_HOME/dagster/dagster.yaml`` from ``Settings`` on every start: the
storage (SQLite under that folder, or PostgreSQL through ``dagster-postgres`` when
``VBS_DAGSTER_STORAGE_URL`` is set), the run queue, run monitoring, run retries and the ``gpu``
pool. The project's own ``dagster.yaml`` is what it writes with the default settings (a test
holds the two equal).

A team with an instance file of its own names it with ``VBS_DAGSTER_YAML``: it is used as it is
and never rewritten, but it is checked first. A file that drops what crash recovery depends on
(the queued run coordinator, run monitoring, run retries, a limit on the pools) is refused with
the setting and the block named, since the platform would then lose runs silently.

The storage URL stays in the environment: the file says ``postgres_url: {env:
VBS_DAGSTER_STORAGE_URL}``, so the password is never written to disk by vbs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import yaml

from vbs_resources.settings import Settings, SettingsError

STORAGE_VARIABLE = "VBS_DAGSTER_STORAGE_URL"
LOCATION_NAME = "vbs"
WORKSPACE_HEADER = """\
# Written by `vbs serve` from VBS_CODE_SERVER_HOST and VBS_CODE_SERVER_PORT on every start.
"""
HEADER = """\
# Written by `vbs serve` from the settings on every start: edits here are lost. To run on an
# instance file of your own, name it with VBS_DAGSTER_YAML (docs/production.md).
"""


def instance_config(settings: Settings) -> dict[str, Any]:
    """The instance's configuration for these settings, as ``dagster.yaml`` holds it."""
    config: dict[str, Any] = {}
    if settings.dagster_storage_url is not None:
        config["storage"] = {"postgres": {"postgres_url": {"env": STORAGE_VARIABLE}}}
    config |= {
        "run_coordinator": {
            "module": "dagster._core.run_coordinator",
            "class": "QueuedRunCoordinator",
            "config": {
                # A queued run starts within a second of its request.
                "dequeue_interval_seconds": 1,
                # A run dequeued while the code server restarts goes back to the queue
                # instead of failing at once.
                "max_user_code_failure_retries": 5,
                "user_code_failure_retry_delay": 10,
            },
        },
        "concurrency": {
            "runs": {"max_concurrent_runs": settings.max_concurrent_runs},
            # `gpu`, held by batch_output, training and deployment: a run is not dequeued
            # until the pool has a free slot.
            "pools": {"default_limit": settings.gpu_slots, "granularity": "run"},
        },
        # A run whose process dies is noticed...
        "run_monitoring": {
            "enabled": True,
            "poll_interval_seconds": 5,
            "start_timeout_seconds": 180,
        },
        # ...and retried from the failed step, which resumes from its checkpoint.
        "run_retries": {
            "enabled": True,
            "max_retries": settings.run_retries,
            "retry_on_asset_or_op_failure": False,
        },
        "sensors": {"use_threads": True, "num_workers": 2},
        "telemetry": {"enabled": False},
    }
    if settings.log_format == "json":
        # The runs' Dagster logs as JSON lines on stderr; the default colored console logger,
        # whose level this sets, says nothing.
        config["python_logs"] = {
            "python_log_level": "CRITICAL",
            "dagster_handler_config": {
                "handlers": {
                    "json": {
                        "class": "logging.StreamHandler",
                        "stream": "ext://sys.stderr",
                        "formatter": "json",
                        "level": "DEBUG",
                    }
                },
                "formatters": {"json": {"()": "vbs_resources.logs.json_formatter"}},
            },
        }
    return config


def _at(config: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(config, dict):
            return None
        config = config.get(key)
    return config


# What crash recovery and the gpu pool depend on: (where, test, why).
REQUIRED: list[tuple[tuple[str, ...], Any, str]] = [
    (
        ("run_coordinator", "class"),
        lambda v: v == "QueuedRunCoordinator",
        "must be QueuedRunCoordinator: runs wait in Dagster's queue for the gpu pool",
    ),
    (
        ("run_monitoring", "enabled"),
        lambda v: v is True,
        "must be true: a run whose process died is noticed only by run monitoring",
    ),
    (
        ("run_retries", "enabled"),
        lambda v: v is True,
        "must be true: a run that died resumes from its checkpoint only in a retry",
    ),
    (
        ("run_retries", "max_retries"),
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "must be 1 or more",
    ),
    (
        ("concurrency", "pools", "default_limit"),
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "must be set: without it every run holds the gpu at once",
    ),
]


def check_instance_file(path: Path, settings: Settings) -> dict[str, Any]:
    """The parsed instance file a user named, or ``SettingsError`` naming ``VBS_DAGSTER_YAML``
    and what is wrong: unreadable, not Dagster's instance schema, or without a block that
    crash recovery depends on."""
    where = f"VBS_DAGSTER_YAML={path}"
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{where}: cannot be read ({exc.__class__.__name__})") from None
    except yaml.YAMLError as exc:
        raise SettingsError(f"{where}: not YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise SettingsError(f"{where}: must be a mapping of Dagster instance settings")
    for keys, test, why in REQUIRED:
        if not test(_at(config, keys)):
            raise SettingsError(f"{where}: {'.'.join(keys)} {why} (crash recovery depends on it)")
    storage = config.get("storage")
    if settings.dagster_storage_url is not None and "postgres" not in (storage or {}):
        raise SettingsError(
            f"{where}: has no postgres storage, so {STORAGE_VARIABLE} would be ignored; put it "
            f"in the file (postgres_url: {{env: {STORAGE_VARIABLE}}}) or unset it"
        )
    _validate_schema(path, where)
    return config


def _validate_schema(path: Path, where: str) -> None:
    from dagster._core.errors import DagsterInvalidConfigError
    from dagster._core.instance.config import dagster_instance_config

    try:
        dagster_instance_config(str(path.parent), path.name)
    except DagsterInvalidConfigError as exc:
        problems = "; ".join(e.message for e in exc.errors[:3])
        raise SettingsError(f"{where}: not a Dagster instance file: {problems}") from None


def write_instance(settings: Settings) -> Path:
    """``$VBS_HOME/dagster`` with its ``dagster.yaml``: the checked file the user named, or one
    written from the settings. Returns the folder (``DAGSTER_HOME``)."""
    home = settings.dagster_home
    target = home / "dagster.yaml"
    if settings.dagster_yaml is not None:
        source = settings.dagster_yaml.expanduser().absolute()
        check_instance_file(source, settings)
        home.mkdir(parents=True, exist_ok=True)
        if source != target.absolute():
            shutil.copyfile(source, target)
        return home
    home.mkdir(parents=True, exist_ok=True)
    text = HEADER + yaml.safe_dump(instance_config(settings), sort_keys=False)
    if not target.exists() or target.read_text(encoding="utf-8") != text:
        partial = target.with_name(".dagster.yaml.part")
        partial.write_text(text, encoding="utf-8")
        partial.replace(target)
    return home


def code_server_address(settings: Settings) -> tuple[str, int]:
    """Where the webserver and the daemon reach the code location's gRPC server."""
    host = settings.code_server_host
    reach = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return reach, settings.code_server_port


def write_workspace(settings: Settings) -> Path:
    """``$VBS_HOME/dagster/workspace.yaml``: the code location ``vbs`` served by its own gRPC
    server (`dagster code-server start`), for the webserver and the daemon. The name stays
    ``vbs``: the ids of its sensors and schedules, and so their cursors, depend on it."""
    host, port = code_server_address(settings)
    entry = {"grpc_server": {"host": host, "port": port, "location_name": LOCATION_NAME}}
    path = settings.dagster_home / "workspace.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = WORKSPACE_HEADER + yaml.safe_dump({"load_from": [entry]}, sort_keys=False)
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        partial = path.with_name(".workspace.yaml.part")
        partial.write_text(text, encoding="utf-8")
        partial.replace(path)
    return path


@contextlib.contextmanager
def open_instance(settings: Settings) -> Iterator[Any]:
    """The Dagster instance of ``settings`` (its written ``dagster.yaml``), opened in this
    process: the file names ``VBS_DAGSTER_STORAGE_URL``, which is set here, as normalized, while
    Dagster reads its config."""
    import dagster as dg

    config = settings.dagster_home / "dagster.yaml"
    if not config.exists():
        raise FileNotFoundError(f"{config} is missing")
    env = {}
    if settings.dagster_storage_url is not None:
        env[STORAGE_VARIABLE] = settings.dagster_storage_url.get_secret_value()
    with mock.patch.dict(os.environ, env):
        instance = dg.DagsterInstance.from_config(str(settings.dagster_home))
    with instance:
        yield instance
