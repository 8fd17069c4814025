"""Strict JSON: what every JSON text from outside (batch lines, API bodies, sidecars) goes
through before anything else touches it.

Python's ``json`` accepts texts that break later, far from where they came in: ``NaN`` and
``Infinity`` (not JSON), ``1e999`` (becomes ``inf``), duplicate keys (the last silently wins),
lone surrogates such as ``"\\ud800"`` (valid JSON, but not encodable as UTF-8: Parquet, SQLite
and HTTP responses refuse them later), nesting deep enough to exhaust the stack, and integers
too long to convert. ``loads`` refuses each of them with a ``JSONError`` that names the field.
The checks that need a walk of the parsed value run only when a cheap scan of the raw text says
they can matter, so ordinary lines pay almost nothing.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_DEPTH = 64
# Beyond +-2**63 an integer is not representable by most JSON consumers (and vLLM's).
_INT_LIMIT = 2**63
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class JSONError(ValueError):
    """Why a JSON text was refused; ``path`` is the dotted field at fault, if there is one."""

    def __init__(self, message: str, path: str | None = None, kind: str = "json") -> None:
        super().__init__(message)
        self.message, self.path = message, path
        self.kind = kind  # "utf8": the bytes are not UTF-8; "json": anything else


def quote(value: Any, limit: int = 40) -> str:
    """``repr`` of a client's value for an error message, cut to ``limit`` characters so that no
    error message grows with the input."""
    text = value if isinstance(value, str) else repr(value)
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) > limit:
        text = text[:limit] + "..."
    return repr(text) if isinstance(value, str) else text


def _constant(name: str) -> float:
    raise JSONError(f"{name} is not valid JSON (use a number or null)")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JSONError(f"the number {quote(text)} is out of range")
    return value


def _int(text: str) -> int:
    if len(text) > 20:  # cheap first: 2**63 has 19 digits
        raise JSONError(f"the integer {quote(text)} is out of range")
    value = int(text)
    if not -_INT_LIMIT <= value < _INT_LIMIT:
        raise JSONError(f"the integer {quote(text)} is out of range")
    return value


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise JSONError(f"duplicate key {quote(key)}", key)
            seen.add(key)
    return obj


_DECODER = json.JSONDecoder(
    parse_float=_float, parse_int=_int, parse_constant=_constant, object_pairs_hook=_pairs
)


def _walk(value: Any, max_depth: int, check_strings: bool) -> None:
    """Depth and unencodable strings, without recursion (a deep value cannot break it)."""
    stack: list[tuple[Any, tuple[Any, ...]]] = [(value, ())]
    while stack:
        node, path = stack.pop()
        if len(path) > max_depth:
            raise JSONError(
                f"the value is nested more than {max_depth} levels deep",
                _dotted(path[:max_depth]),
            )
        if isinstance(node, dict):
            for key, item in node.items():
                if check_strings:
                    _encodable(key, path + (key,))
                stack.append((item, path + (key,)))
        elif isinstance(node, list):
            stack.extend((item, path + (i,)) for i, item in enumerate(node))
        elif check_strings and isinstance(node, str):
            _encodable(node, path)


def _encodable(text: str, path: tuple[Any, ...]) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise JSONError(
            f"the string holds an unpaired surrogate (\\u{ord(text[exc.start]):04x}) at "
            f"character {exc.start + 1}, which is not valid Unicode",
            _dotted(path),
        ) from None


def _dotted(path: tuple[Any, ...]) -> str | None:
    """The field's dotted path, printable whatever its keys hold (a key may be the bad string)."""
    text = ".".join(str(p) for p in path)
    return text.encode("utf-8", "backslashreplace").decode("utf-8") or None


def loads(raw: bytes | str, max_depth: int = MAX_DEPTH) -> Any:
    """Parse one JSON text strictly (see the module docstring); raises ``JSONError``."""
    if isinstance(raw, str):
        text = raw
    else:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JSONError(
                f"the text is not valid UTF-8 (byte {exc.start + 1})", kind="utf8"
            ) from None
    try:
        value = _DECODER.decode(text)
    except JSONError:
        raise
    except json.JSONDecodeError as exc:
        raise JSONError(f"{exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise JSONError(f"the value is nested more than {max_depth} levels deep") from None
    except ValueError as exc:  # e.g. Python's limit on integer digits
        raise JSONError(f"a value is out of range: {quote(str(exc), 80)}") from None
    deep = text.count("[") + text.count("{") > max_depth
    # Lone surrogates reach a str only through \u escapes (raw UTF-8 cannot encode them); a
    # str handed in may hold them directly.
    surrogates = isinstance(raw, str) or _SURROGATE_ESCAPE.search(text) is not None
    if deep or surrogates:
        _walk(value, max_depth, surrogates)
    return value


def dumps(value: Any) -> str:
    """``value`` as JSON text, refusing what is not JSON (``NaN``, ``Infinity``, strings with
    lone surrogates, values nested too deep to encode) with a ``JSONError``. The catalog writes
    every JSON column through this, so nothing it stores can fail to read back or to encode."""
    try:
        text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except RecursionError:
        raise JSONError("the value is nested too deep to store") from None
    except ValueError as exc:
        raise JSONError(f"the value is not JSON: {quote(str(exc), 80)}") from None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise JSONError(
            f"a string holds an unpaired surrogate (\\u{ord(text[exc.start]):04x}), which is not "
            "valid Unicode"
        ) from None
    return text
