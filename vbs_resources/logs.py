"""Log lines as text or, with ``VBS_LOG_FORMAT=json``, one JSON object per line (structlog's
renderer, which Dagster's own ``--log-format json`` uses too), for a log pipeline to parse.

``configure_logging`` sets up a process's root logger: the API server's, and the code
location's (its code server, and every run worker, which load the definitions). Dagster's own
processes get ``--log-format json`` from ``vbs serve``, and the runs' Dagster logs go through the
instance's ``python_logs`` handler with this formatter (``dagster_instance``). A JSON line holds
``timestamp`` (ISO 8601, UTC), ``level``, ``logger`` and ``event`` (the message), ``exception``
when there is one, and for a run's records ``run_id``, ``job_name``, ``step_key`` and
``dagster_event_type``.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal

TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
LogFormat = Literal["text", "json"]


def _dagster_fields(_logger: object, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    """A run's record (Dagster's log manager) with its run, job, step and event type as fields."""
    meta = getattr(event.get("_record"), "dagster_meta", None)
    if isinstance(meta, dict):
        for key in ("run_id", "job_name", "step_key"):
            if meta.get(key):
                event[key] = meta[key]
        dagster_event = meta.get("dagster_event")
        if dagster_event is not None:
            event["dagster_event_type"] = dagster_event.event_type_value
    return event


def json_formatter() -> logging.Formatter:
    """The JSON lines' formatter (also named by the instance's ``python_logs`` for the runs)."""
    import structlog

    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _dagster_fields,
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
    )


def configure_logging(log_format: LogFormat, level: int = logging.INFO) -> None:
    """The root logger of this process writes ``log_format`` lines to stderr (its one handler)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        json_formatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def json_sensor_logs() -> None:
    """The sensors' ``context.log`` lines as JSON too. Dagster echoes them to the console with a
    colored text logger it makes itself, with no setting to change its format
    (``instigation_logger.create_console_logger``, Dagster 1.13); this process's echo gets this
    module's JSON formatter instead. The records kept for the UI's tick logs are unchanged."""
    import dagster._core.definitions.instigation_logger as instigation

    def console_logger(name: str, level: int | str) -> logging.Logger:
        echo = logging.Logger(name, level)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(json_formatter())
        echo.addHandler(handler)
        return echo

    instigation.create_console_logger = console_logger
