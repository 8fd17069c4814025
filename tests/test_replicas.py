"""Engine replicas behind vLLM's router (``VBS_ENGINE_REPLICAS``), without GPUs: the command
lines `vbs serve` builds, and vbs's server engine through the real ``vllm-router`` in front of
``VLLMServerDouble`` replicas (tests/vllm_double.py; the real vLLM replicas are in
test_server_mode.py). Each double replica is a process of its own, so one can be killed."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_ports, healthy, settings_for, wait_for
from vbs_resources.engine import EngineRequest, VLLMEngine, VLLMServerEngine
from vbs_resources.registry import ServedModel, ServedModels
from vbs_resources.settings import SettingsError

ROOT = Path(__file__).resolve().parent.parent
BASE = "vbs-base"


def test_replicas_are_n_servers_on_the_next_ports_with_the_router_in_front(tmp_path):
    from vbs_cli.engine import engine_commands, replica_devices, router_metrics_port
    from vbs_cli.serve import serve_commands

    settings = settings_for(
        tmp_path / "vbs", VBS_ENGINE="server", VBS_ENGINE_PORT="9100", VBS_ENGINE_REPLICAS="3"
    )
    named = engine_commands(settings)
    assert [name for name, _, _ in named] == ["engine-1", "engine-2", "engine-3", "router"]
    for i, (_, command, env) in enumerate(named[:3]):
        assert "vllm.entrypoints.launchers.api_server.entry" in command
        assert command[command.index("--port") + 1] == str(9101 + i)
        assert command[command.index("--host") + 1] == "127.0.0.1"
        # CPU: the replicas share the cores (or a user's OMP_NUM_THREADS), each its part,
        # following the load within it.
        total = int(os.environ.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0)))
        assert int(env["OMP_NUM_THREADS"]) == max(1, total // 3)
        assert env["VBS_ENGINE_FOLLOW_LOAD"] == "true"
    _, router, _ = named[3]
    assert Path(router[0]).name == "vllm-router" and Path(router[0]).exists()
    workers = router[router.index("--worker-urls") + 1 : router.index("--policy")]
    assert workers == [f"http://127.0.0.1:{9101 + i}" for i in range(3)]
    assert router[router.index("--port") + 1] == "9100"
    assert router[router.index("--policy") + 1] == "round_robin"
    assert router[router.index("--prometheus-port") + 1] == str(router_metrics_port(settings))
    assert router_metrics_port(settings) == 9104
    # Every flag is one the installed router takes.
    help_text = subprocess.run([router[0], "--help"], capture_output=True, text=True).stdout
    assert all(flag in help_text for flag in router if flag.startswith("--"))
    # `vbs serve` starts them after the rest; the router waits for every replica.
    assert [name for name, _, _ in serve_commands(settings)][-4:] == [n for n, _, _ in named]
    # One replica: the one server on VBS_ENGINE_PORT, no router.
    one = settings_for(tmp_path / "vbs", VBS_ENGINE="server", VBS_ENGINE_PORT="9100")
    [(name, command, _)] = engine_commands(one)
    assert name == "engine" and command[command.index("--port") + 1] == "9100"
    # GPUs: each replica its own, tensor parallel ones together.
    assert [replica_devices(None, 1, i) for i in range(3)] == ["0", "1", "2"]
    assert [replica_devices("4,5,6,7", 2, i) for i in range(2)] == ["4,5", "6,7"]
    with pytest.raises(SettingsError, match="replica 3 needs GPUs 2 to 2"):
        replica_devices("0,1", 1, 2)
    with pytest.raises(SettingsError, match="no room for VBS_ENGINE_REPLICAS=4"):
        settings_for(tmp_path / "vbs", VBS_ENGINE_PORT="65533", VBS_ENGINE_REPLICAS="4")


class Fleet:
    """Double replicas, a process each, and the real router in front (round_robin)."""

    def __init__(self, n: int, tpot_s: float = 0.001) -> None:
        first = free_ports(n + 2)
        self.router_port, self.metrics_port = first, first + 1
        self.ports = [first + 2 + i for i in range(n)]
        self.urls = [f"http://127.0.0.1:{p}" for p in self.ports]
        self.tpot_s = tpot_s
        self.replicas = {port: self._start(port) for port in self.ports}
        router = [str(Path(sys.executable).parent / "vllm-router"), "--host", "127.0.0.1"]
        router += ["--port", str(self.router_port), "--worker-urls", *self.urls]
        router += ["--policy", "round_robin", "--health-check-interval-secs", "1"]
        router += ["--prometheus-port", str(self.metrics_port), "--log-level", "warning"]
        self.router = subprocess.Popen(router, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.router_port}"
        wait_for(lambda: healthy(self.url), 30, "the router")

    def _start(self, port: int) -> subprocess.Popen:
        command = [sys.executable, "-m", "tests.vllm_double", "--model", BASE]
        command += ["--ttft-s", "0.01", "--tpot-s", str(self.tpot_s), "--ports", str(port)]
        proc = subprocess.Popen(command, cwd=ROOT, start_new_session=True)
        wait_for(lambda: healthy(f"http://127.0.0.1:{port}"), 30, f"the double on {port}")
        return proc

    def kill(self, port: int) -> None:
        self.replicas[port].kill()
        self.replicas[port].wait()

    def restart(self, port: int) -> None:
        self.replicas[port] = self._start(port)

    def models(self, url: str) -> set[str]:
        import json

        return {
            m["id"] for m in json.loads(urllib.request.urlopen(f"{url}/v1/models").read())["data"]
        }

    def stop(self) -> None:
        for proc in [*self.replicas.values(), self.router]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def fleet():
    fleets: list[Fleet] = []

    def make(n: int, **kwargs) -> Fleet:
        fleets.append(Fleet(n, **kwargs))
        return fleets[-1]

    yield make
    for f in fleets:
        f.stop()


def engine_for(url: str, replica_urls: list[str] | None = None, **kwargs) -> VLLMServerEngine:
    local = VLLMEngine(model="/unused", served_model_name=BASE)
    return VLLMServerEngine(url=url, local=local, replica_urls=replica_urls or [], **kwargs)


def served(adapter_path: str) -> ServedModels:
    return ServedModels(
        {
            BASE: ServedModel(BASE, "base", "/unused"),
            "support-v3": ServedModel("support-v3", "adapter", adapter_path, base=BASE),
        }
    )


def requests(n: int, prefix: str = "r", max_tokens: int = 4) -> list[EngineRequest]:
    lines = []
    for i in range(n):
        body = {"model": "support-v3" if i % 2 else BASE, "max_tokens": max_tokens}
        body["messages"] = [{"role": "user", "content": f"line {i}"}]
        lines.append(EngineRequest(f"{prefix}{i:03d}", body))
    return lines


def test_the_router_spreads_a_batch_and_adapters_load_on_every_replica_again_after_a_restart(
    fleet, tmp_path
):
    fleet = fleet(2)
    engine = engine_for(fleet.url, concurrency=8)  # the replicas found from the router
    engine.start("/v1/chat/completions", served(str(tmp_path)))
    assert sorted(engine._replicas) == fleet.urls and engine.in_flight == 16
    assert engine.describe()["replicas"] == "2"
    chunks = [requests(20, "a"), requests(20, "b")]
    results = [r for chunk in engine.run_chunks("/v1/chat/completions", chunks) for r in chunk]
    assert sorted(r.custom_id for r in results) == sorted(
        r.custom_id for chunk in chunks for r in chunk
    )
    assert all(r.status_code == 200 for r in results)
    for url in fleet.urls:  # loaded on each replica directly, not through the router
        assert "support-v3" in fleet.models(url)
        assert _requests_answered(url) > 0

    # A replica restarts and forgets the adapter: its 404 reloads it, the lines are answered.
    fleet.kill(fleet.ports[0])
    fleet.restart(fleet.ports[0])
    assert "support-v3" not in fleet.models(fleet.urls[0])
    wait_for(lambda: _router_healthy(fleet, 2), 30, "both replicas healthy again")
    adapter_lines = requests(20, "c")
    for line in adapter_lines:  # every one names it: round robin cannot keep it off a replica
        line.body["model"] = "support-v3"
    again = engine.run("/v1/chat/completions", adapter_lines)
    assert [r.status_code for r in again] == [200] * 20
    assert "support-v3" in fleet.models(fleet.urls[0])


def _requests_answered(url: str) -> float:
    text = urllib.request.urlopen(f"{url}/metrics").read().decode()
    return float(text.strip().splitlines()[-1].split()[-1])


def _router_healthy(fleet: Fleet, n: int) -> bool:
    import json

    workers = json.loads(urllib.request.urlopen(f"{fleet.url}/workers").read())["workers"]
    return sum(1 for w in workers if w["is_healthy"]) == n


def test_a_replica_killed_mid_chunk_loses_nothing_and_answers_each_line_once(fleet, tmp_path):
    """Requests in flight on the killed replica are retried on the other (by the router, or
    by vbs's own retries): every line once, every one a 200, the chunks in order."""
    fleet = fleet(2, tpot_s=0.05)  # about 2 s a request: the kill lands mid-request
    engine = engine_for(fleet.url, concurrency=16, retry_s=30)
    engine.start("/v1/chat/completions", served(str(tmp_path)))
    chunks = [requests(24, f"k{c}-", max_tokens=40) for c in range(3)]
    killer = threading.Timer(1.0, fleet.kill, args=[fleet.ports[0]])
    killer.start()
    started = time.monotonic()
    answered = list(engine.run_chunks("/v1/chat/completions", chunks))
    killer.join()
    assert time.monotonic() - started > 1.0, "the batch finished before the kill"
    assert [[r.custom_id for r in chunk] for chunk in answered] == [
        [r.custom_id for r in chunk] for chunk in chunks
    ]
    assert all(r.status_code == 200 for chunk in answered for r in chunk)
    assert _requests_answered(fleet.urls[1]) >= 24


def test_training_puts_the_servers_vbs_started_to_sleep_on_cuda_only(fleet, monkeypatch, tmp_path):
    import vbs_resources.engine.vllm_local as vllm_local

    fleet = fleet(2)

    def sleeping(url: str) -> dict:
        import json

        return json.loads(urllib.request.urlopen(f"{url}/is_sleeping").read())

    # CPU: nothing changes.
    with engine_for(fleet.url, fleet.urls).yield_accelerator():
        assert [sleeping(u)["is_sleeping"] for u in fleet.urls] == [False, False]
    monkeypatch.setattr(vllm_local, "detect_device", lambda *_: "cuda")
    # A team's own servers (VBS_ENGINE_URL, no replica_urls): left alone.
    with engine_for(fleet.url).yield_accelerator():
        assert [sleeping(u)["sleeps"] for u in fleet.urls] == [0, 0]
    # The servers vbs started, on CUDA: asleep while training, awake after, even if it failed.
    with pytest.raises(RuntimeError), engine_for(fleet.url, fleet.urls).yield_accelerator():
        assert [sleeping(u)["is_sleeping"] for u in fleet.urls] == [True, True]
        raise RuntimeError("training failed")
    assert [sleeping(u) for u in fleet.urls] == [{"is_sleeping": False, "sleeps": 1}] * 2
    # One that cannot sleep (unreachable here) does not stop training.
    gone = f"http://127.0.0.1:{free_ports(1)}"
    with engine_for(fleet.url, [gone, fleet.urls[0]], timeout_s=5).yield_accelerator():
        assert sleeping(fleet.urls[0])["is_sleeping"] is True
    assert sleeping(fleet.urls[0]) == {"is_sleeping": False, "sleeps": 2}
