"""Requests through vLLM's own serving layer in process: tool calls parsed into ``tool_calls``,
reasoning into ``message.reasoning``, each model with the parsers the registry gives it, and
parser names vLLM does not know refused at the door (real SmolLM2 on vLLM's CPU build)."""

from __future__ import annotations

import json

import pytest

from tests.adapters import make_adapter
from tests.conftest import MODEL, settings_for
from vbs_resources import build_resources
from vbs_resources.engine import EngineRequest
from vbs_resources.registry import ModelRegistry, RegistryError, ServedModel

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        # Strict: vLLM's grammar holds the arguments to the schema, not just to JSON.
        "strict": True,
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
# A reply fixed by a grammar, so that the parsers' work is checked and not the small model's.
THOUGHT = "<think>France's capital city is Paris.</think>Paris"


def chat(custom_id: str, model: str = MODEL, **params) -> EngineRequest:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "temperature": 0,
        "max_tokens": 96,
        **params,
    }
    return EngineRequest(custom_id, body)


def engine_for(home, model_dir, tmp_path=None, **env):
    """The in-process engine of a deployment with ``env``, serving what its registry holds
    (with an adapter ``thinker`` using the olmo3 reasoning parser when ``tmp_path`` is given)."""
    resources = build_resources(settings_for(home, model_dir, **env))
    registry = ModelRegistry(resources["catalog"])
    registry.register_configured(resources["engine"].configured_models())
    if tmp_path is not None:
        adapter = make_adapter(tmp_path / "thinker", model_dir, std=0.01)
        registry.add_adapter("thinker", str(adapter), reasoning_parser="olmo3")
    engine = resources["engine"]
    engine.start("/v1/chat/completions", registry.snapshot())
    return engine


def test_tool_calls_come_back_as_tool_calls_with_a_tool_call_parser(home, model_dir):
    engine = engine_for(home, model_dir, VBS_TOOL_CALL_PARSER="hermes")
    named = {"type": "function", "function": {"name": "get_weather"}}
    results = {
        r.custom_id: r
        for r in engine.run(
            "/v1/chat/completions",
            [
                chat("required", tools=[WEATHER], tool_choice="required"),
                chat("named", tools=[WEATHER], tool_choice=named),
                chat("none", tools=[WEATHER], tool_choice="none", max_tokens=8),
            ],
        )
    }
    for key in ("required", "named"):
        assert results[key].ok, results[key].body
        message = results[key].body["choices"][0]["message"]
        (call,) = message["tool_calls"]
        assert call["type"] == "function" and call["function"]["name"] == "get_weather"
        arguments = json.loads(call["function"]["arguments"])
        assert isinstance(arguments["city"], str)
    none = results["none"].body["choices"][0]["message"]
    assert none["content"] and not none.get("tool_calls")


def test_each_model_is_parsed_with_its_own_reasoning_parser(home, model_dir, tmp_path):
    engine = engine_for(home, model_dir, tmp_path)
    forced = {"structured_outputs": {"regex": THOUGHT.replace(".", r"\.")}, "max_tokens": 40}
    results = {
        r.custom_id: r
        for r in engine.run(
            "/v1/chat/completions",
            [chat("adapter", model="thinker", **forced), chat("base", **forced)],
        )
    }
    adapter = results["adapter"].body["choices"][0]["message"]
    assert results["adapter"].body["model"] == "thinker"
    assert adapter["reasoning"] == "France's capital city is Paris."
    assert adapter["content"] == "Paris"
    # The base model has no reasoning parser: its text is left as it came.
    base = results["base"].body["choices"][0]["message"]
    assert base["content"] == THOUGHT and base["reasoning"] is None


