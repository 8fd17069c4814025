"""Server mode (``VBS_ENGINE=server``, the default) against what `vbs serve` starts: two real
vLLM replicas (the CPU build) behind vLLM's router, killed the way a crash kills them, and a
training run beside them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import dagster as dg
import pytest

from tests.adapters import make_adapter
from tests.conftest import (
    MODEL,
    Platform,
    chat_line,
    drop_batch,
    free_port,
    free_ports,
    healthy,
    read_jsonl,
    settings_for,
    start_platform,
    start_short_fine_tune,
    wait_for,
    wait_job_ended,
)
from vbs_resources import build_local_engine, build_resources
from vbs_resources.engine import EngineRequest, EngineUnavailable
from vbs_resources.registry import ModelRegistry

pytestmark = pytest.mark.slow

# The killed-server batch: enough chunks of 4 that the kill lands mid-batch (LoRA on vLLM's CPU
# build answers a mixed chunk in ~5 s), few enough to keep the suite short.
LINES = 32


@pytest.fixture(scope="module")
def replica_platform(tmp_path_factory, model_dir):
    """`vbs serve` in server mode (the default) with two vLLM replicas behind vLLM's router
    (VBS_ENGINE_REPLICAS=2), LoRA on."""
    from vbs_resources.engine.hardware import detect_device, gpu_count

    if detect_device() == "cuda" and gpu_count() < 2:
        pytest.skip("two CUDA replicas need two GPUs (each replica its own)")
    home = tmp_path_factory.mktemp("server-mode") / "vbs"
    engine_port = free_ports(4)  # the router, two replicas, the router's metrics
    process = start_platform(
        home,
        model_dir,
        VBS_ENGINE="server",
        VBS_ENGINE_PORT=str(engine_port),
        VBS_ENGINE_REPLICAS="2",
        # Two requests at a time per replica: the batch advances chunk by chunk, and the kills
        # land mid-batch.
        VBS_ENGINE_CONCURRENCY="2",
        VBS_ENGINE_RETRY_S="3",
        VBS_ENGINE_STEP_RETRIES="100",
        VBS_ENGINE_STEP_RETRY_WAIT_S="1",
        # Training holds one core: the suite's other worker runs beside it.
        VBS_TRAINER_THREADS="1",
    )
    platform = Platform(home, process.port, process.api_port, process.log, process)
    platform.engine_port = engine_port
    platform.replicas = [f"http://127.0.0.1:{engine_port + i}" for i in (1, 2)]
    platform.router = f"http://127.0.0.1:{engine_port}"
    try:
        wait_for(lambda: all(healthy(u) for u in [*platform.replicas, platform.router]), 420,
                 "the replicas and the router")  # fmt: skip
        yield platform
    finally:
        process.stop()


def _models(url: str) -> dict[str, dict]:
    listed = json.loads(urllib.request.urlopen(f"{url}/v1/models", timeout=10).read())
    return {m["id"]: m for m in listed["data"]}


def test_the_engine_servers_and_the_router_listen_on_loopback_only(replica_platform):
    out = subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout
    port = replica_platform.engine_port
    for p in range(port, port + 4):  # the router, two replicas, the router's metrics
        mine = [line for line in out.splitlines() if f":{p} " in line]
        assert mine and all("127.0.0.1:" in line for line in mine), p


def test_server_engine_answers_as_the_in_process_engine_and_loads_adapters_on_demand(
    replica_platform, model_dir, tmp_path
):
    """Through the router the platform started (a team's own, as VBS_ENGINE_URL names it):
    vbs finds the replicas from the router and loads the adapter on each."""
    settings = settings_for(
        tmp_path / "vbs", model_dir, VBS_ENGINE="server", VBS_ENGINE_URL=replica_platform.router
    )
    resources = build_resources(settings)
    registry = ModelRegistry(resources["catalog"])
    registry.register_configured(resources["engine"].configured_models())
    registry.add_adapter("support-v2", str(make_adapter(tmp_path / "support-v2", model_dir)))
    assert all("support-v2" not in _models(url) for url in replica_platform.replicas)

    prompts = ["What is the capital of France?", "Name a color."]
    requests = []
    for i, prompt in enumerate(prompts):
        requests.append(EngineRequest(f"base-{i}", chat_line("", prompt, temperature=0, max_tokens=16)["body"]))  # fmt: skip
        adapted = chat_line("", prompt, temperature=0, max_tokens=16)["body"]
        requests.append(EngineRequest(f"lora-{i}", {**adapted, "model": "support-v2"}))
    bad = chat_line("", "Hi", max_tokens=-3)["body"]
    requests += [
        EngineRequest("bad-max-tokens", bad),
        EngineRequest("unknown-model", {**bad, "model": "gpt-9", "max_tokens": 4}),
        EngineRequest("stream", {**bad, "stream": True, "max_tokens": 4}),
    ]
    engine = resources["engine"]
    engine.start("/v1/chat/completions", registry.snapshot())
    results = {r.custom_id: r for r in engine.run("/v1/chat/completions", requests)}

    assert list(results) == [r.custom_id for r in requests]  # one result each, in order
    for i in range(len(prompts)):
        base, lora = results[f"base-{i}"], results[f"lora-{i}"]
        assert base.status_code == lora.status_code == 200
        assert base.body["model"] == MODEL and lora.body["model"] == "support-v2"
        assert base.completion_tokens > 0 and base.prompt_tokens > 0
    assert "Paris" in results["base-0"].body["choices"][0]["message"]["content"]
    texts = [results[f"{k}-{i}"].body["choices"][0]["message"]["content"] for k in ("base", "lora") for i in range(2)]  # fmt: skip
    assert texts[:2] != texts[2:]
    # The adapter was loaded on each replica for this chunk, under its registered name.
    assert sorted(engine._replicas) == replica_platform.replicas
    for url in replica_platform.replicas:
        assert _models(url)["support-v2"]["parent"] == MODEL

    error = results["bad-max-tokens"].body["error"]
    assert results["bad-max-tokens"].status_code == 400 and error["param"] == "max_tokens"
    assert "max_tokens" in error["message"]
    assert results["unknown-model"].body["error"]["code"] == "model_not_found"
    assert results["stream"].body["error"]["param"] == "stream"

    # Same greedy answers as vLLM inside the run, from the same model and dtype.
    local = build_local_engine(settings)
    local.start("/v1/chat/completions", registry.snapshot())
    in_process = {r.custom_id: r for r in local.run("/v1/chat/completions", requests[:4])}
    for custom_id in ("base-0", "base-1"):
        assert (
            in_process[custom_id].body["choices"][0]["message"]["content"]
            == results[custom_id].body["choices"][0]["message"]["content"]
        )


def test_an_unreachable_server_makes_the_run_step_back_after_its_retry_budget(tmp_path, model_dir):
    settings = settings_for(
        tmp_path / "vbs",
        model_dir,
        VBS_ENGINE="server",
        VBS_ENGINE_URL=f"http://127.0.0.1:{free_port()}",
        VBS_ENGINE_RETRY_S="1.5",
        VBS_ENGINE_STEP_RETRIES="7",
        VBS_ENGINE_STEP_RETRY_WAIT_S="3",
    )
    engine = build_resources(settings)["engine"]
    started = time.monotonic()
    with pytest.raises(EngineUnavailable) as away:
        engine.start("/v1/chat/completions")
    assert 1.5 <= time.monotonic() - started < 15
    assert (away.value.retries, away.value.wait_s) == (7, 3)
    assert "unavailable: cannot connect" in str(away.value)


def _replica_session(process, port: int) -> int:
    """The session of the vLLM server `vbs serve` runs on ``port``."""
    [session] = {
        os.getsid(p.pid) for p in process.running("vllm.entrypoints")
        if f"--port {port} " in " ".join(p.cmdline())
    }  # fmt: skip
    return session


def _metric(url: str, name: str) -> dict[str, float]:
    """A Prometheus counter's values, by its labels' text."""
    found = {}
    for line in urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode().splitlines():
        if line.startswith(name):
            labels, _, value = line[len(name) :].rpartition(" ")
            found[labels] = float(value)
    return found


def test_two_replicas_behind_the_router_survive_one_then_both_killed_mid_batch(
    replica_platform, model_dir
):
    """A batch through the inbox under the running daemon, base and adapter lines mixed, on
    two vLLM replicas behind vLLM's router, as `vbs serve` starts and supervises them. Both
    replicas answer (their /metrics) and both load the adapter. One replica is killed mid-batch
    (kill -9 of its process group): the router sends its requests to the other and the batch
    goes on. Then the other is killed too: the run steps back (Dagster step retries) until
    `vbs serve` has both back, and resumes from its last checkpoint. Dagster, the API and the
    router keep running throughout; every line is answered once."""
    platform, process = replica_platform, replica_platform.process
    home, engine_port = platform.home, platform.engine_port
    router, replicas = platform.router, platform.replicas
    router_metrics = f"http://127.0.0.1:{engine_port + 3}"
    up = healthy

    def health() -> dict:
        return json.loads(urllib.request.urlopen(f"{platform.api_url[:-3]}/health").read())

    def completed(batch_id: str) -> int:
        return (platform.batch(batch_id) or {}).get("request_completed", 0)

    wait_for(lambda: all(up(u) for u in [*replicas, router]), 420, "replicas and router")
    assert {n: p["restarts"] for n, p in health()["processes"].items() if "engine" in n
            or n == "router"} == {"engine-1": 0, "engine-2": 0, "router": 0}  # fmt: skip
    adapter = make_adapter(home.parent / "support-v3", model_dir)
    env = {**os.environ, "VBS_HOME": str(home), "VBS_MODEL": str(model_dir)}
    added = subprocess.run(
        [sys.executable, "-m", "vbs_cli.main", "models", "add", "support-v3"]
        + ["--adapter", str(adapter)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert added.returncode == 0, added.stderr
    lines = []
    for i in range(LINES):
        line = chat_line(f"req-{i:03d}", f"Count from {i} upwards.", temperature=0, max_tokens=8)
        if i % 2:
            line["body"]["model"] = "support-v3"
        lines.append(line)
    batch_id = drop_batch(platform, "served", lines, chunk_size=4)
    wait_for(lambda: completed(batch_id) >= 8, 240, "two chunks done", interval=0.2)
    # Each replica answered some (vLLM's own counter), and each loaded the adapter.
    for url in replicas:
        assert sum(_metric(url, "vllm:request_success_total").values()) > 0, url
        assert "support-v3" in _models(url), url
    serve_pid = process.proc.pid

    # One replica killed: the other takes its requests, the batch goes on.
    os.killpg(_replica_session(process, engine_port + 1), signal.SIGKILL)
    first_kill = completed(batch_id)
    assert first_kill < LINES, "the batch finished before the first kill"
    wait_for(lambda: completed(batch_id) >= first_kill + 8, 240, "chunks on one replica",
             interval=0.2)  # fmt: skip
    second_kill = completed(batch_id)
    assert second_kill < LINES, "the batch finished before the second kill"
    assert not up(replicas[0]), "the killed replica came back before the second kill"
    # Then the other: the run steps back until the replicas are back.
    os.killpg(_replica_session(process, engine_port + 2), signal.SIGKILL)
    # The rest of the platform keeps serving while the replicas are brought back.
    assert urllib.request.urlopen(f"http://127.0.0.1:{process.port}/server_info").status == 200

    row = platform.wait_status(batch_id, {"completed", "failed"}, timeout=420)
    assert row["status"] == "completed", row
    restarted = health()["processes"]
    assert restarted["engine-1"]["restarts"] == 1 and restarted["engine-2"]["restarts"] == 1
    assert restarted["engine-1"]["last_exit_code"] is not None
    for name in ("code-server", "webserver", "daemon", "api", "router"):
        assert restarted[name]["restarts"] == 0, name
    assert process.proc.pid == serve_pid and process.proc.poll() is None
    assert "vbs: engine-1 exited with" in process.log.read_text()
    # The router sent requests to both replicas (its counter outlives their restarts).
    processed = _metric(router_metrics, "vllm_router_processed_requests_total")
    assert {k for k, v in processed.items() if v > 0} == {
        f'{{worker="{url}"}}' for url in replicas
    }, processed

    output = read_jsonl(home / "bucket" / "batches" / batch_id / "output.jsonl")
    assert sorted(x["custom_id"] for x in output) == [f"req-{i:03d}" for i in range(LINES)]
    assert all(x["response"]["status_code"] == 200 for x in output)
    for x in output:
        adapter_line = int(x["custom_id"][-3:]) % 2 == 1
        assert x["response"]["body"]["model"] == ("support-v3" if adapter_line else MODEL)

    # One run: it stepped back while both replicas were away, then resumed from its
    # checkpoint.
    run = platform.wait_run_finished(batch_id, timeout=120)
    assert len(platform.runs(batch_id)) == 1
    assert run.status == dg.DagsterRunStatus.SUCCESS
    assert "vbs/engine_unavailable" in run.tags
    retries = platform.instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_UP_FOR_RETRY)
    assert retries
    materialization = platform.instance.get_latest_materialization_event(
        dg.AssetKey("batch_output")
    )
    metadata = materialization.asset_materialization.metadata
    assert metadata["resumed_requests"].value >= second_kill
    assert metadata["engine"].value == "vllm/server"
    assert metadata["replicas"].value == "2"


def test_a_fine_tuning_job_and_a_batch_together_both_finish_and_the_next_batch_is_warm(
    replica_platform,
):
    """The warm default beside training: a fine-tuning job and a batch submitted together
    both finish (they take the `gpu` pool in turn; on CPU the servers stay up, idle), the
    adapter is deployed onto the running replicas, and the batch after them names it and runs
    on the warm servers again: no engine load in its run, no server restarted."""
    from openai import OpenAI

    platform = replica_platform
    client = OpenAI(base_url=platform.api_url, api_key="unused", max_retries=0)
    restarts_before = _restarts(platform)
    job = start_short_fine_tune(client, "warm")
    beside = drop_batch(
        platform, "beside-training", [chat_line(f"b{i}", "Say hi.", max_tokens=4) for i in range(4)]
    )
    done = wait_job_ended(client, job.id)
    assert done.status == "succeeded", done
    assert platform.wait_status(beside, {"completed", "failed"}, timeout=300)["status"] == (
        "completed"
    )

    deployed = client.post(f"/fine_tuning/jobs/{job.id}/deploy", body={}, cast_to=object)
    model = deployed["model"]
    wait_for(lambda: model in [m.id for m in client.models.list().data], 300, "the deployment")
    lines = [chat_line(f"a{i}", "Write one word.", max_tokens=4) for i in range(4)]
    for line in lines[::2]:
        line["body"]["model"] = model
    after = drop_batch(platform, "after-training", lines)
    assert platform.wait_status(after, {"completed", "failed"}, timeout=300)["status"] == (
        "completed"
    )
    output = read_jsonl(platform.home / "bucket" / "batches" / after / "output.jsonl")
    assert sorted((x["custom_id"], x["response"]["body"]["model"]) for x in output) == [
        ("a0", model), ("a1", MODEL), ("a2", model), ("a3", MODEL)
    ]  # fmt: skip
    # Warm: the run found the servers up (a run that loads vLLM spends seconds here). Its
    # materialization is recorded a moment after the batch reads completed.
    assert platform.wait_run_finished(after, timeout=120).status == dg.DagsterRunStatus.SUCCESS
    event = platform.instance.get_latest_materialization_event(dg.AssetKey("batch_output"))
    assert event.asset_materialization.partition == after
    metadata = event.asset_materialization.metadata
    assert metadata["engine"].value == "vllm/server"
    assert metadata["engine_start_seconds"].value < 2, metadata["engine_start_seconds"]
    assert _restarts(platform) == restarts_before


def _restarts(platform) -> dict[str, int]:
    health = json.loads(urllib.request.urlopen(f"{platform.api_url[:-3]}/health").read())
    return {name: p["restarts"] for name, p in health["processes"].items()}
