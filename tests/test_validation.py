"""The bad-input suite: each malformed file fails with the right code, line and parameter."""

import io
import json

import pytest

from tests.conftest import chat_line
from tests.corpus import BAD_LINES, ODD_BUT_VALID, bad_file, param_matches
from vbs_assets.validation import Limits, validate_batch_file


def validate(data: bytes, limits: Limits | None = None, **kwargs):
    rows = []
    report = validate_batch_file(
        io.BytesIO(data), size=len(data), limits=limits or Limits(), sink=rows.extend, **kwargs
    )
    return report, rows


def good(n: int = 3) -> list[bytes]:
    return [json.dumps(chat_line(f"r{i}", "hi")).encode() for i in range(n)]


def only_error(report):
    assert not report.ok
    assert report.error_count == 1, report.errors
    return report.errors[0]


def test_valid_file_rows_keep_line_numbers_and_bodies():
    report, rows = validate(b"\n".join(good(3)) + b"\n")
    assert report.ok and report.request_count == 3
    assert report.endpoint == "/v1/chat/completions"
    assert report.models == {"SmolLM2-135M-Instruct": 3}
    assert [r["line"] for r in rows] == [1, 2, 3]
    assert json.loads(rows[0]["body"])["messages"][0]["content"] == "hi"
    assert len(report.sha256) == 64


@pytest.mark.parametrize(
    ("data", "code", "line", "param"),
    [
        (b"%s\n{not json\n", "invalid_json_line", 2, None),
        (b"%s\n[1, 2]\n", "invalid_json_line", 2, None),
        (
            b'%s\n{"method": "POST", "url": "/v1/chat/completions", "body": {}}\n',
            "missing_required_parameter",
            2,
            "custom_id",
        ),
        (
            b'%s\n{"custom_id": "x", "url": "/v1/chat/completions", "body": {}}\n',
            "missing_required_parameter",
            2,
            "method",
        ),
        (
            b'%s\n{"custom_id": "x", "method": "GET", "url": "/v1/chat/completions", "body": {}}\n',
            "invalid_method",
            2,
            "method",
        ),
        (
            b'%s\n{"custom_id": "x", "method": "POST", "url": "/v1/images", "body": {}}\n',
            "invalid_url",
            2,
            "url",
        ),
        (
            b'%s\n{"custom_id": "x", "method": "POST", "url": "/v1/completions",'
            b' "body": {"model": "m", "prompt": "p"}}\n',
            "mismatched_url",
            2,
            "url",
        ),
        (
            b'%s\n{"custom_id": "x", "method": "POST", "url": "/v1/chat/completions",'
            b' "body": {"model": "m"}}\n',
            "missing_required_parameter",
            2,
            "body.messages",
        ),
        (
            b'%s\n{"custom_id": "x", "method": "POST", "url": "/v1/chat/completions",'
            b' "body": {"model": "m", "messages": "hi"}}\n',
            "invalid_request",
            2,
            "body.messages",
        ),
        (
            b'%s\n{"custom_id": "x", "method": "POST", "url": "/v1/chat/completions",'
            b' "body": {"model": "m", "messages": []}, "extra": 1}\n',
            "invalid_request",
            2,
            "extra",
        ),
        (
            b'%s\n{"custom_id": "r0", "method": "POST", "url": "/v1/chat/completions",'
            b' "body": {"model": "m", "messages": [{"role": "user", "content": "x"}]}}\n',
            "duplicate_custom_id",
            2,
            "custom_id",
        ),
        (b"%s\n\xff\xfe broken\n", "invalid_utf8", 2, None),
    ],
    ids=[
        "invalid-json",
        "not-an-object",
        "missing-custom-id",
        "missing-method",
        "wrong-method",
        "unknown-url",
        "mixed-urls",
        "missing-messages",
        "bad-messages",
        "unknown-field",
        "duplicate-custom-id",
        "invalid-utf8",
    ],
)
def test_each_bad_line_is_named(data, code, line, param):
    report, _ = validate(data % good(1)[0])
    error = only_error(report)
    assert (error.code, error.line, error.param) == (code, line, param)
    assert error.message


def test_every_bad_line_is_reported_not_only_the_first():
    lines = good(2) + [b"{bad", b'{"custom_id": "r0"}'] + [b"nope"]
    report, _ = validate(b"\n".join(lines))
    assert [(e.code, e.line) for e in report.errors] == [
        ("invalid_json_line", 3),
        ("missing_required_parameter", 4),
        ("invalid_json_line", 5),
    ]


