"""Server mode (``VBS_ENGINE=server``) against ``vbs engine serve``: vLLM's real OpenAI server
on CPU, killed the way a crash kills it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
import pytest

from tests.adapters import make_adapter
from tests.conftest import (
    MODEL,
    Platform,
    chat_line,
    drop_batch,
    free_port,
    read_jsonl,
    settings_for,
    start_platform,
    wait_for,
)
from vbs_resources import build_local_engine, build_resources
from vbs_resources.engine import EngineRequest, EngineUnavailable
from vbs_resources.registry import ModelRegistry

pytestmark = pytest.mark.slow

# The killed-server batch: enough chunks of 4 that the kill lands mid-batch (LoRA on vLLM's CPU
# build answers a mixed chunk in ~5 s), few enough to keep the suite short.
LINES = 32


class EngineServer:
    """`vbs engine serve` on a free loopback port, in a process group of its own."""

    def __init__(self, home: Path, model_dir: Path) -> None:
        self.home, self.model_dir, self.port = home, model_dir, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home.parent / "engine-serve.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 240) -> float:
        started = time.monotonic()
        env = dict(
            os.environ,
            VBS_HOME=str(self.home),
            VBS_MODEL=str(self.model_dir),
            VBS_DTYPE="float32",
            VBS_ENGINE_PORT=str(self.port),
            VBS_CPU_KVCACHE_GIB="2",
            # LoRA on from the start: the adapters are registered after the server is up.
            VBS_ENGINE_LORA="on",
        )
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "vbs_cli.main", "engine", "serve"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def up() -> bool:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                return urllib.request.urlopen(f"{self.url}/health", timeout=2).status == 200
            except OSError:
                return False

        wait_for(up, timeout, "the engine server")
        return time.monotonic() - started

    def kill(self) -> None:
        """SIGKILL to the server and its engine core at once (a crash, an OOM kill)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def models(self) -> dict[str, dict]:
        listed = json.loads(urllib.request.urlopen(f"{self.url}/v1/models", timeout=10).read())
        return {m["id"]: m for m in listed["data"]}


@pytest.fixture(scope="module")
def engine_server(tmp_path_factory, model_dir):
    server = EngineServer(tmp_path_factory.mktemp("engine") / "vbs", model_dir)
    server.start()
    try:
        yield server
    finally:
        server.kill()


def test_engine_serve_listens_on_loopback_only(engine_server):
    out = subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout
    mine = [line for line in out.splitlines() if f":{engine_server.port} " in line]
    assert mine and all("127.0.0.1:" in line for line in mine)


def test_server_engine_answers_as_the_in_process_engine_and_loads_adapters_on_demand(
    engine_server, model_dir, tmp_path
):
    settings = settings_for(
        tmp_path / "vbs", model_dir, VBS_ENGINE="server", VBS_ENGINE_URL=engine_server.url
    )
    resources = build_resources(settings)
    registry = ModelRegistry(resources["catalog"])
    registry.register_configured(resources["engine"].configured_models())
    registry.add_adapter("support-v3", str(make_adapter(tmp_path / "support-v3", model_dir)))
    assert "support-v3" not in engine_server.models()

    prompts = ["What is the capital of France?", "Name a color."]
    requests = []
    for i, prompt in enumerate(prompts):
        requests.append(EngineRequest(f"base-{i}", chat_line("", prompt, temperature=0, max_tokens=16)["body"]))  # fmt: skip
        adapted = chat_line("", prompt, temperature=0, max_tokens=16)["body"]
        requests.append(EngineRequest(f"lora-{i}", {**adapted, "model": "support-v3"}))
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
        assert base.body["model"] == MODEL and lora.body["model"] == "support-v3"
        assert base.completion_tokens > 0 and base.prompt_tokens > 0
    assert "Paris" in results["base-0"].body["choices"][0]["message"]["content"]
    texts = [results[f"{k}-{i}"].body["choices"][0]["message"]["content"] for k in ("base", "lora") for i in range(2)]  # fmt: skip
    assert texts[:2] != texts[2:]
    # The adapter was loaded on the server for this chunk, under its registered name.
    assert engine_server.models()["support-v3"]["parent"] == MODEL

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
    assert "unavailable" in str(away.value) and "ConnectError" in str(away.value)


def _engine_sessions(process) -> set[int]:
    """The sessions of the engine servers `vbs serve` runs (vLLM's server entry point)."""
    return {
        os.getsid(p.pid) for p in process.processes()
        if "vllm.entrypoints" in " ".join(p.cmdline())
    }  # fmt: skip


