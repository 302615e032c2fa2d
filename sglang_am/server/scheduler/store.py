"""``DocumentStore``: compacted documents saved under one directory the server owns.

Clients name a stored document by its id, never by a path, so a request cannot make the server read or
write anywhere else; files are ``<root>/<doc_id>.safetensors`` in the ``CompactedPrefix`` format.
Several server processes may share a root: every write goes to a fresh temporary file renamed over the
old one (``write_atomically``), so concurrent writers and crashes leave either copy whole, never a mix.
Errors are ``StoreError`` with an HTTP status and a message that names the document, not the root.

``Handoffs`` is the same format under ``<root>/handoff/<nonce>/``: with ``--dp-size N`` the rank that
compacted a document writes it there once, and the other ranks install it from there.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path
from typing import BinaryIO

from ...prefix import TEMPORARY_PREFIX, CompactedPrefix, read_metadata, write_atomically
from .. import faults
from ..errors import DocumentError

DOCUMENT_ID = re.compile(r"[0-9a-f]{64}")
HANDOFF_NONCE = re.compile(r"[0-9a-f]{32}")
HANDOFF_DIRECTORY = "handoff"
SUFFIX = ".safetensors"
# A writer keeps its temporary file's mtime fresh; one untouched this long was left by a crash.
STALE_TEMPORARY_SECONDS = 3600
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# O_NONBLOCK: opening a FIFO planted in the root must not hang the I/O thread.
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class StoreError(DocumentError):
    """A refused store operation: ``status`` is the HTTP status to answer with."""


def check_document_id(doc_id: object) -> str:
    """Ids are the only names clients give, and this shape cannot spell a path (no ``/``, ``..``)."""
    if not isinstance(doc_id, str) or not DOCUMENT_ID.fullmatch(doc_id):
        raise StoreError(HTTPStatus.BAD_REQUEST, f"document id must be 64 lowercase hex characters, not {doc_id!r:.80}")
    return doc_id


class DocumentStore:
    """Saves, loads, lists and deletes compacted documents under ``root``, within ``quota_bytes``."""

    def __init__(self, root: str | Path, quota_bytes: int):
        if quota_bytes < 0:
            raise ValueError(f"store quota must be >= 0 bytes, not {quota_bytes}")
        Path(root).mkdir(mode=0o700, parents=True, exist_ok=True)
        self.root = Path(root).resolve()
        self.quota_bytes = quota_bytes
        self._remove_stale_temporaries()

    def path(self, doc_id: str) -> Path:
        return self.root / f"{check_document_id(doc_id)}{SUFFIX}"

    def save(self, doc_id: str, prefix: CompactedPrefix) -> int:
        """Store ``prefix`` as ``doc_id``, replacing any previous copy only once the new one is on disk;
        returns the bytes written."""
        path = self.path(doc_id)
        self._check_quota(doc_id, prefix.nbytes)  # before serializing a prefix that cannot fit anyway
        try:
            data = prefix.to_bytes()
        except ValueError as error:
            raise StoreError(HTTPStatus.INTERNAL_SERVER_ERROR, f"document {doc_id} cannot be saved: {error}") from None
        self._check_quota(doc_id, len(data))
        try:
            faults.inject("store_slow")
            faults.inject("store_write")
            write_atomically(path, data)
        except OSError as error:
            if error.errno in DISK_FULL:
                raise StoreError(
                    HTTPStatus.INSUFFICIENT_STORAGE,
                    f"disk full: document {doc_id} ({len(data)} bytes) was not saved; delete stored documents "
                    f"or free space on the store's disk",
                ) from None
            raise _failed("save", doc_id, error) from None
        return len(data)

    def load(self, doc_id: str, expected_fingerprint: dict | None) -> CompactedPrefix:
        """Read and fully validate the stored copy (on the CPU), in one read."""
        try:
            with self._open_regular(doc_id) as handle:
                data = handle.read()
        except OSError as error:
            raise _failed("read", doc_id, error) from None
        try:
            return CompactedPrefix.from_bytes(data, expected_fingerprint)
        except ValueError as error:
            raise StoreError(HTTPStatus.BAD_REQUEST, f"stored document {doc_id}: {error}") from None

    def exists(self, doc_id: str) -> bool:
        """True when a regular file holds ``doc_id`` (a symlink does not count)."""
        try:
            return stat.S_ISREG(os.lstat(self.path(doc_id)).st_mode)
        except FileNotFoundError:
            return False

    def delete(self, doc_id: str) -> bool:
        """Remove the stored copy; False when there was none. A symlink is removed itself, never its target."""
        try:
            os.unlink(self.path(doc_id))
        except FileNotFoundError:
            return False
        except IsADirectoryError:
            raise _not_regular(doc_id) from None
        except OSError as error:
            raise _failed("delete", doc_id, error) from None
        return True

    def used_bytes(self) -> int:
        """Bytes of the regular files directly under the root, other writers' temporary files included
        (they take disk space too)."""
        total = 0
        with os.scandir(self.root) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):  # removed by another process meanwhile
                    if entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
        return total

    def list(self) -> list[dict]:
        """Stored documents by id, with T, t and method from each file's header (no tensor is read);
        entries that cannot be read are left out."""
        documents = []
        with os.scandir(self.root) as entries:
            names = sorted(entry.name for entry in entries)
        for name in names:
            doc_id = name.removesuffix(SUFFIX)
            if not name.endswith(SUFFIX) or not DOCUMENT_ID.fullmatch(doc_id):
                continue
            try:
                with self._open_regular(doc_id) as handle:
                    size = os.fstat(handle.fileno()).st_size
                    metadata = read_metadata(handle)
                documents.append({
                    "doc_id": doc_id, "bytes": size, "T": metadata["logical_length"],
                    "t": max(metadata["layer_slots"]), "method": metadata["method"],
                })
            except (StoreError, OSError, ValueError, KeyError, TypeError):
                continue
        return documents

    @contextlib.contextmanager
    def _open_regular(self, doc_id: str) -> Iterator[BinaryIO]:
        """The stored file, opened without following a symlink and refused unless regular, so nothing
        outside the root is ever read."""
        try:
            descriptor = os.open(self.path(doc_id), READ_FLAGS)
        except FileNotFoundError:
            raise StoreError(HTTPStatus.NOT_FOUND, f"no stored document {doc_id}") from None
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise _not_regular(doc_id) from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(descriptor).st_mode):
                raise _not_regular(doc_id)
            with open(descriptor, "rb", closefd=False) as handle:
                yield handle
        finally:
            os.close(descriptor)

    def _check_quota(self, doc_id: str, size: int) -> None:
        used = self.used_bytes()
        with contextlib.suppress(FileNotFoundError):
            info = os.lstat(self.path(doc_id))
            if stat.S_ISREG(info.st_mode):
                used -= info.st_size  # the copy this save replaces
        if used + size > self.quota_bytes:
            raise StoreError(
                HTTPStatus.INSUFFICIENT_STORAGE,
                f"document {doc_id} needs {size} bytes, over the store quota of {self.quota_bytes} bytes "
                f"({used} used by other files); delete stored documents or raise --am-store-quota-bytes",
            )

    def _remove_stale_temporaries(self) -> None:
        """Temporary files a crashed writer left; fresh ones may belong to another live process."""
        now = time.time()
        with os.scandir(self.root) as entries:
            for entry in entries:
                if not entry.name.startswith(TEMPORARY_PREFIX):
                    continue
                with contextlib.suppress(OSError):  # another process may remove it first
                    info = entry.stat(follow_symlinks=False)
                    if stat.S_ISREG(info.st_mode) and now - info.st_mtime > STALE_TEMPORARY_SECONDS:
                        os.unlink(entry.path)


class Handoffs:
    """Documents passed from one data-parallel rank to the others: each in a directory of its own, named by a
    nonce the writer draws, removed once every rank has read it (or, after a crash, when stale)."""

    def __init__(self, store_root: Path, quota_bytes: int):
        self.root, self.quota_bytes = Path(store_root) / HANDOFF_DIRECTORY, quota_bytes
        self.root.mkdir(mode=0o700, exist_ok=True)
        now = time.time()
        with os.scandir(self.root) as entries:
            for entry in entries:
                with contextlib.suppress(OSError):  # another process may remove it first
                    if entry.is_dir(follow_symlinks=False) and now - entry.stat().st_mtime > STALE_TEMPORARY_SECONDS:
                        shutil.rmtree(entry.path)

    def _directory(self, nonce: str) -> Path:
        if not isinstance(nonce, str) or not HANDOFF_NONCE.fullmatch(nonce):
            raise StoreError(HTTPStatus.BAD_REQUEST, f"handoff must be 32 lowercase hex characters, not {nonce!r:.80}")
        return self.root / nonce

    def _store(self, nonce: str) -> DocumentStore:
        return DocumentStore(self._directory(nonce), self.quota_bytes)

    def write(self, doc_id: str, prefix: CompactedPrefix) -> str:
        """Write ``prefix``; returns the nonce the readers name it by."""
        nonce = uuid.uuid4().hex
        self._store(nonce).save(doc_id, prefix)
        return nonce

    def read(self, nonce: str, doc_id: str, expected_fingerprint: dict | None) -> CompactedPrefix:
        return self._store(nonce).load(doc_id, expected_fingerprint)

    def remove(self, nonce: str) -> None:
        shutil.rmtree(self._directory(nonce), ignore_errors=True)


def _not_regular(doc_id: str) -> StoreError:
    return StoreError(HTTPStatus.BAD_REQUEST, f"stored document {doc_id} is not a regular file in the store")


def _failed(action: str, doc_id: str, error: OSError) -> StoreError:
    """The OS's reason without the file name, which would reveal the root."""
    return StoreError(HTTPStatus.INTERNAL_SERVER_ERROR, f"cannot {action} document {doc_id}: {error.strerror or error}")
