"""The adversarial corpus: every bad input class vbs has met, as batch file lines.

``BAD_LINES`` are lines that must fail validation with the given code and field, named by their
line; ``ODD_BUT_VALID`` are lines that look hostile but are valid OpenAI requests and must run.
``tests/test_validation.py`` checks each against the validator; ``tests/test_corpus.py`` sends
them all through the public surfaces (an inbox drop and the Batch API) of a running platform.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

MODEL = "SmolLM2-135M-Instruct"


def request(custom_id: str = "x", **body: Any) -> dict[str, Any]:
    base = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4}
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {**base, **body},
    }


def line(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def with_body_text(fragment: str, custom_id: str = "x") -> bytes:
    """A request whose body carries a raw JSON fragment (what json.dumps cannot produce)."""
    return (
        f'{{"custom_id": "{custom_id}", "method": "POST", "url": "/v1/chat/completions", '
        f'"body": {{"model": "{MODEL}", "messages": [{{"role": "user", "content": "hi"}}], '
        f"{fragment}}}}}"
    ).encode()


@dataclass(frozen=True)
class Bad:
    name: str
    raw: bytes
    code: str
    # The field the error must name; None where no single field is at fault. A trailing "*"
    # means "starts with".
    param: str | None


HUGE = "x" * 100_000

BAD_LINES: list[Bad] = [
    Bad("deep-nesting-100k", with_body_text('"extra": ' + "[" * 100_000 + "]" * 100_000),
        "invalid_json_line", None),
    Bad("deep-nesting-200", with_body_text('"extra": ' + "[" * 200 + "]" * 200),
        "invalid_json_line", "body.extra*"),
    Bad("surrogate-in-content",
        line(request(messages=[{"role": "user", "content": "\ud800"}])),
        "invalid_json_line", "body.messages.0.content"),
    Bad("surrogate-in-custom-id", line(request(custom_id="id-\udfff")),
        "invalid_json_line", "custom_id"),
    Bad("surrogate-in-key", line(request(**{"k\udc00": 1})), "invalid_json_line", "body*"),
    Bad("integer-of-5000-digits", with_body_text('"seed": 1' + "0" * 5000),
        "invalid_json_line", None),
    Bad("integer-past-int64", with_body_text(f'"seed": {2**70}'), "invalid_json_line", None),
    Bad("nan-literal", with_body_text('"temperature": NaN'), "invalid_json_line", None),
    Bad("infinity-literal", with_body_text('"temperature": -Infinity'), "invalid_json_line", None),
    Bad("float-overflow", with_body_text('"temperature": 1e999'), "invalid_json_line", None),
    Bad("duplicate-key",
        b'{"custom_id": "a", "custom_id": "b", "method": "POST", '
        b'"url": "/v1/chat/completions", "body": {}}',
        "invalid_json_line", "custom_id"),
    Bad("string-max-tokens", line(request(max_tokens="100")), "invalid_request",
        "body.max_tokens"),
    Bad("bool-n", line(request(n=True)), "invalid_request", "body.n"),
    Bad("string-temperature", line(request(temperature="0.5")), "invalid_request",
        "body.temperature"),
    Bad("list-stop-of-numbers", line(request(stop=[1, 2])), "invalid_request", "body.stop*"),
    Bad("huge-method", line({**request(), "method": HUGE}), "invalid_method", "method"),
    Bad("huge-url", line({**request(), "url": HUGE}), "invalid_url", "url"),
    Bad("huge-model", line(request(model=HUGE)), "invalid_request", "body.model"),
    Bad("huge-unknown-field", line({**request(), HUGE: 1}), "invalid_request", "x*"),
    Bad("custom-id-too-long", line(request(custom_id="c" * 600)), "invalid_request",
        "custom_id"),
    Bad("custom-id-not-a-string", line({**request(), "custom_id": 7}), "invalid_request",
        "custom_id"),
    Bad("body-not-an-object", line({**request(), "body": "hi"}), "invalid_request", "body"),
    Bad("message-without-role", line(request(messages=[{"content": "hi"}])),
        "missing_required_parameter", "body.messages.0.role"),
    Bad("content-a-number", line(request(messages=[{"role": "user", "content": 5}])),
        "invalid_request", "body.messages.0.content"),
    Bad("bom-mid-file", "\ufeff".encode() + line(request()), "invalid_json_line", None),
    Bad("invalid-utf8", b'{"custom_id": "\xff\xfe"}', "invalid_utf8", None),
    Bad("not-an-object", b"[1, 2, 3]", "invalid_json_line", None),
    Bad("truncated", line(request())[:-10], "invalid_json_line", None),
    Bad("nul-bytes", b"\x00" * 64, "invalid_json_line", None),
]  # fmt: skip

ODD_BUT_VALID: list[bytes] = [
    line(request("emoji-pair", messages=[{"role": "user", "content": "\U0001f600 hi"}])),
    line(request("rtl-and-zwj", messages=[{"role": "user", "content": "שלום \u200d\u202e abc"}])),
    line(request("nul-char", messages=[{"role": "user", "content": "a\u0000b"}])),
    line(request("unicode-custom-id-\u00e9\u4e2d", max_tokens=2)),
    line(request("deep-but-allowed", extra=[[[[[[[[[[1]]]]]]]]]])),
    # Valid lines whose requests fail in the engine: error lines, the batch goes on.
    line(request("too-long-prompt", messages=[{"role": "user", "content": "word " * 3000}])),
    line(request("own-chat-template", chat_template="{{ 'pwned' }}")),
    # Values of the right type out of range: each its own error line (they failed the whole
    # batch at validation while `temperature: -1` did not).
    line(request("n-above-128", n=1000)),
    line(request("max-tokens-zero", max_tokens=0)),
    line(request("max-completion-tokens-negative", max_completion_tokens=-1)),
    line(request("top-logprobs-100", logprobs=True, top_logprobs=100)),
    line(request("messages-empty", messages=[])),
    # vLLM's refusals, told in the request's own words (they named a union member, a class, or
    # a server flag).
    line(request("stop-100-strings", stop=[f"s{i}" for i in range(100)])),
    line(
        request(
            "developer-content-null",
            messages=[{"role": "developer", "content": None}, {"role": "user", "content": "hi"}],
        )
    ),
    line(request("media-io-kwargs", media_io_kwargs={"image": {"x": 1}})),
]
# What each odd line's error line says (code, param): the others are answered.
ODD_ERRORS = {
    "too-long-prompt": ("context_length_exceeded", None),
    "own-chat-template": ("invalid_request", "chat_template"),
    "n-above-128": ("invalid_value", "n"),
    "max-tokens-zero": ("invalid_value", "max_tokens"),
    "max-completion-tokens-negative": ("invalid_value", "max_completion_tokens"),
    "top-logprobs-100": ("invalid_value", "top_logprobs"),
    "messages-empty": ("invalid_value", "messages"),
    "stop-100-strings": ("invalid_request", "stop"),
    "developer-content-null": ("invalid_request", "messages.0.content"),
    "media-io-kwargs": ("invalid_request", "media_io_kwargs"),
}


def bad_file(bad: Bad) -> bytes:
    """A batch file whose second line is ``bad``: what an error must name is line 2."""
    return line(request("first")) + b"\n" + bad.raw + b"\n" + line(request("third")) + b"\n"


def param_matches(expected: str | None, got: str | None) -> bool:
    if expected is None:
        return got is None
    if expected.endswith("*"):
        return got is not None and got.startswith(expected[:-1])
    return got == expected


# ---- every other surface that reads JSON ------------------------------------------------------

# JSON values no field of vbs accepts, as the raw text a client sends in place of a value: not
# JSON at all, JSON that Python reads into something no store can write back (NaN, a lone
# surrogate), or that breaks a reader (nesting, digits). Each surface below puts them where a
# value goes and must answer 400 (or an error line) naming where, storing nothing.
HOSTILE_VALUES: dict[str, bytes] = {
    "nan": b"NaN",
    "infinity": b"-Infinity",
    "float-overflow": b"1e999",
    "integer-past-int64": str(2**70).encode(),
    "integer-of-5000-digits": b"1" + b"0" * 5000,
    "lone-surrogate": b'"a\\ud800b"',
    "surrogate-key": b'{"\\udc00": 1}',
    "duplicate-key": b'{"a": 1, "a": 2}',
    "deep-nesting-100k": b"[" * 100_000 + b"]" * 100_000,
    "deep-nesting-200": b"[" * 200 + b"]" * 200,
    "bare-word": b"undefined",
}


def body_with(template: str, value: bytes) -> bytes:
    """``template`` (JSON text with one ``$V``) with a hostile value put in place of ``$V``."""
    head, tail = template.encode().split(b"$V")
    return head + value + tail


# Cursors a list endpoint must refuse with 400 (never a 500, never an empty 200).
HOSTILE_CURSORS = ("nobody-00000000", "x" * 90, "\u0663\u0661", "../../etc", "a b", "\u00e9")
