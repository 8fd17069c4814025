"""Runs the API with uvicorn on 127.0.0.1:8000 unless configured (``python -m vbs_api.server``)."""

from __future__ import annotations

import argparse
import logging
import os

import uvicorn

from vbs_api.app import create_app
from vbs_api.launch import BatchLauncher
from vbs_resources import build_resources

log = logging.getLogger("vbs.api")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vbs-api")
    parser.add_argument("--host", default=os.environ.get("VBS_API_HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("VBS_API_PORT", "8000")))
    args = parser.parse_args(argv)
    resources = build_resources()
    keys = [k.strip() for k in os.environ.get("VBS_API_KEYS", "").split(",") if k.strip()]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not keys:
        log.warning("VBS_API_KEYS is not set: the API accepts requests without a key")
    app = create_app(
        resources["bucket"],
        resources["catalog"],
        resources["engine"],
        keys,
        max_upload_bytes=int(os.environ.get("VBS_MAX_UPLOAD_BYTES", str(200 * 1024 * 1024))),
        launcher=BatchLauncher(url) if (url := os.environ.get("VBS_DAGSTER_URL")) else None,
        webhooks=resources["webhooks"],
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        proxy_headers=False,
    )


if __name__ == "__main__":
    main()
