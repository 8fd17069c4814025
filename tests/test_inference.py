"""batch_input + batch_output with the real vLLM (CPU build) and the real SmolLM2 model."""

import json
from pathlib import Path

import dagster as dg
import pytest
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion

from tests.conftest import (
    MODEL,
    chat_line,
    materialize_batch,
    metadata_of,
    read_jsonl,
    submit,
)
from vbs_assets.schemas import BatchRequestOutput
from vbs_resources import EngineRequest, EngineResult, build_resources

PARIS = "What is the capital of France?"
CITY_SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "city",
        "schema": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


def outputs(home: Path, batch_id: str) -> tuple[dict[str, dict], dict[str, dict]]:
    folder = home / "bucket" / "batches" / batch_id
    ok = {line["custom_id"]: line for line in read_jsonl(folder / "output.jsonl")}
    errors = {line["custom_id"]: line for line in read_jsonl(folder / "errors.jsonl")}
    for line in [*ok.values(), *errors.values()]:
        BatchRequestOutput.model_validate(line)
    return ok, errors


@pytest.fixture(scope="module")
def chat_batch(tmp_path_factory, model_dir):
    home = tmp_path_factory.mktemp("chat") / "vbs"
    resources = build_resources({"VBS_HOME": str(home), "VBS_MODEL": str(model_dir)})
    lines = [
        chat_line("paris", PARIS, temperature=0, max_tokens=24),
        chat_line("short", PARIS, temperature=0, max_tokens=3),
        chat_line("max-completion", PARIS, temperature=0, max_completion_tokens=4),
        chat_line("stop", PARIS, temperature=0, max_tokens=24, stop=["Paris"]),
        chat_line("n2", "Say a color.", temperature=1.0, n=2, max_tokens=8, seed=3),
        chat_line("logprobs", PARIS, temperature=0, max_tokens=6, logprobs=True, top_logprobs=2),
        chat_line("json", "Name a city in France.", max_tokens=40, response_format=CITY_SCHEMA),
        chat_line("seed-a", "Tell me a word.", temperature=1.0, seed=7, max_tokens=10),
        chat_line("seed-b", "Tell me a word.", temperature=1.0, seed=7, max_tokens=10),
        {
            **chat_line("unknown-model", PARIS),
            "body": {**chat_line("x", PARIS)["body"], "model": "gpt-9"},
        },
        chat_line("too-long", "word " * 3000, max_tokens=4),
        chat_line("bad-param", PARIS, temperature=-1),
    ]
    with dg.instance_for_test() as instance:
        batch_id = submit(resources, instance, lines)
        result = materialize_batch(resources, instance, batch_id, chunk_size=5)
        ok, errors = outputs(home, batch_id)
        yield {
            "result": result,
            "ok": ok,
            "errors": errors,
            "row": resources["catalog"].get_batch(batch_id),
            "home": home,
            "batch_id": batch_id,
        }


def content(line: dict, choice: int = 0) -> str:
    return line["response"]["body"]["choices"][choice]["message"]["content"]


def test_every_request_is_answered_once_in_openai_format(chat_batch):
    ok, errors = chat_batch["ok"], chat_batch["errors"]
    assert set(ok) | set(errors) == {
        "paris",
        "short",
        "max-completion",
        "stop",
        "n2",
        "logprobs",
        "json",
        "seed-a",
        "seed-b",
        "unknown-model",
        "too-long",
        "bad-param",
    }
    assert not set(ok) & set(errors)
    for line in ok.values():
        assert line["response"]["status_code"] == 200 and line["error"] is None
        body = ChatCompletion.model_validate(line["response"]["body"])
        assert body.model == MODEL
        assert body.usage.total_tokens == body.usage.prompt_tokens + body.usage.completion_tokens
    check_results = {
        c.check_name: c.passed for c in chat_batch["result"].get_asset_check_evaluations()
    }
    assert check_results["output_complete"] is True


def test_capital_of_france_is_paris(chat_batch):
    assert "Paris" in content(chat_batch["ok"]["paris"])


def test_sampling_parameters_reach_vllm(chat_batch):
    ok = chat_batch["ok"]
    short = ok["short"]["response"]["body"]
    assert short["usage"]["completion_tokens"] == 3
    assert short["choices"][0]["finish_reason"] == "length"
    assert ok["max-completion"]["response"]["body"]["usage"]["completion_tokens"] <= 4
    stop = ok["stop"]["response"]["body"]["choices"][0]
    assert "Paris" not in stop["message"]["content"] and stop["finish_reason"] == "stop"
    assert [c["index"] for c in ok["n2"]["response"]["body"]["choices"]] == [0, 1]
    assert content(ok["seed-a"]) == content(ok["seed-b"])


