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
    resources_for,
    submit,
)
from vbs_resources import EngineRequest, EngineResult, InferenceEngine
from vbs_resources.engine import EngineFailure
from vbs_resources.wire import BatchRequestOutput

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


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@pytest.fixture(scope="module")
def chat_batch(tmp_path_factory, model_dir):
    home = tmp_path_factory.mktemp("chat") / "vbs"
    resources = resources_for(home, model_dir)
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
        chat_line("n2-greedy", PARIS, temperature=0, n=2, max_tokens=8),
        chat_line(
            "own-template",
            PARIS,
            max_tokens=4,
            chat_template_kwargs={"chat_template": "{% for i in range(10**9) %}x{% endfor %}"},
        ),
        chat_line(
            "tools-required", PARIS, max_tokens=8, tools=[WEATHER_TOOL], tool_choice="required"
        ),
        chat_line("tools-none", PARIS, max_tokens=8, tools=[WEATHER_TOOL], tool_choice="none"),
    ]
    with dg.instance_for_test() as instance:
        batch_id = submit(resources, instance, lines)
        result = materialize_batch(resources, instance, batch_id, chunk_size=5)
        ok, errors = outputs(home, batch_id)
        yield {
            "result": result,
            "ok": ok,
            "errors": errors,
            "row": resources["catalog"].batches.get(batch_id),
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
        "n2-greedy",
        "own-template",
        "tools-required",
        "tools-none",
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


def test_greedy_with_n_gives_n_identical_choices_as_openai_does(chat_batch):
    body = chat_batch["ok"]["n2-greedy"]["response"]["body"]
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert content(chat_batch["ok"]["n2-greedy"], 0) == content(chat_batch["ok"]["n2-greedy"], 1)
    one = body["usage"]["completion_tokens"] // 2
    assert one > 0 and body["usage"]["completion_tokens"] == 2 * one


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
        "own-template": (400, "invalid_request"),
        # Tool calls are not parsed in process: refused by name, never answered as free text.
        "tools-required": (400, "unsupported_parameter"),
    }
    assert errors["own-template"]["response"]["body"]["error"]["param"] == "chat_template"
    assert errors["tools-required"]["response"]["body"]["error"]["param"] == "tool_choice"
    assert "tools-none" in chat_batch["ok"]
    row = chat_batch["row"]
    assert row["status"] == "completed"
    assert (row["request_total"], row["request_completed"], row["request_failed"]) == (16, 11, 5)
    assert row["completed_at"] >= row["in_progress_at"] >= row["created_at"]
    assert row["usage"]["output_tokens"] > 0


def test_the_results_lake_has_a_flat_row_per_line(chat_batch, tmp_path):
    from vbs_resources import Bucket, Catalog
    from vbs_resources.lake import open_lake

    home, batch_id = chat_batch["home"], chat_batch["batch_id"]
    bucket = Bucket(url=str(home / "bucket"))
    lake = open_lake(bucket, Catalog(url=f"sqlite:///{tmp_path / 'other.db'}"))
    rows = {
        r[0]: r[1:]
        for r in lake.sql(
            "SELECT custom_id, status, status_code, model, finish_reason, completion_tokens, "
            "text, error_code, error_param FROM results WHERE batch_id = $b",
            params={"b": batch_id},
        ).fetchall()
    }
    assert set(rows) == set(chat_batch["ok"]) | set(chat_batch["errors"])
    assert rows["paris"][:4] == ("completed", 200, MODEL, "stop") and "Paris" in rows["paris"][5]
    assert rows["short"][3] == "length" and rows["short"][4] == 3
    assert rows["unknown-model"][:2] == ("failed", 404) and rows["unknown-model"][6] == (
        "model_not_found"
    )
    assert rows["own-template"][6:] == ("invalid_request", "chat_template")
    tokens = lake.sql("SELECT sum(completion_tokens) FROM results").fetchall()[0][0]
    assert tokens == chat_batch["row"]["usage"]["output_tokens"]
    per_day = lake.sql(
        "SELECT model, date_trunc('day', created_at) AS day, sum(total_tokens) FROM results "
        "WHERE status = 'completed' GROUP BY ALL"
    ).fetchall()
    assert [(m, t > 0) for m, _, t in per_day] == [(MODEL, True)]


