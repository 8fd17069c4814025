"""The results lake: ``results.parquet`` is a flat row per output or error line, whatever odd
but valid shape a line has; a batch without one gets it when the lake is read; the views
answer SQL (DuckDB over the real bucket and catalog; a real batch is in test_inference)."""

from __future__ import annotations

import json

from vbs_resources import Bucket, Catalog
from vbs_resources import layout as L
from vbs_resources.lake import open_lake, write_results

BATCH = "batch_lakelake01"


def line(custom_id: str, status: int | None, body: dict | None, error: dict | None = None):
    response = None if status is None else {"status_code": status, "request_id": "r", "body": body}
    return {"id": f"l-{custom_id}", "custom_id": custom_id, "response": response, "error": error}


def chat(text: str | None, **extra) -> dict:
    return {"object": "chat.completion", "model": "m", "created": 1764000000,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}, **extra}  # fmt: skip


def write(bucket: Bucket, name: str, lines: list[dict]) -> None:
    data = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines).encode()
    bucket.write_bytes(L.batch_file(BATCH, name), data)


def test_odd_but_valid_lines_are_one_flat_row_each(tmp_path):
    bucket = Bucket(url=str(tmp_path / "bucket"))
    write(bucket, L.OUTPUT, [
        line("plain", 200, chat("Paris ☕ 😀")),
        line("null-error", 200, chat("ok", error=None)),  # a pass-through server's body
        line("far-future", 200, chat("late", created=1e300)),
        line("no-text", 200, chat(None)),
        line("big", 200, chat("x" * 200_000)),
        line("created-201", 201, chat("made")),
    ])  # fmt: skip
    write(bucket, L.ERRORS, [
        line("expired", None, None, {"code": "batch_expired", "message": "window closed"}),
        line("bad", 400, {"error": {"code": "invalid_request", "message": "no", "param": "n"}}),
    ])  # fmt: skip
    assert write_results(bucket, BATCH, ended_at=1764000100) == 8
    lake = open_lake(bucket, Catalog(url=f"sqlite:///{tmp_path / 'catalog.db'}"))
    rows = {
        r[0]: r[1:]
        for r in lake.sql(
            "SELECT custom_id, status, text, error_code, error_param, epoch(created_at), "
            "completion_tokens FROM results"
        ).fetchall()
    }
    assert rows["plain"] == ("completed", "Paris ☕ 😀", None, None, 1764000000, 2)
    assert rows["null-error"][0] == "completed"
    assert rows["far-future"][0] == "completed" and rows["far-future"][4] == 1764000100
    assert rows["no-text"][:2] == ("completed", None)
    assert len(rows["big"][1]) == 200_000
    assert rows["created-201"][0] == "completed"
    assert rows["expired"][:3] == ("failed", None, "batch_expired")
    assert rows["bad"][2:4] == ("invalid_request", "n")


def test_a_batch_without_results_gets_them_when_the_lake_is_read(tmp_path):
    bucket = Bucket(url=str(tmp_path / "bucket"))
    catalog = Catalog(url=f"sqlite:///{tmp_path / 'catalog.db'}")
    assert open_lake(bucket, catalog).sql("SELECT count(*) FROM results").fetchall() == [(0,)]
    write(bucket, L.OUTPUT, [line("a", 200, chat("hi"))])  # ended before the lake existed
    lake = open_lake(bucket, catalog)
    assert lake.sql("SELECT custom_id, batch_id FROM results").fetchall() == [("a", BATCH)]
    assert bucket.exists(L.batch_file(BATCH, L.RESULTS))


def test_conquests_are_made_from_the_lake(tmp_path):
    from vbs_resources.curation import ConquestTypes
    from vbs_resources.curation.conquests import build_conquests

    bucket = Bucket(url=str(tmp_path / "bucket"))
    write(bucket, L.OUTPUT, [line("plain", 200, chat("Sorry!")), line("no-text", 200, chat(None))])
    write(
        bucket, L.ERRORS, [line("expired", None, None, {"code": "batch_expired", "message": "w"})]
    )
    support = ConquestTypes().registry().get("support_reply")
    rows = {r["custom_id"]: r for r in build_conquests(bucket, {"id": BATCH}, support)}
    assert (rows["plain"]["status"], rows["plain"]["prediction"]) == ("COMPLETED", "Sorry!")
    assert rows["no-text"]["status"] == "FAILED"
    assert rows["no-text"]["error"] == {"message": "the answer holds no text"}
    assert rows["expired"]["error"] == {"code": "batch_expired", "message": "w"}
    assert rows["plain"]["id"] == L.conquest_id(BATCH, "plain")
