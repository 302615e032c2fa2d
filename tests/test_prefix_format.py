"""The single-file ``CompactedPrefix`` format: bit-exact round trips, and every malformed file refused
with a ValueError before anything is built from it."""

import errno
import json
import os
import struct

import pytest
import torch
from safetensors.torch import save as save_tensors

from sglang_am.prefix import METADATA_KEY, CompactedPrefix, tensors_sha256

FINGERPRINT = {"model_type": "llama", "weights": "abc123"}


def _prefix(slots=(4, 3), heads=2, length=6, seed=0) -> CompactedPrefix:
    """Layers of different widths (a sliding-window model), bf16 keys, a -inf padding slot."""
    generator = torch.Generator().manual_seed(seed)
    keys = [torch.randn(heads, t, 8, generator=generator).to(torch.bfloat16) for t in slots]
    values = [torch.randn(heads, t, 5, generator=generator) for t in slots]
    beta = [torch.randn(heads, t, generator=generator) for t in slots]
    beta[0][1, -1] = float("-inf")
    return CompactedPrefix(
        keys=keys, values=values, beta=beta, logical_length=length, token_ids=list(range(3, 3 + length)),
        fingerprint=FINGERPRINT, method="AM-OMP", config={"budget": 4, "pair": (1, 2)},
        timings={"solve_seconds": 0.25},
    )


def _parts(prefix: CompactedPrefix) -> tuple[dict, dict]:
    """Tensors and metadata as written, for building altered files that still carry a valid checksum."""
    data = prefix.to_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    metadata = json.loads(json.loads(data[8 : 8 + length])["__metadata__"][METADATA_KEY])
    tensors = {f"layers.{i}.{part}": getattr(prefix, part)[i].clone()
               for i in range(prefix.num_layers) for part in ("keys", "values", "beta")}
    return tensors, metadata


def _file(tensors: dict, metadata: dict) -> bytes:
    """A file of these parts whose checksum (when the metadata has one) is right, so only the change
    under test is wrong."""
    if "tensors_sha256" in metadata:
        metadata = {**metadata, "tensors_sha256": tensors_sha256(tensors)}
    return save_tensors(tensors, metadata={METADATA_KEY: json.dumps(metadata)})


def _assert_same(a: CompactedPrefix, b: CompactedPrefix) -> None:
    for x, y in zip(a.keys + a.values + a.beta, b.keys + b.values + b.beta):
        assert x.dtype == y.dtype and torch.equal(x, y)
    assert (b.logical_length, b.token_ids, b.fingerprint, b.method, b.timings) == (
        a.logical_length, a.token_ids, a.fingerprint, a.method, a.timings)


def test_round_trip_is_bit_exact(tmp_path):
    prefix = _prefix()
    written = prefix.save(tmp_path / "nested" / "doc.safetensors")
    assert written == tmp_path / "nested" / "doc.safetensors" and written.is_file()
    assert os.listdir(written.parent) == ["doc.safetensors"]
    loaded = CompactedPrefix.load(written, expected_fingerprint=FINGERPRINT)
    _assert_same(prefix, loaded)
    assert loaded.config == {"budget": 4, "pair": [1, 2]}  # JSON turns tuples into lists
    assert loaded.layer_slots == [4, 3] and loaded.beta[0][1, -1] == float("-inf")
    data = written.read_bytes()
    assert data == prefix.to_bytes() and 0 < prefix.nbytes <= len(data)
    _assert_same(prefix, CompactedPrefix.from_bytes(data))


def test_from_bytes_moves_to_the_device_after_validating():
    loaded = CompactedPrefix.from_bytes(_prefix().to_bytes(), device="meta")
    assert {t.device.type for t in loaded.keys + loaded.values + loaded.beta} == {"meta"}


def test_flipped_tensor_byte_fails_the_checksum():
    data = bytearray(_prefix().to_bytes())
    data[-3] ^= 0x01  # inside the last tensor's bytes
    with pytest.raises(ValueError, match=r"corrupt or truncated \(checksum mismatch\)"):
        CompactedPrefix.from_bytes(bytes(data))


