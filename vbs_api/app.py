"""The OpenAI-compatible Batch API over the Dagster pipeline.

``files`` and ``batches`` behave as OpenAI's, so the official ``openai`` client works unchanged.
Creating a batch puts its file where the inbox sensor puts a dropped one and launches its run
through Dagster at once (``vbs_api.launch``); the catalog is the shared state between this
process, the sensors and the runs; nothing here talks to vLLM.

Security defaults: with no API keys the server only answers requests whose ``Host`` is a
loopback name (a web page on this machine cannot reach it through DNS rebinding), and refuses
to start on a non-loopback address (``Settings``); request bodies are capped before they are
read; errors never carry internals.
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.middleware.trustedhost import TrustedHostMiddleware

from vbs_api import errors
from vbs_api.fine_tuning import FineTuningService
from vbs_api.launch import BatchLauncher
from vbs_api.metrics import metrics_registry
from vbs_api.middleware import BearerAuth, BodyLimit, Latency, RateLimit
from vbs_api.routers import (
    batches,
    conquests,
    datasets,
    files,
    fine_tuning,
    models,
    service,
    webhooks,
)
from vbs_api.service import BatchService
from vbs_api.state import APIState
from vbs_resources import Settings, build_resources
from vbs_resources.lifecycle import BatchLifecycle
from vbs_resources.registry import ModelRegistry
from vbs_resources.training.lifecycle import FineTuningLifecycle

LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]


def create_app(
    settings: Settings,
    resources: dict | None = None,
    launcher: BatchLauncher | None = None,
) -> FastAPI:
    """The FastAPI app of ``settings`` (resources built from them unless given). With a
    ``launcher`` a created batch's run is launched at once; without one, or while the
    webserver is unreachable, the reconciler sensor starts it within seconds."""
    resources = resources or build_resources(settings)
    catalog = resources["catalog"]
    # The configured models are registered as the platform starts (the API is part of it).
    ModelRegistry(catalog).register_configured(resources["engine"].configured_models())
    lifecycle = BatchLifecycle(catalog, resources["webhooks"], deliver_in_background=True)
    gauges = metrics_registry(catalog)
    app = FastAPI(title="vbs", version="0.1.0")
    app.state.vbs = APIState(
        settings=settings,
        bucket=resources["bucket"],
        catalog=catalog,
        engine=resources["engine"],
        service=BatchService(
            resources["bucket"],
            catalog,
            lifecycle,
            launcher,
            resources["conquest_types"],
            max_in_flight=settings.max_batches_in_flight,
        ),
        reads=catalog.read_connection(),
        extras={
            "poll_cache": batches.PollCache(),
            "gauges": gauges,
            **gauges,
            "fine_tuning": FineTuningService(
                resources["bucket"],
                catalog,
                launcher,
                FineTuningLifecycle(catalog, resources["webhooks"], deliver_in_background=True),
                settings.trainer_backend,
                settings.dataset_eval_fraction,
                settings.max_lora_rank,
            ),
        },
    )
    errors.install(app)
    app.router.routes.insert(0, batches.retrieve_route)
    routers = (files, batches, models, conquests, datasets, fine_tuning, webhooks, service)
    for router in (r.router for r in routers):
        app.include_router(router)

    # Outermost last: latency sees everything; hosts and body limits come before any work.
    keys = [k.get_secret_value().encode() for k in settings.api_keys or []]
    if settings.rate_limit is not None:
        app.add_middleware(RateLimit, rates=settings.rate_limit)
    app.add_middleware(BearerAuth, keys=keys)
    app.add_middleware(
        BodyLimit, upload_bytes=settings.max_upload_bytes, json_bytes=settings.max_json_bytes
    )
    if not keys:
        hosts = [*LOOPBACK_HOSTS, settings.api_host, *settings.api_allowed_hosts]
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts)
    app.add_middleware(Latency, histogram=gauges["latency"])
    return app
