"""Records of a conquest type: the data a typed batch's prompts were rendered from.

``vbs conquests submit`` checks each record against its type and uploads them as a
``user_data`` file beside the batch. Whoever names such a file (``metadata.conquest_records_file``)
has it checked the same way when the batch is created: every line strict JSON, every record of
the type, each ``custom_id`` once, and each record tied to the request actually sent for its
``custom_id`` (the prompt rendered from the record is that request's messages). A record that is
not what its request asked can then never put an answer to one prompt under another in a
dataset.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from vbs_resources.curation.types import ConquestType, RecordError
from vbs_resources.strict_json import JSONError, loads


def check_records(
    conquest_type: ConquestType, lines: Iterable[bytes]
) -> tuple[list[tuple[str, dict[str, Any], int]], list[str]]:
    """(custom_id, data, line number) for each good record of ``lines``, and one message per
    bad line, with its number and field. Blank lines are skipped."""
    good: list[tuple[str, dict[str, Any], int]] = []
    errors: list[str] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = loads(raw)
            data = conquest_type.check_record(record)
        except JSONError as exc:
            where = f" (field {exc.path})" if exc.path else ""
            errors.append(f"line {number}{where}: {exc}")
            continue
        except RecordError as exc:
            where = f" (field {exc.field})" if exc.field else ""
            errors.append(f"line {number}{where}: {exc}")
            continue
        custom_id = record.get("custom_id") or f"{conquest_type.id}-{number}"
        if custom_id in seen:
            errors.append(
                f"line {number} (field custom_id): {custom_id[:64]!r} is also line {seen[custom_id]}"
            )
            continue
        seen[custom_id] = number
        good.append((custom_id, data, number))
    return good, errors


def requested_messages(lines: Iterable[bytes]) -> dict[str, Any]:
    """custom_id -> the messages (or prompt) of each request of a batch input file; lines that
    do not parse are left to the batch's own validation."""
    found: dict[str, Any] = {}
    for raw in lines:
        if not raw.strip():
            continue
        try:
            line = loads(raw)
        except JSONError:
            continue
        if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str):
            continue
        body = line.get("body") if isinstance(line.get("body"), dict) else {}
        found[line["custom_id"]] = body.get("messages", body.get("prompt"))
    return found


def matches_request(conquest_type: ConquestType, data: dict[str, Any], sent: Any) -> bool:
    """Whether the request sent is the prompt the type renders from the record."""
    try:
        return conquest_type.prompt(data) == sent
    except RecordError:
        return False


def tie_records(
    conquest_type: ConquestType,
    records: list[tuple[str, dict[str, Any], int]],
    requests: dict[str, Any],
) -> list[str]:
    """One message per record (by line) that is not tied to its batch's request: its custom_id
    names no request, or the request sent is not the prompt the record renders."""
    errors = []
    for custom_id, data, number in records:
        if custom_id not in requests:
            errors.append(
                f"line {number} (field custom_id): {custom_id[:64]!r} names no request of the batch"
            )
        elif not matches_request(conquest_type, data, requests[custom_id]):
            errors.append(
                f"line {number}: the prompt this record renders is not the request sent for "
                f"{custom_id[:64]!r}"
            )
    return errors
