"""vbs's ``batch_output`` against vLLM's own ``run_batch`` (the peer) and against vLLM's
offline engine (the limit), same model, machine and run.

One 256-request chat file (max_tokens 64, temperature 0) goes through
``python -m vllm.entrypoints.openai.run_batch``, through vbs (inbox sensor -> batch_input ->
batch_output, in process), and as one ``LLM.chat`` call on the same messages. All three get the
same dtype and the same CPU environment (threads, KV-cache size), so the ratios measure the
paths, not settings. Prints wall time and output tokens/s of each, then ``ratio`` (vbs /
run_batch generation throughput, engine start excluded), ``e2e_ratio`` (run_batch wall / vbs
wall, file to finished results, engine start included) and ``limit_ratio`` (vbs / offline
``LLM.chat`` generation throughput). Ends with one JSON line.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how rainbows form.",
    "List five uses for a paperclip.",
    "Describe the taste of an apple to someone who never had one.",
]


def request_file(path: Path, n: int, model: str, max_tokens: int) -> None:
    with open(path, "w") as fh:
        for i in range(n):
            body = {
                "model": model,
                "messages": [{"role": "user", "content": f"{PROMPTS[i % len(PROMPTS)]} ({i})"}],
                "max_tokens": max_tokens,
                "temperature": 0,
            }
            line = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions"}
            fh.write(json.dumps({**line, "body": body}) + "\n")


def output_tokens(path: Path) -> int:
    total = 0
    for raw in path.read_text().splitlines():
        body = (json.loads(raw).get("response") or {}).get("body") or {}
        total += (body.get("usage") or {}).get("completion_tokens", 0)
    return total


def run_peer(args, env, inputs: Path, out: Path, dtype: str) -> dict:
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.run_batch",
        "-i", str(inputs), "-o", str(out),
        "--model", args.model, "--served-model-name", args.served_name,
        "--dtype", dtype, "--enforce-eager", "--max-model-len", "2048",
    ]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        sys.exit(f"run_batch failed:\n{proc.stderr[-3000:]}")
    # run_batch does not report engine time apart; its log marks when requests start.
    return {"wall_s": round(wall, 2), "output_tokens": output_tokens(out)}


def run_vbs(args, env, inputs: Path, home: Path, dtype: str) -> dict:
    code = f"""
import json, time
import dagster as dg
from vbs_assets.inference import batch_output, output_complete
from vbs_assets.ingest import batch_input
from vbs_resources import build_resources, load_settings
from vbs_sensors.inbox import inbox_sensor
started = time.perf_counter()
res = build_resources(load_settings({{"VBS_HOME": {str(home)!r}, "VBS_MODEL": {args.model!r},
    "VBS_DTYPE": {dtype!r}}}))
res["bucket"].write_bytes("inbox/in.jsonl", open({str(inputs)!r}, "rb").read())
with dg.instance_for_test() as inst:
    cursor = None
    for _ in range(2):
        ctx = dg.build_sensor_context(instance=inst, cursor=cursor, resources=res)
        tick, cursor = inbox_sensor(ctx), ctx.cursor
    batch_id = tick.run_requests[0].partition_key
    inst.add_dynamic_partitions("batches", [batch_id])
    result = dg.materialize([batch_input, batch_output, output_complete], partition_key=batch_id,
        instance=inst, resources=res)
    (event,) = [e for e in result.get_asset_materialization_events()
                if e.asset_key.to_user_string() == "batch_output"]
    meta = {{k: v.value for k, v in event.materialization.metadata.items()}}
print(json.dumps({{"wall_s": round(time.perf_counter() - started, 2),
    "engine_s": meta["engine_seconds"], "engine_start_s": meta["engine_start_seconds"],
    "output_tokens": meta["completion_tokens"]}}))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=args.root
    )
    if proc.returncode != 0:
        sys.exit(f"vbs failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_limit(args, env, inputs: Path, dtype: str) -> dict:
    """The engine's own limit: every request's messages in one offline ``LLM.chat`` call."""
    code = f"""
import json, time
from vllm import LLM, SamplingParams
lines = [json.loads(x) for x in open({str(inputs)!r})]
llm = LLM(model={args.model!r}, dtype={dtype!r}, enforce_eager=True, max_model_len=2048, seed=0)
params = SamplingParams(max_tokens=lines[0]["body"]["max_tokens"], temperature=0)
messages = [line["body"]["messages"] for line in lines]
started = time.perf_counter()
outputs = llm.chat(messages, params, use_tqdm=False)
seconds = time.perf_counter() - started
tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
print(json.dumps({{"engine_s": round(seconds, 2), "output_tokens": tokens}}))
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=args.root
    )
    if proc.returncode != 0:
        sys.exit(f"offline LLM.chat failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    root = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--model", default=str(root / ".vbs/models/SmolLM2-135M-Instruct"))
    parser.add_argument("--served-name", default="SmolLM2-135M-Instruct")
    args = parser.parse_args()
    args.root = str(root)

    from vbs_resources.engine.hardware import detect_device, resolve_dtype

    dtype = resolve_dtype("auto", detect_device())
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="4")
    env.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inputs = tmp / "in.jsonl"
        request_file(inputs, args.requests, args.served_name, args.max_tokens)
        vbs = run_vbs(args, env, inputs, tmp / "vbs", dtype)
        peer = run_peer(args, env, inputs, tmp / "peer.jsonl", dtype)
        limit = run_limit(args, env, inputs, dtype)
        # run_batch reports no engine-start time; a one-token, one-request run measures it.
        request_file(tmp / "one.jsonl", 1, args.served_name, 1)
        peer_start = run_peer(args, env, tmp / "one.jsonl", tmp / "one-out.jsonl", dtype)

    # Generation throughput: vbs's time inside the engine's chunks (engine start excluded, as
    # batch_output measures it apart); run_batch's wall less its start-up.
    vbs_tps = vbs["output_tokens"] / vbs["engine_s"]
    peer_generation_s = max(peer["wall_s"] - peer_start["wall_s"], 1e-9)
    peer_tps = peer["output_tokens"] / peer_generation_s
    limit_tps = limit["output_tokens"] / limit["engine_s"]
    result = {
        "bench": "vs_run_batch",
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "dtype": dtype,
        "vbs_wall_s": vbs["wall_s"],
        "vbs_engine_start_s": vbs["engine_start_s"],
        "vbs_engine_s": vbs["engine_s"],
        "vbs_output_tokens": vbs["output_tokens"],
        "vbs_tok_s": round(vbs_tps, 1),
        "run_batch_wall_s": peer["wall_s"],
        "run_batch_start_s": peer_start["wall_s"],
        "run_batch_output_tokens": peer["output_tokens"],
        "run_batch_tok_s": round(peer_tps, 1),
        "offline_engine_s": limit["engine_s"],
        "offline_output_tokens": limit["output_tokens"],
        "offline_tok_s": round(limit_tps, 1),
        "ratio": round(vbs_tps / peer_tps, 3),
        "e2e_ratio": round(peer["wall_s"] / vbs["wall_s"], 3),
        "limit_ratio": round(vbs_tps / limit_tps, 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