def test_empty_file():
    error = only_error(validate(b"")[0])
    assert error.code == "empty_file"
    error = only_error(validate(b"\n  \n\r\n")[0])
    assert error.code == "empty_file"


def test_blank_lines_are_skipped_and_still_counted_for_line_numbers():
    data = b"\n".join([good(1)[0], b"", b"   ", b"{broken"])
    error = only_error(validate(data)[0])
    assert (error.code, error.line) == ("invalid_json_line", 4)
    report, rows = validate(b"\n\n".join(good(2)) + b"\n\n")
    assert report.ok and [r["line"] for r in rows] == [1, 3]


def test_utf8_bom_and_crlf_are_accepted():
    data = b"\xef\xbb\xbf" + b"\r\n".join(good(3)) + b"\r\n"
    report, rows = validate(data)
    assert report.ok and report.request_count == 3
    assert [r["custom_id"] for r in rows] == ["r0", "r1", "r2"]


def test_over_the_size_limit_is_refused_before_reading():
    data = b"\n".join(good(3))
    report, rows = validate(data, Limits(max_bytes=len(data) - 1))
    error = only_error(report)
    assert error.code == "file_too_large" and error.line is None
    assert rows == [] and report.request_count == 0


def test_over_the_request_limit_names_the_first_line_too_many():
    data = b"\n".join(good(5))
    report, _ = validate(data, Limits(max_requests=3))
    error = only_error(report)
    assert (error.code, error.line) == ("too_many_requests", 4)


def test_declared_endpoint_wins_over_the_first_line():
    report, _ = validate(b"\n".join(good(1)), endpoint="/v1/embeddings")
    error = only_error(report)
    assert (error.code, error.line) == ("mismatched_url", 1)


def test_digest_covers_the_whole_file_even_after_an_early_stop():
    import hashlib

    data = b"\n".join(good(5))
    report, _ = validate(data, Limits(max_requests=2))
    assert report.sha256 == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("bad", BAD_LINES, ids=[b.name for b in BAD_LINES])
def test_hostile_lines_fail_validation_naming_line_and_field(bad):
    """The adversarial corpus: no line crashes validation; each is named, with its field, and
    every message stays short whatever the input's size."""
    report, rows = validate(bad_file(bad))
    error = only_error(report)
    assert (error.code, error.line) == (bad.code, 2), error
    assert param_matches(bad.param, error.param), error
    assert len(error.message) < 400 and len(error.param or "") <= 200
    json.dumps(error.model_dump()).encode("utf-8")  # storable and servable as it is
    assert rows == []  # nothing of an invalid file is written


def test_odd_but_valid_lines_pass():
    report, rows = validate(b"\n".join(ODD_BUT_VALID) + b"\n")
    assert report.ok, report.errors
    assert len(rows) == len(ODD_BUT_VALID)
    for row in rows:  # what reaches Parquet is encodable
        row["body"].encode("utf-8")
        row["custom_id"].encode("utf-8")


def test_errors_stay_bounded_for_a_file_of_huge_bad_lines():
    """1,000 lines each with a 100 KB method: the stored errors stay small."""
    bad = json.dumps({**json.loads(good(1)[0]), "method": "M" * 100_000}).encode()
    report, _ = validate(b"\n".join([bad] * 1000))
    assert report.error_count == 1000
    stored = json.dumps([e.model_dump() for e in report.errors])
    assert len(stored) < 300_000


def test_a_file_of_only_bad_lines_says_how_many_and_counts_what_was_read():
    """200,000 invalid lines listed lines 1-1000 with no word that the list was cut, and a
    total of 50,000 requests when none was valid. Now: why reading stopped first, then the first
    errors, then how many there were in all; and no valid request is counted."""
    from vbs_assets.validation import MAX_REPORTED_ERRORS

    data = b"{not json}\n" * 5000
    report, _ = validate(data, Limits(max_requests=3000))
    listed = report.listed_errors()
    assert len(listed) == MAX_REPORTED_ERRORS
    assert (listed[0].code, listed[0].line) == ("too_many_requests", 3001)
    assert "reading stopped at line 3001" in listed[0].message
    assert {e.code for e in listed[1:-1]} == {"invalid_json_line"}
    assert listed[-1].code == "too_many_errors" and listed[-1].line is None
    assert listed[-1].message.startswith("3001 errors in all, in 3000 request lines read")
    assert report.valid_requests == 0
    few, _ = validate(b"{not json}\n" * 3)
    assert [e.code for e in few.listed_errors()] == ["invalid_json_line"] * 3  # nothing cut
