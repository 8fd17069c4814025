"""``VLLMServerDouble``: a test double of vLLM's OpenAI-compatible server, for what cannot run
on these machines: many replicas of a GPU server. It is not vLLM; it answers as one would, on
time, by a latency model, and counts what it answered.

The latency model is continuous batching at its simplest: at most ``max_seqs`` sequences at
once (more wait for a slot), each taking ``ttft_s`` to its first token and ``tpot_s`` per token
after, for ``max_tokens`` tokens (``default_tokens`` when the request names none). The
defaults are a GPU's published figures (bench/replicas.py says which).

It serves ``/health``, ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``,
``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``, ``/metrics`` (vLLM's
``vllm:request_success_total`` counter) and sleep mode's ``/sleep``, ``/wake_up`` and
``/is_sleeping``. An adapter request before its load is vLLM's 404; any while asleep, a 503.

Run: ``python -m tests.vllm_double --ports 9001 9002 [--ttft-s ..]``: one process, one server
per port, each with its own state (a replica).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class LatencyModel:
    ttft_s: float = 0.05
    tpot_s: float = 0.02
    max_seqs: int = 256
    default_tokens: int = 16

    def seconds(self, tokens: int) -> float:
        return self.ttft_s + self.tpot_s * max(tokens - 1, 0)


@dataclass
class Replica:
    """One server's state: its adapters and counts."""

    name: str
    model: str
    latency: LatencyModel
    adapters: dict[str, str] = field(default_factory=dict)
    answered: int = 0
    asleep: bool = False
    sleeps: int = 0
    # False: a server started without --enable-lora, which refuses every adapter (500).
    lora: bool = True
    slots: asyncio.Semaphore | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 2**20)
        app.add_routes(
            [
                web.get("/health", self.health),
                web.get("/v1/models", self.models),
                web.post("/v1/chat/completions", self.generate),
                web.post("/v1/completions", self.generate),
                web.post("/v1/load_lora_adapter", self.load),
                web.post("/v1/unload_lora_adapter", self.unload),
                web.get("/metrics", self.metrics),
                web.post("/sleep", self.sleep),
                web.post("/wake_up", self.wake_up),
                web.get("/is_sleeping", self.is_sleeping),
            ]
        )
        return app

    async def health(self, _: web.Request) -> web.Response:
        return web.Response()

    async def models(self, _: web.Request) -> web.Response:
        data = [{"id": self.model, "object": "model", "root": self.model, "parent": None}]
        data += [
            {"id": name, "object": "model", "root": path, "parent": self.model}
            for name, path in self.adapters.items()
        ]
        return web.json_response({"object": "list", "data": data})

    async def generate(self, request: web.Request) -> web.Response:
        body = await request.json()
        model = body.get("model")
        if model != self.model and model not in self.adapters:
            return _error(404, f"The model `{model}` does not exist.", "model")
        if self.asleep:
            return _error(503, "The engine is sleeping.", None)
        tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 0)
        tokens = tokens or self.latency.default_tokens
        if self.slots is None:
            self.slots = asyncio.Semaphore(self.latency.max_seqs)
        async with self.slots:
            await asyncio.sleep(self.latency.seconds(tokens))
        self.answered += 1
        text = f"{self.name}"
        usage = {"prompt_tokens": 8, "completion_tokens": tokens, "total_tokens": 8 + tokens}
        if request.path.endswith("chat/completions"):
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "length",
            }
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": "length"}
            kind = "text_completion"
        return web.json_response(
            {
                "id": f"cmpl-{self.name}-{self.answered}",
                "object": kind,
                "created": int(time.time()),
                "model": model,
                "choices": [choice],
                "usage": usage,
            }
        )

    async def load(self, request: web.Request) -> web.Response:
        body = await request.json()
        name = body.get("lora_name")
        if not self.lora:
            return _error(500, "LoRA is not enabled on this server.", None)
        if name in self.adapters:
            return _error(400, f"The lora adapter '{name}' has already been loaded.", None)
        self.adapters[name] = body.get("lora_path")
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.adapters.pop(body.get("lora_name"), None) is None:
            return _error(404, "No adapter found.", None)
        return web.Response(text="Success")

    async def sleep(self, _: web.Request) -> web.Response:
        self.asleep, self.sleeps = True, self.sleeps + 1
        return web.json_response({"status": "sleeping", "level": 1})

    async def wake_up(self, _: web.Request) -> web.Response:
        self.asleep = False
        return web.json_response({"status": "awake", "tags": None})

    async def is_sleeping(self, _: web.Request) -> web.Response:
        return web.json_response({"is_sleeping": self.asleep, "sleeps": self.sleeps})

    async def metrics(self, _: web.Request) -> web.Response:
        return web.Response(
            text="# TYPE vllm:request_success_total counter\n"
            f'vllm:request_success_total{{model_name="{self.model}"}} {self.answered}\n'
        )


def _error(status: int, message: str, param: str | None) -> web.Response:
    kind = "NotFoundError" if status == 404 else "BadRequestError"
    error = {"message": message, "type": kind, "param": param, "code": status}
    return web.json_response({"error": error}, status=status)


async def serve(
    ports: list[int], model: str, latency: LatencyModel, host: str, lora: bool = True
) -> None:
    runners = []
    for i, port in enumerate(ports):
        runner = web.AppRunner(Replica(f"replica-{i + 1}", model, latency, lora=lora).app())
        await runner.setup()
        await web.TCPSite(runner, host, port, backlog=4096).start()
        runners.append(runner)
    print(f"vllm double: {len(ports)} replica(s) on {host}:{ports}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ports", type=int, nargs="+", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--model", default="vbs-base")
    parser.add_argument("--ttft-s", type=float, default=LatencyModel.ttft_s)
    parser.add_argument("--tpot-s", type=float, default=LatencyModel.tpot_s)
    parser.add_argument("--max-seqs", type=int, default=LatencyModel.max_seqs)
    parser.add_argument("--no-lora", action="store_true", help="a server without LoRA")
    args = parser.parse_args()
    latency = LatencyModel(args.ttft_s, args.tpot_s, args.max_seqs)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args.ports, args.model, latency, args.host, lora=not args.no_lora))


if __name__ == "__main__":
    main()