def test_catalog_row_is_an_openai_batch_object(chat_batch):
    from openai.types import Batch

    from vbs_resources.catalog import batch_object

    batch = Batch.model_validate(batch_object(chat_batch["row"]).model_dump())
    assert batch.status == "completed" and batch.endpoint == "/v1/chat/completions"
    assert (batch.request_counts.total, batch.request_counts.failed) == (16, 5)
    assert batch.usage.output_tokens == chat_batch["row"]["usage"]["output_tokens"]
    assert batch.expires_at - batch.created_at == 24 * 3600


def test_metadata_reports_counts_tokens_and_a_preview(chat_batch):
    meta = metadata_of(chat_batch["result"], "batch_output")
    assert meta["completed"] == 11 and meta["failed"] == 5
    assert meta["completion_tokens"] == chat_batch["row"]["usage"]["output_tokens"]
    assert meta["output_tokens_per_s"] > 0 and meta["engine"] == "vllm/in_process"
    assert "| paris | 200 |" in meta["preview"]
    meta_in = metadata_of(chat_batch["result"], "batch_input")
    assert meta_in["request_count"] == 16 and meta_in["endpoint"] == "/v1/chat/completions"


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
    row = resources["catalog"].batches.get(batch_id)
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


class SimulatedKill(BaseException):
    """Stands in for the run's process dying (a BaseException, as a signal's, so nothing in the
    step handles it): the batch is not failed, its run is left behind."""


class CrashAfterChunksEngineDouble:
    """Failure injection (a process death cannot happen inside an in-process test run): wraps
    the real engine, counts what it is asked to run, and raises ``error`` after ``chunks``
    chunks."""

    def __init__(self, inner, chunks: int, error: BaseException | None = None) -> None:
        self.inner, self.chunks, self.calls = inner, chunks, []
        self.error = error or SimulatedKill()

    def configured_models(self):
        return self.inner.configured_models()

    def describe(self) -> dict[str, str]:
        return self.inner.describe()

    def start(self, endpoint: str, served=None) -> None:
        self.inner.start(endpoint, served)

    def run(self, endpoint: str, requests: list[EngineRequest]) -> list[EngineResult]:
        if len(self.calls) == self.chunks:
            raise self.error
        self.calls.append([r.custom_id for r in requests])
        return self.inner.run(endpoint, requests)

    def run_chunks(self, endpoint: str, chunks):
        # The interface's own: one chunk after another through ``run`` above.
        return InferenceEngine.run_chunks(self, endpoint, chunks)


def killed_run(resources, instance, batch_id, chunks, chunk_size):
    """Materialize until the engine 'dies' after ``chunks`` chunks; the run is then reported
    failed, as the reconciler does for a run whose process is gone."""
    crashing = CrashAfterChunksEngineDouble(resources["engine"], chunks=chunks)
    with pytest.raises(SimulatedKill):
        materialize_batch({**resources, "engine": crashing}, instance, batch_id, chunk_size)
    [run] = [r for r in instance.get_runs() if r.tags.get("dagster/partition") == batch_id]
    if not run.is_finished:
        instance.report_run_failed(run, "process gone")


