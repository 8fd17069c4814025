"""A multipart upload streamed straight into the bucket.

Starlette's form parser spools every file to a temporary file before a handler sees it, so a
limit checked in the handler comes after the whole body was written to disk. Here the body is
parsed as it arrives (``python_multipart``, the parser Starlette itself uses) and the file part
is written to a staged bucket file that is cut off the moment it passes the limit: no more than
the limit ever reaches the disk, and nothing stays behind when an upload is refused.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import anyio
from python_multipart import MultipartParser
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import parse_options_header

from vbs_api.errors import APIError
from vbs_resources import Bucket
from vbs_resources.bucket import StagedFile

MAX_FIELD_BYTES = 1024
_UNSAFE = re.compile(r"[\x00-\x1f\x7f/\\]")


@dataclass
class Upload:
    """What arrived: the file (staged, not yet committed) and the form's other fields."""

    staged: StagedFile | None = None
    filename: str | None = None
    fields: dict[str, str] = field(default_factory=dict)


def clean_filename(raw: bytes) -> str:
    """A client's file name, safe to store and show: its last path component, without control
    characters, valid UTF-8, at most 255 characters."""
    name = raw.decode("utf-8", "replace").replace("\\", "/").rsplit("/", 1)[-1]
    name = _UNSAFE.sub("_", name).strip() or "upload.jsonl"
    return name[:255]


class _Parts:
    """python_multipart callbacks that route each part: the ``file`` part into the bucket, small
    fields into memory."""

    def __init__(self, bucket: Bucket, target: str, max_bytes: int) -> None:
        self.bucket, self.target, self.max_bytes = bucket, target, max_bytes
        self.upload = Upload()
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name: str | None = None
        self._value = bytearray()
        self.ended = False  # the closing boundary arrived

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field_data,
            "on_header_value": self._header_value_data,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _end(self) -> None:
        self.ended = True

    def _part_begin(self) -> None:
        self._headers, self._name, self._value = {}, None, bytearray()

    def _header_field_data(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field, self._header_value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition"))
        self._name = options.get(b"name", b"").decode("latin-1")
        if self._name == "file":
            if self.upload.staged is not None:
                raise APIError(400, "Send one file per upload.", param="file")
            self.upload.filename = clean_filename(options.get(b"filename", b"upload.jsonl"))
            self.upload.staged = self.bucket.stage(self.target)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._name == "file":
            staged = self.upload.staged
            assert staged is not None
            if staged.size + (end - start) > self.max_bytes:
                raise APIError(
                    413,
                    f"File is larger than the {self.max_bytes}-byte limit.",
                    code="file_too_large",
                    param="file",
                )
            staged.write(data[start:end])
        else:
            self._value += data[start:end]
            if len(self._value) > MAX_FIELD_BYTES:
                raise APIError(400, f"The form field {self._name!r} is too long.")

    def _part_end(self) -> None:
        if self._name and self._name != "file":
            self.upload.fields[self._name[:64]] = self._value.decode("utf-8", "replace")


async def receive_upload(
    stream: AsyncIterator[bytes], content_type: str, bucket: Bucket, target: str, max_bytes: int
) -> Upload:
    """Parse a ``multipart/form-data`` body, writing its ``file`` part to a staged bucket file
    at ``target`` (committed by the caller). Bucket writes run in a worker thread, so the event
    loop keeps serving other requests."""
    kind, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise APIError(400, "Upload a file as multipart/form-data.", param="file")
    parts = _Parts(bucket, target, max_bytes)
    parser = MultipartParser(boundary, parts.callbacks())
    try:
        try:
            async for chunk in stream:
                if chunk:
                    await anyio.to_thread.run_sync(parser.write, chunk)
            parser.finalize()
        except FormParserError:
            raise APIError(400, "The upload is not valid multipart/form-data.") from None
        if not parts.ended:  # python_multipart's finalize() does not check this itself
            raise APIError(400, "The upload ended before its closing boundary.", param="file")
    except BaseException:
        if parts.upload.staged is not None:
            parts.upload.staged.abort()
        raise
    return parts.upload
