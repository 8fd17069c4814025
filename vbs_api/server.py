"""Runs the API with uvicorn on 127.0.0.1:8000 unless configured (``python -m vbs_api.server``)."""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn

from vbs_api.app import create_app
from vbs_api.launch import BatchLauncher
from vbs_resources import load_settings
from vbs_resources.error_tracking import start_error_tracking
from vbs_resources.logs import configure_logging
from vbs_resources.settings import SettingsError

log = logging.getLogger("vbs.api")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vbs-api")
    parser.add_argument("--host", help="address to listen on (VBS_API_HOST)")
    parser.add_argument("--port", type=int, help="port (VBS_API_PORT)")
    args = parser.parse_args(argv)
    try:
        overrides = {k: v for k, v in (("api_host", args.host), ("api_port", args.port)) if v}
        settings = load_settings(**overrides)
    except SettingsError as exc:
        print(f"vbs-api: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format)
    start_error_tracking(settings, "api")
    keys = len(settings.api_keys or [])
    log.info(f"the API on http://{settings.api_host}:{settings.api_port}/v1, {keys} API key(s)")
    if not settings.api_keys:
        log.warning("VBS_API_KEYS is not set: the API accepts requests without a key (loopback)")
    dagster = settings.dagster_url.get_secret_value() if settings.dagster_url else None
    app = create_app(settings, launcher=BatchLauncher(dagster) if dagster else None)
    uvicorn.run(
        app,
        host=settings.api_host,
        port=settings.api_port,
        log_level="warning",
        access_log=False,
        log_config=None,  # uvicorn's records go through the root logger's format
        proxy_headers=False,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
