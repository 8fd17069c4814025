"""``vbs``: prepare models, start the platform, and use the Batch API from the shell."""

from __future__ import annotations

import argparse
import logging
import sys

from vbs_cli import client, conquests, datasets, doctor, engine, finetune, migrate, models, query
from vbs_cli.serve import PROCESSES as SERVE_PROCESSES
from vbs_resources import load_settings
from vbs_resources.settings import Settings, SettingsError
from vbs_resources.version import version


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vbs", description=__doc__)
    parser.add_argument("--version", action="version", version=f"vbs {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    model = sub.add_parser("model", help="manage local model folders")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    model_sub.add_parser("prepare", help="convert the packaged SmolLM2 into $VBS_HOME/models")
    serve = sub.add_parser("serve", help="run the Dagster webserver and daemon, and the API")
    serve.add_argument("--host", help="Dagster UI address (VBS_DAGSTER_HOST)")
    serve.add_argument("--port", type=int, help="Dagster UI port (VBS_DAGSTER_PORT)")
    serve.add_argument("--api-host", help="API address (VBS_API_HOST)")
    serve.add_argument("--api-port", type=int, help="API port (VBS_API_PORT)")
    serve.add_argument(
        "--only",
        choices=SERVE_PROCESSES,
        help="run this one process in the foreground, unsupervised (a container's command: "
        "the container runtime restarts it; `vbs migrate` runs first)",
    )
    client.add_commands(sub)
    models.add_commands(sub)
    conquests.add_commands(sub)
    datasets.add_commands(sub)
    query.add_commands(sub)
    finetune.add_commands(sub)
    engine.add_commands(sub)
    doctor.add_commands(sub)
    migrate.add_commands(sub)
    args = parser.parse_args(argv)
    try:
        overrides = {}
        if args.command == "serve":
            pairs = (
                ("dagster_host", args.host),
                ("dagster_port", args.port),
                ("api_host", args.api_host),
                ("api_port", args.api_port),
            )
            overrides = {k: v for k, v in pairs if v is not None}
        settings = load_settings(**overrides)
    except SettingsError as exc:
        print(f"vbs: {exc}", file=sys.stderr)
        return 2
    try:
        return _dispatch(args, settings)
    except SettingsError as exc:  # found while starting: an instance file, a URL
        print(f"vbs: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - one clear line instead of a traceback
        import openai

        if isinstance(exc, openai.APIConnectionError):
            url = getattr(args, "api_url", None) or settings.api_url
            print(f"vbs: the vbs API at {url} cannot be reached "
                  "(is `vbs serve` running? --api-url / VBS_API_URL)", file=sys.stderr)  # fmt: skip
            return 3
        if isinstance(exc, openai.APIStatusError):
            print(f"vbs: HTTP {exc.status_code}: {_message(exc)}", file=sys.stderr)
            return 1
        raise


def _message(exc: Exception) -> str:
    """The API's own error message (OpenAI's error shape), or the client's."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        found = body.get("error", body)
        if isinstance(found, dict) and found.get("message"):
            param = f" ({found['param']})" if found.get("param") else ""
            return f"{found['message']}{param}"
    return str(exc)


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    if args.command in client.COMMANDS:
        return client.run(args, settings)
    if args.command == "models":
        return models.run(args, settings)
    if args.command == "conquests":
        return conquests.run(args, settings)
    if args.command == "datasets":
        return datasets.run(args, settings)
    if args.command in ("finetune", "lineage"):
        return finetune.run(args, settings)
    if args.command == "query":
        return query.run(args, settings)
    if args.command == "engine":
        return engine.run(args, settings)
    if args.command == "doctor":
        return doctor.run(args, settings)
    if args.command == "migrate":
        return migrate.run(args, settings)
    if settings.log_format == "json":
        from vbs_resources.logs import configure_logging

        configure_logging("json")
    else:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "model":
        from vbs_resources.model_store import prepare_default_model

        path = prepare_default_model(settings.home)
        print(f"default model ready: {path}")
        return 0
    if args.only is not None:
        from vbs_cli.serve import serve_one

        return serve_one(settings, args.only)
    from vbs_cli.serve import serve as serve_platform

    return serve_platform(settings)


if __name__ == "__main__":
    sys.exit(main())
