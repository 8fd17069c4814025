"""Server mode against answers a real vLLM server gives only when something is wrong (5xx while
it restarts, 401 for a wrong key, a proxy's HTML page, another model): a scripted HTTP double
plays them, since the real server cannot be made to on demand. The double says what it is in its
name; everything else here is the real ``VLLMServerEngine``."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import dagster as dg
import pytest

from tests.conftest import MODEL, chat_line, settings_for
from vbs_resources import build_resources
from vbs_resources.engine import EngineFailure, EngineRequest

KEY = "engine-secret-key-123"


class FaultyServerDouble:
    """A stand-in for a vLLM server that answers from a script: ``models`` for /v1/models, and
    a list of (status, body) for successive chat requests (the last one repeats)."""

    def __init__(self, models: list[str] | None = None, chat: list[tuple[int, Any]] | None = None):
        self.models = models if models is not None else [MODEL]
        self.chat = chat or [(200, {"usage": {"prompt_tokens": 3, "completion_tokens": 2}})]
        self.seen: list[str | None] = []  # the Authorization header of each GET
        self.loads = 0  # adapter loads asked for (refused: LoRA off)
        double = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self, status: int, body: Any) -> None:
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                double.seen.append(self.headers.get("authorization"))
                if self.headers.get("authorization") != f"Bearer {KEY}":
                    return self._answer(401, {"error": {"message": "Unauthorized"}})
                data = [{"id": m, "root": m, "parent": None} for m in double.models]
                self._answer(200, {"object": "list", "data": data})

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["content-length"]))
                if self.path == "/v1/load_lora_adapter":
                    double.loads += 1
                    message = "Worker failed with error 'LoRA is not enabled.'"
                    return self._answer(500, {"error": {"message": message, "code": 500}})
                status, body = double.chat[0] if len(double.chat) == 1 else double.chat.pop(0)
                self._answer(status, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def double():
    made: list[FaultyServerDouble] = []

    def make(**kwargs: Any) -> FaultyServerDouble:
        made.append(FaultyServerDouble(**kwargs))
        return made[-1]

    yield make
    for server in made:
        server.close()


def engine_for(tmp_path, url: str, key: str = KEY, **env: str):
    settings = settings_for(
        tmp_path / "vbs",
        VBS_ENGINE="server",
        VBS_ENGINE_URL=url,
        VBS_ENGINE_API_KEY=key,
        VBS_ENGINE_RETRY_S="5",
        **env,
    )
    return build_resources(settings)["engine"]


def chat(n: int = 1) -> list[EngineRequest]:
    return [EngineRequest(f"r{i}", chat_line("", "Hi", max_tokens=2)["body"]) for i in range(n)]


def test_a_wrong_key_stops_the_batch_without_showing_the_key(tmp_path, double):
    server = double()
    engine = engine_for(tmp_path, server.url, key="wrong-key-456")
    with pytest.raises(EngineFailure) as failed:
        engine.start("/v1/chat/completions")
    assert "VBS_ENGINE_API_KEY" in str(failed.value)
    assert "wrong-key-456" not in str(failed.value) and "wrong-key-456" not in str(
        engine.describe()
    )


def test_the_key_reaches_the_server_and_is_an_env_var_in_dagster(tmp_path, double):
    server = double()
    engine_for(tmp_path, server.url).start("/v1/chat/completions")
    assert server.seen[-1] == f"Bearer {KEY}"
    settings = settings_for(
        tmp_path / "vbs", VBS_ENGINE="server", VBS_ENGINE_URL=server.url, VBS_ENGINE_API_KEY=KEY
    )
    in_dagster = build_resources(settings, for_dagster=True)["engine"]
    assert in_dagster.api_key == dg.EnvVar("VBS_ENGINE_API_KEY")


def test_a_server_serving_another_model_is_named_at_start(tmp_path, double):
    server = double(models=["Llama-3-8B"])
    with pytest.raises(EngineFailure) as failed:
        engine_for(tmp_path, server.url).start("/v1/chat/completions")
    assert "Llama-3-8B" in str(failed.value) and MODEL in str(failed.value)


def test_5xx_while_the_server_restarts_is_retried_and_the_request_answered_once(tmp_path, double):
    ok = {"model": MODEL, "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
    server = double(chat=[(503, "restarting"), (502, "<html>bad gateway</html>"), (200, ok)])
    engine = engine_for(tmp_path, server.url)
    engine.start("/v1/chat/completions")
    [result] = engine.run("/v1/chat/completions", chat())
    assert result.status_code == 200 and result.completion_tokens == 2


def test_a_body_that_is_not_json_is_that_requests_error_line(tmp_path, double):
    server = double(chat=[(200, "<html>a proxy's page</html>")])
    engine = engine_for(tmp_path, server.url)
    engine.start("/v1/chat/completions")
    results = engine.run("/v1/chat/completions", chat(3))
    assert [r.status_code for r in results] == [502, 502, 502]
    assert results[0].body["error"]["code"] == "engine_bad_response"


def test_a_4xx_without_openais_shape_keeps_its_status_and_text(tmp_path, double):
    server = double(chat=[(422, "unprocessable \ud800".encode("utf-8", "replace").decode())])
    engine = engine_for(tmp_path, server.url)
    engine.start("/v1/chat/completions")
    [result] = engine.run("/v1/chat/completions", chat())
    assert result.status_code == 422 and "unprocessable" in result.body["error"]["message"]


def test_an_adapter_the_server_refuses_is_asked_for_once_per_chunk(tmp_path, double, model_dir):
    from tests.adapters import make_adapter
    from vbs_resources.registry import ModelRegistry

    server = double()
    settings = settings_for(
        tmp_path / "vbs", model_dir, VBS_ENGINE="server", VBS_ENGINE_URL=server.url,
        VBS_ENGINE_API_KEY=KEY, VBS_ENGINE_RETRY_S="5",
    )  # fmt: skip
    resources = build_resources(settings)
    registry = ModelRegistry(resources["catalog"])
    registry.register_configured(resources["engine"].configured_models())
    registry.add_adapter("support-v3", str(make_adapter(tmp_path / "support-v3", model_dir)))
    engine = resources["engine"]
    engine.start("/v1/chat/completions", registry.snapshot())
    requests = chat(4)
    for request in requests[1:]:
        request.body = {**request.body, "model": "support-v3"}
    results = engine.run("/v1/chat/completions", requests)
    assert [r.status_code for r in results] == [200, 503, 503, 503]
    assert server.loads == 1  # a 500 from the load is final, and remembered for the chunk
    message = results[1].body["error"]["message"]
    assert "LoRA is not enabled" in message and "VBS_ENGINE_LORA=on" in message


def test_the_engine_server_command_carries_the_base_models_parsers_never_the_key(home, model_dir):
    from vbs_cli.engine import server_command

    settings = settings_for(
        home,
        model_dir,
        VBS_TOOL_CALL_PARSER="hermes",
        VBS_REASONING_PARSER="olmo3",
        VBS_ENGINE_API_KEY="s3cret-key",
    )
    command, env = server_command(settings)
    joined = " ".join(command)
    assert "--tool-call-parser hermes --enable-auto-tool-choice" in joined
    assert "--reasoning-parser olmo3" in joined
    assert "s3cret-key" not in joined and env["VLLM_API_KEY"] == "s3cret-key"
    # LoRA on by default, so that an adapter deployed later is served without a restart.
    assert "--enable-lora" in command
    # With auto it follows the registry: no adapter is registered, so it stays off.
    auto, _ = server_command(settings_for(home, model_dir, VBS_ENGINE_LORA="auto"))
    assert "--enable-lora" not in auto