def test_every_truncation_is_refused():
    data = _prefix().to_bytes()
    for end in range(len(data)):
        with pytest.raises(ValueError):
            CompactedPrefix.from_bytes(data[:end])


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00" * 8,
        bytes(range(256)) * 4,
        struct.pack("<Q", 2**40) + b"{}",
        struct.pack("<Q", 6) + b"{nope}",
        struct.pack("<Q", 2) + b"{}",
        struct.pack("<Q", 4) + b"\xff\xfe{}",
        struct.pack("<Q", 40) + b'{"__metadata__":{"sglang_am":"[1, 2]"}}',
        struct.pack("<Q", 40000) + b"[" * 20000 + b"]" * 20000,
    ],
    ids=["empty", "zero-header", "noise", "huge-header", "bad-json", "no-metadata", "not-utf8", "metadata-not-object",
         "deeply-nested"],
)
def test_garbage_is_refused(data):
    with pytest.raises(ValueError):
        CompactedPrefix.from_bytes(data)


def test_random_byte_changes_only_ever_raise_value_error():
    data = _prefix().to_bytes()
    generator = torch.Generator().manual_seed(1)
    for _ in range(300):
        altered = bytearray(data)
        for position in torch.randint(0, len(data), (3,), generator=generator).tolist():
            altered[position] = torch.randint(0, 256, (1,), generator=generator).item()
        if altered != data:
            with pytest.raises(ValueError):
                CompactedPrefix.from_bytes(bytes(altered))


@pytest.mark.parametrize(
    "part, value",
    [("keys", float("nan")), ("keys", float("inf")), ("values", float("nan")), ("values", float("-inf")),
     ("beta", float("nan")), ("beta", float("inf"))],
)
def test_non_finite_values_are_refused(part, value):
    tensors, metadata = _parts(_prefix())
    tensors[f"layers.1.{part}"][0, 0] = value
    with pytest.raises(ValueError, match=f"layer 1: {part} hold.? NaN or"):
        CompactedPrefix.from_bytes(_file(tensors, metadata))


def test_negative_infinite_beta_marks_padding_and_is_accepted():
    tensors, metadata = _parts(_prefix())
    tensors["layers.1.beta"][:, -1] = float("-inf")
    loaded = CompactedPrefix.from_bytes(_file(tensors, metadata))
    assert (loaded.beta[1][:, -1] == float("-inf")).all()


def test_non_finite_values_are_not_written():
    prefix = _prefix()
    prefix.values[0][0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer 0: values hold NaN"):
        prefix.to_bytes()


def test_more_slots_than_tokens_is_refused():
    tensors, metadata = _parts(_prefix(slots=(4, 3), length=6))
    metadata.update(logical_length=3, token_ids=[1, 2, 3])
    with pytest.raises(ValueError, match="logical_length 3 must .* >= every layer's slot count"):
        CompactedPrefix.from_bytes(_file(tensors, metadata))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"token_ids": [1, 2, 3]}, "logical_length 6 != 3 token_ids"),
        ({"token_ids": [1, 2, -3, 4, 5, 6]}, "non-negative integers"),
        ({"token_ids": [1, 2, 3.5, 4, 5, 6]}, "non-negative integers"),
        ({"token_ids": [True] * 6}, "non-negative integers"),
        ({"token_ids": "abcdef"}, "token_ids is a str, not a list"),
        ({"logical_length": 6.0}, "logical_length is a float, not a int"),
        ({"logical_length": 0, "token_ids": []}, "must be >= 1"),
        ({"num_layers": "2"}, "num_layers is a str"),
        ({"num_layers": True}, "num_layers is a bool"),
        ({"num_layers": 10**12}, "num_layers 1000000000000 but only 6 tensors"),
        ({"fingerprint": ["llama"]}, "fingerprint is a list, not a dict"),
        ({"method": 3}, "method is a int, not a str"),
        ({"config": None}, "config is a NoneType"),
        ({"timings": []}, "timings is a list"),
        ({"layer_slots": [4, 4]}, r"layer_slots \[4, 4\] disagree"),
        ({"format_version": 1}, "format version 1 is not supported"),
        ({"format_version": "2"}, "format version '2' is not supported"),
    ],
)
def test_wrong_metadata_is_refused(change, message):
    tensors, metadata = _parts(_prefix())
    metadata.update(change)
    with pytest.raises(ValueError, match=message):
        CompactedPrefix.from_bytes(_file(tensors, metadata))