def test_logprobs_have_one_entry_per_token_with_top_alternatives(chat_batch):
    body = chat_batch["ok"]["logprobs"]["response"]["body"]
    entries = body["choices"][0]["logprobs"]["content"]
    assert len(entries) == body["usage"]["completion_tokens"]
    assert all(len(e["top_logprobs"]) == 2 and e["logprob"] <= 0 for e in entries)
    assert "".join(e["token"] for e in entries) == content(chat_batch["ok"]["logprobs"])


def test_json_schema_response_format_is_enforced(chat_batch):
    parsed = json.loads(content(chat_batch["ok"]["json"]))
    assert set(parsed) == {"city"} and isinstance(parsed["city"], str)


def test_failing_requests_become_error_lines_and_the_batch_goes_on(chat_batch):
    errors = chat_batch["errors"]
    codes = {
        k: (v["response"]["status_code"], v["response"]["body"]["error"]["code"])
        for k, v in errors.items()
    }
    assert codes == {
        "unknown-model": (404, "model_not_found"),
        "too-long": (400, "context_length_exceeded"),
        "bad-param": (400, "invalid_request"),
    }
    row = chat_batch["row"]
    assert row["status"] == "completed"
    assert (row["request_total"], row["request_completed"], row["request_failed"]) == (12, 9, 3)
    assert row["completed_at"] >= row["in_progress_at"] >= row["created_at"]
    assert row["usage"]["output_tokens"] > 0


def test_catalog_row_is_an_openai_batch_object(chat_batch):
    from openai.types import Batch

    from vbs_resources import Catalog

    batch = Batch.model_validate(Catalog.to_openai_batch(chat_batch["row"]))
    assert batch.status == "completed" and batch.endpoint == "/v1/chat/completions"
    assert (batch.request_counts.total, batch.request_counts.failed) == (12, 3)
    assert batch.usage.output_tokens == chat_batch["row"]["usage"]["output_tokens"]
    assert batch.expires_at - batch.created_at == 24 * 3600


def test_metadata_reports_counts_tokens_and_a_preview(chat_batch):
    meta = metadata_of(chat_batch["result"], "batch_output")
    assert meta["completed"] == 9 and meta["failed"] == 3
    assert meta["completion_tokens"] == chat_batch["row"]["usage"]["output_tokens"]
    assert meta["output_tokens_per_s"] > 0 and meta["engine"] == "vllm/in_process"
    assert "| paris | 200 |" in meta["preview"]
    meta_in = metadata_of(chat_batch["result"], "batch_input")
    assert meta_in["request_count"] == 12 and meta_in["endpoint"] == "/v1/chat/completions"


def test_completions_endpoint(resources, instance, home):
    line = {
        "custom_id": "c1",
        "method": "POST",
        "url": "/v1/completions",
        "body": {
            "model": MODEL,
            "prompt": ["The capital of France is", "1, 2, 3,"],
            "max_tokens": 5,
            "temperature": 0,
            "logprobs": 1,
        },
    }
    batch_id = submit(resources, instance, [line])
    materialize_batch(resources, instance, batch_id)
    ok, errors = outputs(home, batch_id)
    body = Completion.model_validate(ok["c1"]["response"]["body"])
    assert [c.index for c in body.choices] == [0, 1]
    assert "Paris" in body.choices[0].text
    assert len(body.choices[0].logprobs.tokens) == body.choices[0].logprobs.text_offset.__len__()
    assert not errors


def test_embeddings_endpoint_with_a_real_sentence_model(resources, instance, home):
    def line(custom_id, text, **kw):
        body = {"model": "all-MiniLM-L6-v2", "input": text, **kw}
        return {"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": body}

    lines = [
        line("cat", "A cat sits on the mat."),
        line("kitten", "A kitten is sitting on a rug."),
        line("stock", ["Quarterly revenue fell by four percent."], encoding_format="base64"),
        line("wrong-model", "x", **{"model": MODEL}),
    ]
    batch_id = submit(resources, instance, lines)
    materialize_batch(resources, instance, batch_id)
    ok, errors = outputs(home, batch_id)
    vectors = {}
    for key in ("cat", "kitten"):
        body = CreateEmbeddingResponse.model_validate(ok[key]["response"]["body"])
        vectors[key] = body.data[0].embedding
        assert len(vectors[key]) == 384 and body.usage.prompt_tokens > 0
    assert isinstance(ok["stock"]["response"]["body"]["data"][0]["embedding"], str)

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True)) / (
            sum(x * x for x in a) ** 0.5 * sum(y * y for y in b) ** 0.5
        )

    assert cos(vectors["cat"], vectors["kitten"]) > 0.5
    assert errors["wrong-model"]["response"]["body"]["error"]["code"] == "model_not_found"


