"""``DocumentStore``: ids instead of paths, quota and disk-full refusals, symlinks refused, and a writer
killed mid-save never leaving a corrupt copy."""

import contextlib
import errno
import itertools
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sglang_am.prefix import CompactedPrefix
from sglang_am.server.scheduler.store import DocumentStore, Handoffs, StoreError, check_document_id

FINGERPRINT = {"model_type": "llama", "weights": "abc123"}
A, B, C = "a" * 64, "0123456789abcdef" * 4, "c" * 64
QUOTA = 1 << 30


def _prefix(slots=(4, 3), heads=2, dim=8, length=6, seed=0, method="AM-OMP") -> CompactedPrefix:
    generator = torch.Generator().manual_seed(seed)
    return CompactedPrefix(
        keys=[torch.randn(heads, t, dim, generator=generator) for t in slots],
        values=[torch.randn(heads, t, dim, generator=generator) for t in slots],
        beta=[torch.randn(heads, t, generator=generator) for t in slots],
        logical_length=length, token_ids=list(range(length)), fingerprint=FINGERPRINT, method=method,
        config={"version": seed},
    )


def _assert_same(a: CompactedPrefix, b: CompactedPrefix) -> None:
    for x, y in zip(a.keys + a.values + a.beta, b.keys + b.values + b.beta):
        assert torch.equal(x, y)
    assert (a.token_ids, a.config, a.method) == (b.token_ids, b.config, b.method)


@pytest.fixture
def store(tmp_path):
    return DocumentStore(tmp_path / "store", quota_bytes=QUOTA)


@contextlib.contextmanager
def _refused(status: int, match: str = ""):
    with pytest.raises(StoreError, match=match) as raised:
        yield
    assert raised.value.status == status, raised.value.message


@pytest.mark.parametrize(
    "doc_id",
    ["../x", "/etc/passwd", "A" * 64, "a" * 63, "a" * 65, "g" * 64, "a" * 64 + "\n", "../" + "a" * 61, "", None],
)
def test_only_64_lowercase_hex_ids_are_accepted(store, doc_id):
    for operation in (lambda: store.save(doc_id, _prefix()), lambda: store.load(doc_id, None),
                      lambda: store.exists(doc_id), lambda: store.delete(doc_id), lambda: check_document_id(doc_id)):
        with _refused(400, "64 lowercase hex characters"):
            operation()
    assert os.listdir(store.root) == []


def test_save_load_round_trip(tmp_path):
    store = DocumentStore(tmp_path / "new" / "store", quota_bytes=QUOTA)
    assert store.root.stat().st_mode & 0o777 == 0o700
    prefix = _prefix()
    written = store.save(A, prefix)
    assert written == (store.root / f"{A}.safetensors").stat().st_size == store.used_bytes()
    assert store.exists(A) and not store.exists(B)
    _assert_same(prefix, store.load(A, FINGERPRINT))
    assert store.delete(A) and not store.exists(A) and not store.delete(A)
    with _refused(404, f"no stored document {A}"):
        store.load(A, FINGERPRINT)


def test_quota_counts_the_replaced_copy_and_refuses_before_writing(tmp_path):
    prefix = _prefix()
    size = len(prefix.to_bytes())
    store = DocumentStore(tmp_path / "store", quota_bytes=size)
    store.save(A, prefix)
    store.save(A, _prefix(seed=1))  # replaces A, so it fits
    with _refused(507, f"store quota of {size} bytes .*; delete stored documents or raise --am-store-quota"):
        store.save(B, prefix)
    assert os.listdir(store.root) == [f"{A}.safetensors"]
    _assert_same(_prefix(seed=1), store.load(A, FINGERPRINT))

    tiny = DocumentStore(tmp_path / "tiny", quota_bytes=100)
    with _refused(507, "store quota of 100 bytes"):
        tiny.save(A, prefix)
    assert os.listdir(tiny.root) == []


def test_symlink_is_refused_and_delete_removes_only_the_link(store, tmp_path):
    outside = _prefix().save(tmp_path / "outside.safetensors")
    link = store.root / f"{A}.safetensors"
    link.symlink_to(outside)
    with _refused(400, f"stored document {A} is not a regular file in the store"):
        store.load(A, FINGERPRINT)
    assert not store.exists(A) and store.list() == [] and store.used_bytes() == 0
    assert store.delete(A)
    assert not os.path.lexists(link) and outside.is_file()
    CompactedPrefix.load(outside)


