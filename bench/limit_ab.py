"""vbs's in-process engine against the engine's own limit, alternating in one process.

``bench/vs_run_batch.py`` runs each leg in its own process, minutes apart; on a shared 2-core
machine the spread between such legs (10% and more) is larger than the difference being
measured. Here one loaded engine answers the same chat requests alternately through vbs's path
(``VLLMEngine.run``: vLLM's serving layer over the engine, as ``batch_output`` drives it) and
through one offline ``LLM.chat`` call, ``--rounds`` times each, so drift hits both alike.
Prints each round and ends with one JSON line (``limit_ratio`` = vbs tok/s / offline tok/s, the
median over rounds).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how rainbows form.",
    "List five uses for a paperclip.",
    "Describe the taste of an apple to someone who never had one.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default=str(ROOT / ".vbs/models/SmolLM2-135M-Instruct"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from vllm import SamplingParams

    from vbs_resources.engine import EngineRequest
    from vbs_resources.engine.hardware import detect_device, resolve_dtype
    from vbs_resources.engine.vllm_local import VLLMEngine

    dtype = resolve_dtype("auto", detect_device())
    engine = VLLMEngine(model=args.model, dtype=dtype)
    engine.start("/v1/chat/completions")
    llm = engine._llm(engine.model, "generate")
    messages = [
        [{"role": "user", "content": f"{PROMPTS[i % len(PROMPTS)]} ({i})"}]
        for i in range(args.requests)
    ]
    requests = [
        EngineRequest(
            f"r{i}",
            {
                "model": engine.served_model_name,
                "messages": m,
                "max_tokens": args.max_tokens,
                "temperature": 0,
            },
        )
        for i, m in enumerate(messages)
    ]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)

    def vbs() -> tuple[int, float]:
        started = time.perf_counter()
        results = engine.run("/v1/chat/completions", requests)
        return sum(r.completion_tokens for r in results), time.perf_counter() - started

    def offline() -> tuple[int, float]:
        started = time.perf_counter()
        outputs = llm.chat(messages, params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outputs), time.perf_counter() - started

    vbs()  # warm both paths once (first-call compilation, caches)
    offline()
    ratios = []
    for round_ in range(args.rounds):
        (vbs_tokens, vbs_s), (off_tokens, off_s) = vbs(), offline()
        ratio = (vbs_tokens / vbs_s) / (off_tokens / off_s)
        ratios.append(ratio)
        print(
            f"round {round_ + 1}: vbs {vbs_tokens / vbs_s:7.1f} tok/s ({vbs_tokens} tokens), "
            f"offline {off_tokens / off_s:7.1f} tok/s ({off_tokens} tokens), ratio {ratio:.3f}",
            flush=True,
        )
    print(
        json.dumps(
            {
                "bench": "limit_ab",
                "requests": args.requests,
                "max_tokens": args.max_tokens,
                "dtype": dtype,
                "rounds": [round(r, 3) for r in ratios],
                "limit_ratio": round(statistics.median(ratios), 3),
            }
        )
    )


if __name__ == "__main__":
    main()