def test_rerun_after_a_crash_resumes_from_the_checkpoint(resources, instance, home):
    lines = [
        chat_line(f"r{i:02d}", f"Say the number {i}.", temperature=0, max_tokens=4)
        for i in range(10)
    ]
    batch_id = submit(resources, instance, lines)
    killed_run(resources, instance, batch_id, chunks=2, chunk_size=3)
    checkpoint = home / "bucket" / "batches" / batch_id / "checkpoint"
    chunk_files = sorted(checkpoint.glob("chunk-*.jsonl"))
    assert [p.name for p in chunk_files] == ["chunk-00000.jsonl", "chunk-00001.jsonl"]
    stamps = {p.name: p.stat().st_mtime_ns for p in chunk_files}
    crashed = resources["catalog"].batches.get(batch_id)
    assert (crashed["status"], crashed["request_completed"]) == ("in_progress", 6)

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
    assert resources["catalog"].batches.get(batch_id)["status"] == "completed"
    assert not checkpoint.exists()


def test_an_exception_in_the_step_fails_the_batch_without_internals(resources, instance):
    lines = [chat_line("a", "hi", max_tokens=2), chat_line("b", "hi", max_tokens=2)]
    batch_id = submit(resources, instance, lines)
    boom = RuntimeError("secret path /etc/vbs and http://user:pw@dagster:3000")
    crashing = CrashAfterChunksEngineDouble(resources["engine"], chunks=1, error=boom)
    result = materialize_batch(
        {**resources, "engine": crashing}, instance, batch_id, chunk_size=1, raise_on_error=False
    )
    assert not result.success
    row = resources["catalog"].batches.get(batch_id)
    assert row["status"] == "failed" and row["request_completed"] == 1
    # What finished before the error is kept, in the batch's output file.
    ok, _ = outputs(Path(resources["bucket"].url).parent, batch_id)
    assert list(ok) == ["a"] and row["output_file_id"]
    [error] = row["errors"]
    assert error["code"] == "engine_error" and result.run_id in error["message"]
    assert "secret" not in error["message"] and "pw@" not in error["message"]
    assert [e["type"] for e in resources["catalog"].events.of_subject(batch_id)] == ["batch.failed"]


def test_a_second_run_never_races_an_active_one(resources, instance):
    """While the run holding a batch is alive another run for it refuses and changes nothing."""
    from vbs_assets.runner import BatchRunner, RunRefused
    from vbs_resources.lifecycle import BatchLifecycle

    batch_id = submit(resources, instance, [chat_line("a", "hi", max_tokens=2)])
    from vbs_assets.ingest import batch_input

    dg.materialize([batch_input], partition_key=batch_id, instance=instance, resources=resources)
    catalog = resources["catalog"]
    assert catalog.batches.claim(batch_id, "run-holding", None)
    lifecycle = BatchLifecycle(catalog)
    runner = BatchRunner(
        resources["bucket"], catalog, lifecycle, resources["engine"], "run-second", lambda _: True
    )
    before = catalog.batches.get(batch_id)
    with pytest.raises(RunRefused, match="run-holding"):
        runner.run(batch_id, 256)
    assert catalog.batches.get(batch_id) == before
    # Once the holder is gone (failed, canceled), the next run takes over.
    runner.run_is_active = lambda _: False
    assert runner.run(batch_id, 256).status == "completed"


def test_a_request_that_breaks_preparation_is_only_its_own_error_line(resources):
    """A body that slipped past validation (here a max_tokens that is no number) fails alone."""
    engine = resources["engine"]
    requests = [
        EngineRequest("bad", {**chat_line("bad", PARIS)["body"], "max_tokens": "lots"}),
        EngineRequest("good", chat_line("good", PARIS, temperature=0, max_tokens=12)["body"]),
        EngineRequest(
            "kwargs",
            {**chat_line("kwargs", PARIS)["body"], "chat_template_kwargs": {"tokenize": True}},
        ),
    ]
    results = {r.custom_id: r for r in engine.run("/v1/chat/completions", requests)}
    assert results["bad"].status_code == 400
    assert results["bad"].body["error"]["param"] == "max_tokens"
    # vLLM's renderer owns tokenization, as on its server: a stray kwarg does not break it.
    assert results["kwargs"].ok
    assert (
        results["good"].ok and "Paris" in results["good"].body["choices"][0]["message"]["content"]
    )