@pytest.mark.timeout(60)  # a FIFO opened without O_NONBLOCK would block forever
def test_directory_or_fifo_under_an_id_is_refused(store):
    (store.root / f"{A}.safetensors").mkdir()
    os.mkfifo(store.root / f"{B}.safetensors")
    for doc_id in (A, B):
        with _refused(400, "not a regular file in the store"):
            store.load(doc_id, FINGERPRINT)
        assert not store.exists(doc_id)
    with _refused(400, "not a regular file in the store"):
        store.delete(A)
    assert store.list() == [] and store.used_bytes() == 0


def test_corrupt_or_foreign_copies_are_refused_without_naming_the_root(store):
    store.save(A, _prefix())
    with _refused(400, "fingerprint mismatch"):
        store.load(A, {"model_type": "other"})
    path = store.root / f"{A}.safetensors"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(StoreError) as raised:
        store.load(A, FINGERPRINT)
    assert raised.value.status == 400 and A in raised.value.message and str(store.root) not in raised.value.message
    assert "corrupt or truncated" in raised.value.message


def test_list_reads_headers_only_and_skips_unreadable_entries(store):
    store.save(A, _prefix(slots=(4, 3), length=6, method="AM-OMP"))
    store.save(B, _prefix(slots=(2, 2), length=9, method="truncate"))
    truncated = store.root / f"{B}.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:-100])  # tensor bytes cut, header intact
    (store.root / f"{C}.safetensors").write_bytes(b"garbage")
    (store.root / "notes.txt").write_bytes(b"not a document")
    (store.root / ".tmp-abc").write_bytes(b"half")
    assert store.list() == [
        {"doc_id": B, "bytes": truncated.stat().st_size, "T": 9, "t": 2, "method": "truncate"},
        {"doc_id": A, "bytes": (store.root / f"{A}.safetensors").stat().st_size, "T": 6, "t": 4, "method": "AM-OMP"},
    ]
    with _refused(400, "corrupt or truncated"):
        store.load(B, FINGERPRINT)


def test_used_bytes_counts_regular_files_only(store, tmp_path):
    store.save(A, _prefix())
    (store.root / ".tmp-abc").write_bytes(b"x" * 10)
    (store.root / "sub").mkdir()
    (store.root / "sub" / "inner").write_bytes(b"x" * 1000)
    (tmp_path / "big").write_bytes(b"x" * 5000)
    (store.root / f"{B}.safetensors").symlink_to(tmp_path / "big")
    assert store.used_bytes() == (store.root / f"{A}.safetensors").stat().st_size + 10


