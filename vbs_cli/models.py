"""``vbs models list|add|retire``: the model registry, from the shell (on the catalog itself,
so it works whether or not the platform is running)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from vbs_resources import Settings, build_resources
from vbs_resources.registry import ModelRegistry, RegistryError


def add_commands(sub: Any) -> None:
    models = sub.add_parser("models", help="the model registry: list, add an adapter, retire")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    listing = models_sub.add_parser("list", help="the registered models (JSON lines)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line (default)")
    listing.add_argument("--all", action="store_true", help="retired ones too")
    add = models_sub.add_parser("add", help="register a LoRA adapter (PEFT folder or bucket URL)")
    add.add_argument("name", help="the name requests will use as their model")
    add.add_argument("--adapter", required=True, help="the adapter's folder")
    add.add_argument("--base", help="its base model's name (the only base model if omitted)")
    add.add_argument(
        "--tool-call-parser", help="vLLM's tool-call parser for its output (its base's if omitted)"
    )
    add.add_argument(
        "--reasoning-parser", help="vLLM's reasoning parser for its output (its base's if omitted)"
    )
    retire = models_sub.add_parser("retire", help="stop serving a model (its files are kept)")
    retire.add_argument("name")


def _line(row: dict[str, Any]) -> str:
    shown = {k: row[k] for k in ("name", "kind", "base", "status", "rank", "path")}
    shown.update(row.get("options") or {})
    return json.dumps(shown, ensure_ascii=False)


def run(args: argparse.Namespace, settings: Settings) -> int:
    resources = build_resources(settings)
    registry = ModelRegistry(resources["catalog"], settings.max_lora_rank)
    registry.register_configured(resources["engine"].configured_models())
    try:
        if args.models_command == "list":
            for row in registry.list(include_retired=args.all):
                print(_line(row))
        elif args.models_command == "add":
            added = registry.add_adapter(
                args.name,
                args.adapter,
                args.base,
                tool_call_parser=args.tool_call_parser,
                reasoning_parser=args.reasoning_parser,
            )
            print(_line(added))
        else:
            print(_line(registry.retire(args.name)))
    except RegistryError as exc:
        where = f" ({exc.field})" if exc.field else ""
        print(f"vbs models: {exc.message}{where}", file=sys.stderr)
        return 2
    return 0