def test_invalid_file_fails_the_batch_with_line_numbered_errors(resources, instance):
    data = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", "messages": [{"role": "user", "content": "x"}]}}\n{oops\n'
    batch_id = submit(resources, instance, data)
    result = materialize_batch(resources, instance, batch_id, raise_on_error=False)
    assert not result.success
    row = resources["catalog"].get_batch(batch_id)
    assert row["status"] == "failed" and row["failed_at"]
    assert row["errors"] == [
        {
            "code": "invalid_json_line",
            "line": 2,
            "param": None,
            "message": row["errors"][0]["message"],
        }
    ]
    assert not resources["bucket"].exists(f"batches/{batch_id}/output.jsonl")
    assert not resources["bucket"].exists(f"batches/{batch_id}/requests.parquet")


class CrashAfterChunksEngineDouble:
    """Failure injection (a process death cannot happen inside an in-process test run): wraps
    the real engine, counts what it is asked to run, and raises after ``chunks`` chunks."""

    def __init__(self, inner, chunks: int) -> None:
        self.inner, self.chunks, self.calls = inner, chunks, []

    def served_models(self, endpoint: str) -> list[str]:
        return self.inner.served_models(endpoint)

    def describe(self) -> dict[str, str]:
        return self.inner.describe()

    def start(self, endpoint: str) -> None:
        self.inner.start(endpoint)

    def run(self, endpoint: str, requests: list[EngineRequest]) -> list[EngineResult]:
        if len(self.calls) == self.chunks:
            raise RuntimeError("injected crash")
        self.calls.append([r.custom_id for r in requests])
        return self.inner.run(endpoint, requests)


def test_rerun_after_a_crash_resumes_from_the_checkpoint(resources, instance, home):
    lines = [
        chat_line(f"r{i:02d}", f"Say the number {i}.", temperature=0, max_tokens=4)
        for i in range(10)
    ]
    batch_id = submit(resources, instance, lines)
    crashing = CrashAfterChunksEngineDouble(resources["engine"], chunks=2)
    first = materialize_batch(
        {**resources, "engine": crashing}, instance, batch_id, chunk_size=3, raise_on_error=False
    )
    assert not first.success
    checkpoint = home / "bucket" / "batches" / batch_id / "checkpoint"
    chunk_files = sorted(checkpoint.glob("chunk-*.jsonl"))
    assert [p.name for p in chunk_files] == ["chunk-00000.jsonl", "chunk-00001.jsonl"]
    stamps = {p.name: p.stat().st_mtime_ns for p in chunk_files}
    crashed = resources["catalog"].get_batch(batch_id)
    assert crashed["request_completed"] == 6
    # An exception in the step is final (not retried): the batch says so.
    assert crashed["status"] == "failed" and crashed["errors"][0]["code"] == "engine_error"

    counting = CrashAfterChunksEngineDouble(resources["engine"], chunks=99)
    from vbs_assets.inference import batch_output, error_rate, output_complete

    second = dg.materialize(
        [batch_output, output_complete, error_rate],
        partition_key=batch_id,
        instance=instance,
        resources={**resources, "engine": counting},
        run_config=dg.RunConfig(ops={"batch_output": {"config": {"chunk_size": 3}}}),
    )
    assert second.success
    # Only the 4 unfinished requests went to the engine; finished chunks were not rewritten.
    assert sorted(i for call in counting.calls for i in call) == ["r06", "r07", "r08", "r09"]
    assert (
        stamps == {p.name: p.stat().st_mtime_ns for p in chunk_files if p.exists()}
        or not checkpoint.exists()
    )
    ok, errors = outputs(home, batch_id)
    assert sorted(ok) == [f"r{i:02d}" for i in range(10)] and not errors
    assert metadata_of(second, "batch_output")["resumed_requests"] == 6
    assert resources["catalog"].get_batch(batch_id)["status"] == "completed"
    assert not checkpoint.exists()


def test_past_the_completion_window_the_batch_expires_keeping_what_finished(
    resources, instance, home
):
    lines = [chat_line(f"e{i}", f"Say {i}.", temperature=0, max_tokens=4) for i in range(6)]
    batch_id = submit(resources, instance, lines)
    catalog = resources["catalog"]
    crashing = CrashAfterChunksEngineDouble(resources["engine"], chunks=1)
    materialize_batch(
        {**resources, "engine": crashing}, instance, batch_id, chunk_size=2, raise_on_error=False
    )
    catalog.update_batch(batch_id, expires_at=1)  # the window closed long ago
    from vbs_assets.inference import batch_output, output_complete

    result = dg.materialize(
        [batch_output, output_complete],
        partition_key=batch_id,
        instance=instance,
        resources=resources,
        run_config=dg.RunConfig(ops={"batch_output": {"config": {"chunk_size": 2}}}),
    )
    assert result.success
    row = catalog.get_batch(batch_id)
    assert row["status"] == "expired" and row["expired_at"]
    assert (row["request_completed"], row["request_failed"]) == (2, 4)
    ok, errors = outputs(home, batch_id)
    assert sorted(ok) == ["e0", "e1"]
    assert {k: v["error"]["code"] for k, v in errors.items()} == {
        f"e{i}": "batch_expired" for i in range(2, 6)
    }
    assert all(v["response"] is None for v in errors.values())