def test_past_the_completion_window_the_batch_expires_keeping_what_finished(
    resources, instance, home
):
    lines = [chat_line(f"e{i}", f"Say {i}.", temperature=0, max_tokens=4) for i in range(6)]
    batch_id = submit(resources, instance, lines)
    catalog = resources["catalog"]
    killed_run(resources, instance, batch_id, chunks=1, chunk_size=2)
    catalog.batches.update_unfinished(batch_id, expires_at=1)  # the window closed long ago
    from vbs_assets.inference import batch_output, output_complete

    result = dg.materialize(
        [batch_output, output_complete],
        partition_key=batch_id,
        instance=instance,
        resources=resources,
        run_config=dg.RunConfig(ops={"batch_output": {"config": {"chunk_size": 2}}}),
    )
    assert result.success
    row = catalog.batches.get(batch_id)
    assert row["status"] == "expired" and row["expired_at"]
    assert (row["request_completed"], row["request_failed"]) == (2, 4)
    ok, errors = outputs(home, batch_id)
    assert sorted(ok) == ["e0", "e1"]
    assert {k: v["error"]["code"] for k, v in errors.items()} == {
        f"e{i}": "batch_expired" for i in range(2, 6)
    }
    assert all(v["response"] is None for v in errors.values())


@pytest.mark.parametrize(
    "raised, expected, match",
    [
        # A device failure (a CUDA error cannot happen on these CPU machines, so the real
        # engine's step is made to raise): the chunk stops with EngineFailure instead of turning
        # every request into an error line.
        (RuntimeError("CUDA error: an illegal memory access"), EngineFailure, "CUDA error"),
        # Dagster's termination, an exception that is no ``Exception``, arriving in the step:
        # it ends the chunk at once (an asyncio task would otherwise keep it to itself and leave
        # the chunk waiting for ever).
        (SimulatedKill("terminated"), SimulatedKill, "terminated"),
    ],
    ids=["device-failure", "interrupt"],
)
def test_a_step_that_raises_ends_the_chunk_and_the_engine_is_loaded_again(
    resources, monkeypatch, raised, expected, match
):
    """Either way a later chunk in the same process gets a freshly loaded engine."""
    from vbs_resources.engine.vllm_local import _LOADED

    engine = resources["engine"]
    engine.start("/v1/chat/completions")
    llm = engine._llm(engine.model, "generate")

    def raising_step():
        raise raised

    monkeypatch.setattr(llm.llm_engine, "step", raising_step)
    lines = [
        EngineRequest(f"b{i}", chat_line(f"b{i}", PARIS, max_tokens=4)["body"]) for i in range(3)
    ]
    with pytest.raises(expected, match=match):
        engine.run("/v1/chat/completions", lines)
    if expected is EngineFailure:
        assert all(loaded is not llm for loaded in _LOADED.values())
    again = engine.run("/v1/chat/completions", lines)
    assert [r.status_code for r in again] == [200, 200, 200]
    assert all(loaded is not llm for loaded in _LOADED.values())


def test_released_engines_leave_no_parallel_state_and_load_again(resources):
    """``release_engines`` shuts every engine of the process down and, none being left, runs
    vLLM's own cleanup (its parallel groups and distributed environment go: with the engine
    core in this process, deleting an engine alone frees no GPU memory); the next chunk loads
    the engine again and is answered."""
    from vllm.distributed import parallel_state

    from vbs_resources.engine.vllm_local import _LOADED, release_engines

    engine = resources["engine"]
    line = EngineRequest("r0", chat_line("r0", PARIS, max_tokens=4)["body"])
    engine.start("/v1/chat/completions")
    assert engine.run("/v1/chat/completions", [line])[0].status_code == 200
    assert _LOADED and parallel_state.model_parallel_is_initialized()
    release_engines()
    assert not _LOADED and not parallel_state.model_parallel_is_initialized()
    assert engine.run("/v1/chat/completions", [line])[0].status_code == 200
    assert len(_LOADED) == 1 and parallel_state.model_parallel_is_initialized()