def test_parser_names_vllm_does_not_know_are_refused_naming_the_field(home, model_dir, tmp_path):
    resources = build_resources(settings_for(home, model_dir))
    registry = ModelRegistry(resources["catalog"])
    adapter = make_adapter(tmp_path / "a", model_dir)
    with pytest.raises(RegistryError, match="hermes") as refused:
        registry.add_adapter("a", str(adapter), tool_call_parser="hermez")
    assert refused.value.field == "tool_call_parser"
    with pytest.raises(RegistryError) as refused:
        registry.register_configured(
            [ServedModel(MODEL, "base", str(model_dir), reasoning_parser="no-such")]
        )
    assert refused.value.field == "reasoning_parser"
    assert registry.list() == []
    registry.register_configured(resources["engine"].configured_models())
    added = registry.add_adapter("a", str(adapter), tool_call_parser="hermes")
    assert added["options"] == {"tool_call_parser": "hermes"}


def test_score_and_rerank_run_through_vllms_scoring_handler(home, model_dir):
    """vLLM's /score and /rerank, answered by the embedding model (cosine similarity)."""
    resources = build_resources(settings_for(home, model_dir))
    engine = resources["engine"]
    embedder = engine.embedding_served_name
    engine.start("/v1/rerank")
    documents = ["Bananas are yellow.", "Paris is the capital of France."]
    rerank, missing, unknown = engine.run(
        "/v1/rerank",
        [
            EngineRequest(
                "r", {"model": embedder, "query": "France's capital", "documents": documents}
            ),
            EngineRequest("missing", {"model": embedder, "query": "France's capital"}),
            EngineRequest("unknown", {"model": MODEL, "query": "q", "documents": documents}),
        ],
    )
    assert rerank.ok and rerank.body["model"] == embedder
    ranked = rerank.body["results"]
    assert [r["index"] for r in ranked] == [1, 0]
    assert ranked[0]["relevance_score"] > ranked[1]["relevance_score"]
    assert rerank.prompt_tokens == rerank.body["usage"]["prompt_tokens"] > 0
    assert (missing.status_code, missing.body["error"]["param"]) == (400, "documents")
    assert (unknown.status_code, unknown.body["error"]["code"]) == (404, "model_not_found")
    (score,) = engine.run(
        "/v1/score",
        [
            EngineRequest(
                "s", {"model": embedder, "queries": "France's capital", "documents": documents}
            )
        ],
    )
    assert score.ok, score.body
    scores = [d["score"] for d in sorted(score.body["data"], key=lambda d: d["index"])]
    assert len(scores) == 2 and scores[1] > scores[0]


def test_lines_sharing_vllms_request_id_are_each_answered_their_own(home, model_dir):
    """vLLM names a request after a body's ``request_id``; two lines giving the same one must
    not take each other's answer (or leave the chunk waiting for ever)."""
    engine = build_resources(settings_for(home, model_dir))["engine"]
    engine.start("/v1/chat/completions")
    paris = {"messages": [{"role": "user", "content": "What is the capital of France?"}]}
    count = {"messages": [{"role": "user", "content": "Count from one to five."}]}
    a, b = engine.run(
        "/v1/chat/completions",
        [
            chat("a", request_id="same", max_tokens=16, **paris),
            chat("b", request_id="same", max_tokens=16, **count),
        ],
    )
    alone = engine.run("/v1/chat/completions", [chat("p", max_tokens=16, **paris)])[0]
    assert a.ok and b.ok
    assert a.body["choices"][0]["message"] == alone.body["choices"][0]["message"]
    assert b.body["choices"][0]["message"] != a.body["choices"][0]["message"]


def test_greedy_n_over_several_prompts_repeats_each_prompts_answer(home, model_dir):
    engine = build_resources(settings_for(home, model_dir))["engine"]
    engine.start("/v1/completions")
    body = {
        "model": MODEL,
        "prompt": ["The capital of France is", "One, two, three,"],
        "n": 2,
        "temperature": 0,
        "max_tokens": 6,
    }
    (result,) = engine.run("/v1/completions", [EngineRequest("c", body)])
    choices = result.body["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    texts = [c["text"] for c in choices]
    assert texts[0] == texts[1] and texts[2] == texts[3] and texts[0] != texts[2]
    assert result.completion_tokens == result.body["usage"]["completion_tokens"]
