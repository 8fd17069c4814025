"""Does ordering a chunk's requests by shared prefix speed up vbs's in-process engine?

Batches often repeat a few long system prompts. vLLM's prefix cache shares their KV blocks
whatever the order, but requests scheduled in the same step as the first one to compute a prefix
cannot hit it yet. This bench sends the same requests (``--prefixes`` system prompts of about
``--prefix-words`` words, each with its own short question) to one loaded engine through vbs's
path (``VLLMEngine.run``), in two orders, alternating ``--rounds`` times, with the prefix cache
emptied before every leg:

- ``interleaved``: the prompts take turns, the worst case for same-step sharing;
- ``grouped``: every request of one prompt together, as sorting a chunk by prefix would give.

Prints each round and ends with one JSON line (``grouped_vs_interleaved``, the median ratio of
generation throughput, prompt plus output tokens per second).
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOPICS = ["tides", "volcanoes", "bees", "glaciers", "comets", "forests", "deserts", "rivers"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--prefixes", type=int, default=8)
    parser.add_argument("--prefix-words", type=int, default=400)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default=str(ROOT / ".vbs/models/SmolLM2-135M-Instruct"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from vbs_resources.engine import EngineRequest
    from vbs_resources.engine.hardware import detect_device, resolve_dtype
    from vbs_resources.engine.vllm_local import VLLMEngine

    dtype = resolve_dtype("auto", detect_device())
    engine = VLLMEngine(model=args.model, dtype=dtype)
    engine.start("/v1/chat/completions")
    llm = engine._llm(engine.model, "generate")
    systems = [
        " ".join(f"{TOPICS[p % len(TOPICS)]}-{p} fact {w}." for w in range(args.prefix_words // 3))
        for p in range(args.prefixes)
    ]

    def request(i: int) -> EngineRequest:
        system = systems[i % args.prefixes]
        body = {
            "model": engine.served_model_name,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": f"Question {i}: summarise the facts."},
            ],
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
        return EngineRequest(f"r{i}", body)

    interleaved = [request(i) for i in range(args.requests)]
    grouped = sorted(interleaved, key=lambda r: int(r.custom_id[1:]) % args.prefixes)

    def leg(requests: list[EngineRequest]) -> float:
        llm.reset_prefix_cache()
        started = time.perf_counter()
        results = engine.run("/v1/chat/completions", requests)
        seconds = time.perf_counter() - started
        tokens = sum(r.body["usage"]["total_tokens"] for r in results)
        return tokens / seconds

    leg(interleaved)  # warm up
    ratios = []
    for round_ in range(args.rounds):
        first, second = leg(interleaved), leg(grouped)
        ratios.append(second / first)
        print(
            f"round {round_ + 1}: interleaved {first:8.1f} tok/s, grouped {second:8.1f} tok/s, "
            f"ratio {second / first:.3f}",
            flush=True,
        )
    print(
        json.dumps(
            {
                "bench": "prefix_order",
                "requests": args.requests,
                "prefixes": args.prefixes,
                "prefix_words": args.prefix_words,
                "max_tokens": args.max_tokens,
                "dtype": dtype,
                "rounds": [round(r, 3) for r in ratios],
                "grouped_vs_interleaved": round(statistics.median(ratios), 3),
            }
        )
    )


if __name__ == "__main__":
    main()
