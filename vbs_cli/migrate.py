"""``vbs migrate``: bring the state up to this code, then exit (a deployment's start-up step,
run before the long-lived processes; `vbs serve` does the same as it starts).

It writes the Dagster instance's ``dagster.yaml`` from the settings (or checks the team's own,
``VBS_DAGSTER_YAML``), upgrades the catalog to the newest migration, and upgrades Dagster's
storage (``DagsterInstance.upgrade``, what ``dagster instance migrate`` does). Each step is
idempotent, and concurrent runs are serialized (the catalog's migration lock).
"""

from __future__ import annotations

import argparse

from vbs_resources.settings import Settings, redact_url


def add_commands(sub: argparse._SubParsersAction) -> None:
    sub.add_parser(
        "migrate", help="write dagster.yaml, upgrade the catalog and Dagster's storage, exit"
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    from vbs_resources import migrations
    from vbs_resources.catalog import Catalog
    from vbs_resources.dagster_instance import open_instance, write_instance

    home = write_instance(settings)
    print(f"vbs migrate: {home / 'dagster.yaml'} written", flush=True)
    catalog = Catalog(url=settings.resolved_catalog_url)
    with catalog.engine.connect() as conn:
        revision = migrations.current(conn)
    catalog.engine.dispose()
    shown = redact_url(settings.resolved_catalog_url)
    print(f"vbs migrate: catalog {shown} at revision {revision}", flush=True)
    with open_instance(settings) as instance:
        instance.upgrade()
        kind = type(instance.run_storage).__name__.removesuffix("RunStorage")
    print(f"vbs migrate: Dagster storage ({kind}) upgraded", flush=True)
    return 0
