"""The bucket: where batch files, results, datasets and adapters live.

A local folder by default; any fsspec URL (``s3://``, ``gs://``, ``memory://``) in production.
Paths handed to the bucket are always built by vbs from opaque ids, never taken from a client.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import stat
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import dagster as dg
import fsspec
from fsspec.implementations.local import LocalFileSystem
from pydantic import PrivateAttr


@dataclass(frozen=True)
class BucketEntry:
    """An entry of a bucket folder, with what the inbox sensor needs to tell if it is still
    growing (size, modification time) and what it must refuse (folders, symbolic links, and
    anything that is not a regular file: a FIFO, a socket, a device, which reading would block
    on or misread)."""

    name: str
    size: int
    modified: str
    is_dir: bool = False
    is_link: bool = False
    is_special: bool = False


class Bucket(dg.ConfigurableResource):
    """A folder tree behind fsspec: ``inbox/``, ``batches/<batch_id>/...``, later ``datasets/``."""

    url: str

    _fs: Any = PrivateAttr(default=None)
    _root: str = PrivateAttr(default="")

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._fs is None:
            fs, root = fsspec.core.url_to_fs(self.url)
            self._fs, self._root = fs, root.rstrip("/")
            if isinstance(fs, LocalFileSystem):
                fs.makedirs(self._root, exist_ok=True)
        return self._fs

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        """The full path of ``parts`` (relative, '/'-separated) inside the bucket."""
        self.fs  # noqa: B018 - resolves the root
        rel = posixpath.normpath(posixpath.join(*parts))
        if rel.startswith("..") or posixpath.isabs(rel):
            raise ValueError(f"path {rel!r} escapes the bucket")
        return f"{self._root}/{rel}"

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def open(self, rel: str, mode: str = "rb") -> IO[Any]:
        if "w" in mode or "a" in mode:
            self.fs.makedirs(posixpath.dirname(self.path(rel)), exist_ok=True)
        return self.fs.open(self.path(rel), mode)

    def size(self, rel: str) -> int:
        return int(self.fs.size(self.path(rel)))

    def read_bytes(self, rel: str) -> bytes:
        with self.open(rel, "rb") as fh:
            return fh.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8")

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole file so that readers see either the old or the new content, never half."""
        with self.atomic_writer(rel) as fh:
            fh.write(data)

    @contextlib.contextmanager
    def atomic_writer(self, rel: str) -> Iterator[IO[bytes]]:
        """Stream into a temporary sibling, then rename over ``rel`` (object stores: one PUT)."""
        target = self.path(rel)
        self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        if not self.is_local:
            with self.fs.open(target, "wb") as fh:
                yield fh
            return
        tmp = f"{posixpath.dirname(target)}/.{posixpath.basename(target)}.{uuid.uuid4().hex}.tmp"
        try:
            with open(tmp, "wb") as fh:
                yield fh
                fh.flush()
            self.fs.mv(tmp, target)
        finally:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)

    def stage(self, rel: str) -> StagedFile:
        """A file written piece by piece that appears at ``rel`` only on ``commit()``; ``abort()``
        leaves nothing behind. For writes driven from outside (an upload read from a socket)."""
        return StagedFile(self, rel)

    def list_entries(self, folder: str) -> list[BucketEntry]:
        """Everything directly inside ``folder`` (no recursion), sorted by name."""
        base = self.path(folder)
        if not self.fs.exists(base):
            return []
        entries = []
        for info in self.fs.ls(base, detail=True):
            modified = info.get("mtime") or info.get("LastModified") or info.get("ETag") or ""
            kind = info.get("type")
            entries.append(
                BucketEntry(
                    name=posixpath.basename(info["name"].rstrip("/")),
                    size=int(info.get("size") or 0),
                    modified=str(modified),
                    is_dir=kind == "directory",
                    is_link=bool(info.get("islink")),
                    # fsspec's local listing says "other" for FIFOs, sockets and devices.
                    is_special=kind not in ("file", "directory"),
                )
            )
        return sorted(entries, key=lambda e: e.name)

    def list_files(self, folder: str) -> list[BucketEntry]:
        """Plain files directly inside ``folder`` (no folders, no links, nothing special),
        sorted by name."""
        return [
            e
            for e in self.list_entries(folder)
            if not e.is_dir and not e.is_link and not e.is_special
        ]

    def is_regular_file(self, rel: str) -> bool:
        """Whether ``rel`` is a regular file now (not a FIFO, a socket, a device, a link or a
        folder): checked again right before a file is opened, since it may have been replaced
        since it was listed. An object store holds nothing else."""
        if not self.is_local:
            return True
        try:
            mode = os.lstat(self.path(rel)).st_mode
        except OSError:
            return False
        return stat.S_ISREG(mode)

    def sha256(self, rel: str, block: int = 1 << 20) -> str:
        digest = hashlib.sha256()
        with self.open(rel, "rb") as fh:
            while data := fh.read(block):
                digest.update(data)
        return digest.hexdigest()

    def copy(self, src: str, dst: str, block: int = 1 << 20) -> None:
        """Stream ``src`` into ``dst`` through ``atomic_writer``: ``dst`` appears whole or not."""
        with self.atomic_writer(dst) as out, self.open(src) as fh:
            while data := fh.read(block):
                out.write(data)

    def move(self, src: str, dst: str) -> None:
        self.fs.makedirs(posixpath.dirname(self.path(dst)), exist_ok=True)
        self.fs.mv(self.path(src), self.path(dst))

    def remove(self, rel: str) -> None:
        """Remove one file; a file that is already gone is fine."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.path(rel))

    def remove_tree(self, rel: str) -> None:
        if self.fs.exists(self.path(rel)):
            self.fs.rm(self.path(rel), recursive=True)


class StagedFile:
    """See ``Bucket.stage``: local buckets write a hidden sibling and rename it on commit; object
    stores write the object itself (one PUT when closed) and delete it on abort."""

    def __init__(self, bucket: Bucket, rel: str) -> None:
        self.bucket, self.rel = bucket, rel
        self.size = 0
        self.digest = hashlib.sha256()
        target = bucket.path(rel)
        bucket.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        if bucket.is_local:
            name = f".{posixpath.basename(target)}.{uuid.uuid4().hex}.tmp"
            self._written = f"{posixpath.dirname(target)}/{name}"
            self._fh: IO[bytes] = open(self._written, "wb")  # noqa: SIM115 - closed in commit/abort
        else:
            self._written = target
            self._fh = bucket.fs.open(target, "wb")

    def write(self, data: bytes) -> None:
        self._fh.write(data)
        self.digest.update(data)
        self.size += len(data)

    def commit(self) -> str:
        """Put the file in place; returns its sha256."""
        self._fh.close()
        if self._written != self.bucket.path(self.rel):
            self.bucket.fs.mv(self._written, self.bucket.path(self.rel))
        return self.digest.hexdigest()

    def abort(self) -> None:
        # fsspec's buffered object-store files can drop their upload instead of finishing it.
        discard = getattr(self._fh, "discard", None)
        with contextlib.suppress(Exception):
            discard() if callable(discard) else self._fh.close()
        with contextlib.suppress(FileNotFoundError):
            self.bucket.fs.rm(self._written)