def test_stale_temporary_files_are_removed_and_fresh_ones_kept(tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    hour_and_a_bit_ago = time.time() - 3700
    for name in (".tmp-stale", ".tmp-fresh", f"{A}.safetensors", "old-notes"):
        (root / name).write_bytes(b"x")
    for name in (".tmp-stale", f"{A}.safetensors", "old-notes"):
        os.utime(root / name, (hour_and_a_bit_ago, hour_and_a_bit_ago))
    DocumentStore(root, quota_bytes=QUOTA)
    assert sorted(os.listdir(root)) == [".tmp-fresh", f"{A}.safetensors", "old-notes"]


@pytest.mark.parametrize(
    "code, status, message",
    [(errno.ENOSPC, 507, "disk full"), (errno.EDQUOT, 507, "disk full"), (errno.EIO, 500, "Input/output error")],
)
def test_failed_write_keeps_the_previous_copy(store, monkeypatch, code, status, message):
    store.save(A, _prefix(seed=0))
    real_write = os.write

    def write_some_then_fail(descriptor, data):
        if len(data) > 1000:
            return real_write(descriptor, data[:1000])
        raise OSError(code, os.strerror(code))

    with monkeypatch.context() as patch:
        patch.setattr(os, "write", write_some_then_fail)
        with pytest.raises(StoreError, match=message) as raised:
            store.save(A, _prefix(slots=(200, 200), length=200, seed=1))
    assert raised.value.status == status and str(store.root) not in raised.value.message
    assert os.listdir(store.root) == [f"{A}.safetensors"]
    _assert_same(_prefix(seed=0), store.load(A, FINGERPRINT))


CRASH_VERSIONS = 3


def _crash_version(version: int) -> CompactedPrefix:
    """About 4 MB, so a kill often lands inside a write."""
    return _prefix(slots=(256,) * 4, heads=4, dim=128, length=300, seed=version)


def _save_forever(root: str, doc_id: str) -> None:
    """The killed process: saves the versions in turn to one id, reporting each completed save."""
    store = DocumentStore(root, quota_bytes=QUOTA)
    versions = [_crash_version(v) for v in range(CRASH_VERSIONS)]
    print("ready", flush=True)
    for count in itertools.count():
        store.save(doc_id, versions[count % CRASH_VERSIONS])
        print("saved", flush=True)


def test_writer_killed_mid_save_never_leaves_a_corrupt_copy(tmp_path):
    root = tmp_path / "store"
    versions = [_crash_version(v) for v in range(CRASH_VERSIONS)]
    child_code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        f"import test_store; test_store._save_forever({str(root)!r}, {A!r})"
    )
    delays = random.Random(7)
    saves_completed = 0
    for _ in range(5):
        child = subprocess.Popen([sys.executable, "-c", child_code], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline() == "ready\n"
        time.sleep(delays.uniform(0.05, 0.6))
        os.kill(child.pid, signal.SIGKILL)
        saves_completed += child.stdout.read().count("saved")
        child.stdout.close()
        assert child.wait() == -signal.SIGKILL
        store = DocumentStore(root, quota_bytes=QUOTA)
        if store.exists(A):
            loaded = store.load(A, FINGERPRINT)
            _assert_same(versions[loaded.config["version"]], loaded)
        else:
            assert saves_completed == 0
    assert saves_completed > 0
    assert all(name == f"{A}.safetensors" or name.startswith(".tmp-") for name in os.listdir(root))


def test_concurrent_writers_of_one_id_leave_a_whole_copy_readers_always_see(tmp_path):
    root = tmp_path / "store"
    versions = [_crash_version(v) for v in range(CRASH_VERSIONS)]
    child_code = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        f"import test_store; test_store._save_forever({str(root)!r}, {A!r})"
    )
    writers = [subprocess.Popen([sys.executable, "-c", child_code], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for writer in writers:
            assert writer.stdout.readline() == "ready\n"
        store = DocumentStore(root, quota_bytes=QUOTA)
        reads, deadline = 0, time.monotonic() + 3
        while time.monotonic() < deadline:  # both write the same id all along
            if store.exists(A):
                loaded = store.load(A, FINGERPRINT)
                _assert_same(versions[loaded.config["version"]], loaded)
                reads += 1
    finally:
        for writer in writers:
            writer.kill()
            writer.wait()
            writer.stdout.close()
    assert reads > 0
    assert all(name == f"{A}.safetensors" or name.startswith(".tmp-") for name in os.listdir(root))


def test_handoffs_live_in_their_own_directories_and_stale_ones_are_removed(tmp_path):
    store = DocumentStore(tmp_path / "store", quota_bytes=QUOTA)
    handoffs = Handoffs(store.root, QUOTA)
    nonce = handoffs.write(A, _prefix(seed=3))
    _assert_same(_prefix(seed=3), handoffs.read(nonce, A, FINGERPRINT))
    assert store.list() == [] and store.used_bytes() == 0  # not a stored document
    for bad in ("../store", "a" * 31, A):
        with pytest.raises(StoreError, match="handoff must be") as raised:
            handoffs.read(bad, A, FINGERPRINT)
        assert raised.value.status == 400
    stale = handoffs.write(B, _prefix(seed=4))
    hour_and_a_bit_ago = time.time() - 3700
    os.utime(handoffs.root / stale, (hour_and_a_bit_ago, hour_and_a_bit_ago))
    Handoffs(store.root, QUOTA)  # a server starting on this store
    assert sorted(os.listdir(handoffs.root)) == [nonce]
    handoffs.remove(nonce)
    assert os.listdir(handoffs.root) == []