def test_server_mode_end_to_end_with_the_server_killed_mid_batch(
    engine_server, tmp_path_factory, model_dir
):
    """A batch through the inbox under the running daemon in server mode, base and adapter
    lines mixed, on the engine server `vbs serve` starts and supervises. The server is killed
    mid-batch (kill -9 of its whole process group): `vbs serve` restarts it alone, Dagster and
    the API keep running, `/health` shows the restart. The run steps back (Dagster step
    retries), resumes from its last checkpoint, and every line is answered once."""
    engine_server.kill()  # this module's own server: the platform starts one of its own
    home = tmp_path_factory.mktemp("server-mode") / "vbs"
    engine_port = free_port()
    process = start_platform(
        home,
        model_dir,
        VBS_ENGINE="server",
        VBS_ENGINE_PORT=str(engine_port),
        VBS_ENGINE_LORA="on",
        VBS_ENGINE_RETRY_S="3",
        VBS_ENGINE_STEP_RETRIES="60",
        VBS_ENGINE_STEP_RETRY_WAIT_S="1",
    )
    platform = Platform(home, process.port, process.api_port, process.log, process)
    engine_url = f"http://127.0.0.1:{engine_port}"

    def engine_up() -> bool:
        try:
            return urllib.request.urlopen(f"{engine_url}/health", timeout=2).status == 200
        except OSError:
            return False

    def health() -> dict:
        return json.loads(urllib.request.urlopen(f"{platform.api_url[:-3]}/health").read())

    try:
        wait_for(engine_up, 300, "the engine server vbs serve started")
        assert health()["processes"]["engine"]["restarts"] == 0
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
            line = chat_line(
                f"req-{i:03d}", f"Count from {i} upwards.", temperature=0, max_tokens=8
            )
            if i % 2:
                line["body"]["model"] = "support-v3"
            lines.append(line)
        batch_id = drop_batch(platform, "served", lines, chunk_size=4)
        wait_for(
            lambda: (platform.batch(batch_id) or {}).get("request_completed", 0) >= 8,
            180,
            "two chunks done",
            interval=0.2,
        )
        serve_pid = process.proc.pid
        [session] = _engine_sessions(process)
        os.killpg(session, signal.SIGKILL)
        killed_at = platform.batch(batch_id)["request_completed"]
        assert killed_at < LINES, "the batch finished before the server was killed"
        # The rest of the platform keeps serving while the engine is brought back.
        assert urllib.request.urlopen(f"http://127.0.0.1:{process.port}/server_info").status == 200
        restarted = wait_for(
            lambda: (h := health())["processes"]["engine"]["restarts"] == 1 and h, 60,
            "the engine's restart",
        )  # fmt: skip
        assert restarted["processes"]["engine"]["last_exit_code"] is not None
        for name in ("code-server", "webserver", "daemon", "api"):
            assert restarted["processes"][name]["restarts"] == 0, name
        assert process.proc.pid == serve_pid and process.proc.poll() is None
        assert "vbs: engine exited with" in process.log.read_text()

        row = platform.wait_status(batch_id, {"completed", "failed"}, timeout=300)
        assert row["status"] == "completed", row
        output = read_jsonl(home / "bucket" / "batches" / batch_id / "output.jsonl")
        assert sorted(x["custom_id"] for x in output) == [f"req-{i:03d}" for i in range(LINES)]
        assert all(x["response"]["status_code"] == 200 for x in output)
        for x in output:
            adapter_line = int(x["custom_id"][-3:]) % 2 == 1
            assert x["response"]["body"]["model"] == ("support-v3" if adapter_line else MODEL)

        # One run: it stepped back while the server was away, then resumed from its checkpoint.
        run = platform.wait_run_finished(batch_id, timeout=120)
        assert len(platform.runs(batch_id)) == 1
        assert run.status == dg.DagsterRunStatus.SUCCESS
        assert "vbs/engine_unavailable" in run.tags
        retries = platform.instance.all_logs(
            run.run_id, of_type=dg.DagsterEventType.STEP_UP_FOR_RETRY
        )
        assert retries
        materialization = platform.instance.get_latest_materialization_event(
            dg.AssetKey("batch_output")
        )
        metadata = materialization.asset_materialization.metadata
        assert metadata["resumed_requests"].value >= 8
        assert metadata["engine"].value == "vllm/server"
    finally:
        process.stop()
