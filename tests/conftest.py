"""Shared fixtures: a fresh VBS_HOME per test, the real prepared model, helpers to drop files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from vbs_resources import build_resources, vbs_home
from vbs_resources.model_store import prepare_default_model

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The real SmolLM2 folder (`make test` prepares it in ./.vbs before pytest starts)."""
    return prepare_default_model(vbs_home())


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "vbs"


@pytest.fixture
def resources(home: Path, model_dir: Path) -> dict[str, Any]:
    return build_resources({"VBS_HOME": str(home), "VBS_MODEL": str(model_dir)})


@pytest.fixture
def instance():
    with dg.instance_for_test() as inst:
        yield inst


def chat_line(custom_id: str, content: str, **params: Any) -> dict[str, Any]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], **params}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def submit(resources: dict[str, Any], instance, lines_or_bytes, name: str = "jobs.jsonl") -> str:
    """Drop a file into the inbox and let the real sensor take it; returns the batch id."""
    from vbs_sensors.inbox import inbox_sensor

    data = lines_or_bytes if isinstance(lines_or_bytes, bytes) else jsonl(lines_or_bytes)
    with resources["bucket"].open(f"inbox/{name}", "wb") as fh:
        fh.write(data)
    cursor = None
    for _ in range(2):
        context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)
        result = inbox_sensor(context)
        cursor = context.cursor
    (request,) = result.run_requests
    instance.add_dynamic_partitions("batches", [request.partition_key])
    return request.partition_key


def materialize_batch(
    resources: dict[str, Any], instance, batch_id: str, chunk_size: int = 256, **kwargs
):
    from vbs_assets.inference import batch_output, error_rate, output_complete
    from vbs_assets.ingest import batch_input

    return dg.materialize(
        [batch_input, batch_output, output_complete, error_rate],
        partition_key=batch_id,
        instance=instance,
        resources=resources,
        run_config=dg.RunConfig(ops={"batch_output": {"config": {"chunk_size": chunk_size}}}),
        **kwargs,
    )


def metadata_of(result, asset: str) -> dict[str, Any]:
    (event,) = [
        e
        for e in result.get_asset_materialization_events()
        if e.asset_key.to_user_string() == asset
    ]
    return {k: v.value for k, v in event.materialization.metadata.items()}