@pytest.mark.parametrize("field", ["token_ids", "method", "config", "timings", "fingerprint", "num_layers"])
def test_missing_metadata_field_is_refused(field):
    tensors, metadata = _parts(_prefix())
    del metadata[field]
    with pytest.raises(ValueError, match=f"metadata field {field} is missing"):
        CompactedPrefix.from_bytes(_file(tensors, metadata))


def test_missing_checksum_is_refused():
    tensors, metadata = _parts(_prefix())
    del metadata["tensors_sha256"]
    with pytest.raises(ValueError, match="tensors_sha256 is missing"):
        CompactedPrefix.from_bytes(_file(tensors, metadata))


def test_missing_or_extra_layer_tensors_are_refused():
    tensors, metadata = _parts(_prefix())
    del tensors["layers.1.beta"]
    with pytest.raises(ValueError, match="missing tensors layers.1.beta"):
        CompactedPrefix.from_bytes(_file(tensors, metadata))
    tensors, metadata = _parts(_prefix())
    metadata["num_layers"] = 1
    with pytest.raises(ValueError, match="tensors layers.1.beta, layers.1.keys, layers.1.values beyond num_layers 1"):
        CompactedPrefix.from_bytes(_file(tensors, metadata))


@pytest.mark.parametrize(
    "name, tensor, message",
    [
        ("layers.0.beta", torch.zeros(2, 3), r"must be \[H, t, D\], \[H, t, Dv\], \[H, t\]"),
        ("layers.0.values", torch.zeros(2, 4), r"must be \[H, t, D\]"),
        ("layers.0.keys", torch.zeros(2, 4, 0), "no empty dimension"),
        ("layers.0.keys", torch.zeros(2, 4, 8, dtype=torch.int32), "must be float16, bfloat16, float32 or float64"),
        ("layers.0.keys", torch.zeros(2, 4, 8, dtype=torch.float8_e4m3fn), "must be float16"),
    ],
)
def test_bad_tensor_shapes_and_dtypes_are_refused(name, tensor, message):
    tensors, metadata = _parts(_prefix())
    tensors[name] = tensor
    with pytest.raises(ValueError, match=message):
        CompactedPrefix.from_bytes(_file(tensors, metadata))


def test_fingerprint_mismatch_is_refused(tmp_path):
    path = _prefix().save(tmp_path / "doc.safetensors")
    with pytest.raises(ValueError, match=r"compacted for another model \(fingerprint mismatch\)"):
        CompactedPrefix.load(path, expected_fingerprint={**FINGERPRINT, "weights": "other"})


def test_version_1_directory_is_refused(tmp_path):
    (tmp_path / "doc").mkdir()
    (tmp_path / "doc" / "prefix.json").write_text(json.dumps({"format_version": 1}))
    (tmp_path / "doc" / "prefix.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="format version 1 directory .* no longer read"):
        CompactedPrefix.load(tmp_path / "doc")


def test_missing_path_or_directory_is_refused(tmp_path):
    with pytest.raises(ValueError, match="cannot read .*nowhere.safetensors: No such file"):
        CompactedPrefix.load(tmp_path / "nowhere.safetensors")
    with pytest.raises(ValueError, match="Is a directory"):
        CompactedPrefix.load(tmp_path)


@pytest.mark.parametrize("failing", ["write", "fsync"])
def test_failed_overwrite_keeps_the_previous_file(tmp_path, monkeypatch, failing):
    path = tmp_path / "doc.safetensors"
    previous = _prefix(seed=0)
    previous.save(path)
    real_write = os.write

    def write_half_then_fail(descriptor, data):
        if len(data) > 64:
            return real_write(descriptor, data[: len(data) // 2])
        raise OSError(errno.EIO, "Input/output error")

    def fail(*args):
        raise OSError(errno.EIO, "Input/output error")

    with monkeypatch.context() as patch:
        patch.setattr(os, failing, write_half_then_fail if failing == "write" else fail)
        with pytest.raises(ValueError, match=f"cannot write {path}: Input/output error") as raised:
            _prefix(seed=1).save(path)
    assert raised.value.__cause__.errno == errno.EIO
    assert os.listdir(tmp_path) == ["doc.safetensors"]  # no temporary file left behind
    _assert_same(previous, CompactedPrefix.load(path))
