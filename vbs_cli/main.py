"""``vbs``: prepare models, start the platform, and use the Batch API from the shell."""

from __future__ import annotations

import argparse
import logging
import sys

from vbs_cli import client, conquests, datasets, engine, finetune, models, query
from vbs_resources import load_settings
from vbs_resources.settings import SettingsError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vbs", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    model = sub.add_parser("model", help="manage local model folders")
    model_sub = model.add_subparsers(dest="model_command", required=True)
    model_sub.add_parser("prepare", help="convert the packaged SmolLM2 into $VBS_HOME/models")
    serve = sub.add_parser("serve", help="run the Dagster webserver and daemon, and the API")
    serve.add_argument("--host", help="Dagster UI address (VBS_DAGSTER_HOST)")
    serve.add_argument("--port", type=int, help="Dagster UI port (VBS_DAGSTER_PORT)")
    serve.add_argument("--api-host", help="API address (VBS_API_HOST)")
    serve.add_argument("--api-port", type=int, help="API port (VBS_API_PORT)")
    client.add_commands(sub)
    models.add_commands(sub)
    conquests.add_commands(sub)
    datasets.add_commands(sub)
    query.add_commands(sub)
    finetune.add_commands(sub)
    engine.add_commands(sub)
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
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "model":
        from vbs_resources.model_store import prepare_default_model

        path = prepare_default_model(settings.home)
        print(f"default model ready: {path}")
        return 0
    from vbs_cli.serve import serve as serve_platform

    return serve_platform(settings)


if __name__ == "__main__":
    sys.exit(main())
