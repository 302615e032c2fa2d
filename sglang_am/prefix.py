"""``CompactedPrefix``: a compacted document for every layer of one model, and its on-disk format.

This is the one artifact both adapters use: the transformers adapter writes and attaches it, and the
SGLang extension reads and writes the same files. A prefix is one safetensors file: per layer
``layers.{i}.keys`` ``[H_kv, t, D]``, ``layers.{i}.values`` ``[H_kv, t, Dv]``, ``layers.{i}.beta``
``[H_kv, t]``, and in the header's metadata (key ``sglang_am``) a JSON object with the format version,
logical length, token ids, model fingerprint, method, config, timings and a SHA-256 of the tensors, so
truncated or altered files are refused. One file, written by replacing it whole, means a reader never
sees half of a new version next to half of an old one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import struct
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

FORMAT_VERSION = 2
METADATA_KEY = "sglang_am"
# safetensors refuses larger headers too; the cap keeps a garbage length from being read.
MAX_HEADER_BYTES = 100_000_000
TENSOR_PARTS = ("keys", "values", "beta")
# Names of half-written files: ``write_atomically`` writes them, a store removes those a crash left.
TEMPORARY_PREFIX = ".tmp-"
# torch has no finiteness check for float8, and e4m3fn no -inf to switch padding slots off with.
FLOAT_DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64}


@dataclass
class CompactedPrefix:
    """Compacted keys, values and bias per layer (padding slots carry beta = -inf). Compacted layers
    share one slot count t; a sliding-window layer holds its window of original tokens instead.
    ``logical_length`` is the document's length T: tokens after the prefix take RoPE positions T, T+1,
    ... whatever a layer's physical slot count."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    beta: list[torch.Tensor]
    logical_length: int
    token_ids: list[int]
    fingerprint: dict
    method: str
    config: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.keys or not len(self.keys) == len(self.values) == len(self.beta):
            raise ValueError("keys, values and beta need one entry per layer, at least one layer")
        for i, (k, v, b) in enumerate(zip(self.keys, self.values, self.beta)):
            if (
                k.ndim != 3 or v.ndim != 3 or v.shape[:2] != k.shape[:2] or b.shape != k.shape[:2]
                or min(k.shape) < 1 or v.shape[2] < 1
            ):
                raise ValueError(
                    f"layer {i}: keys {tuple(k.shape)}, values {tuple(v.shape)}, beta {tuple(b.shape)} must be "
                    f"[H, t, D], [H, t, Dv], [H, t] with no empty dimension"
                )
            if not {k.dtype, v.dtype, b.dtype} <= FLOAT_DTYPES:
                raise ValueError(
                    f"layer {i}: keys {k.dtype}, values {v.dtype}, beta {b.dtype} must be float16, bfloat16, float32 "
                    f"or float64"
                )
        if len(self.token_ids) != self.logical_length or self.logical_length < self.num_slots:
            raise ValueError(
                f"logical_length {self.logical_length} must equal len(token_ids) {len(self.token_ids)} "
                f"and be >= every layer's slot count ({self.num_slots})"
            )

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def layer_slots(self) -> list[int]:
        return [k.shape[1] for k in self.keys]

    @property
    def num_slots(self) -> int:
        """Slots of the widest layer (every layer, for models without sliding-window layers)."""
        return max(self.layer_slots)

    @property
    def nbytes(self) -> int:
        """A lower bound on ``len(self.to_bytes())`` (tensor bytes plus the metadata), cheap enough to
        refuse a save over a quota before serializing anything."""
        tensor_bytes = sum(t.numel() * t.element_size() for t in self.keys + self.values + self.beta)
        return 8 + tensor_bytes + len(json.dumps(self._metadata(checksum=""), default=str))

    def to_bytes(self) -> bytes:
        """The whole file; refuses values a load would refuse, so nothing unreadable gets written."""
        self._check_values()
        tensors = {}
        for i, layer in enumerate(zip(self.keys, self.values, self.beta)):
            for part, tensor in zip(TENSOR_PARTS, layer):
                tensors[f"layers.{i}.{part}"] = tensor.detach().cpu().contiguous()
        metadata = self._metadata(checksum=tensors_sha256(tensors))
        # Options are JSON-native (numbers, strings, lists/tuples); anything else is recorded as text.
        return save_tensors(tensors, metadata={METADATA_KEY: json.dumps(metadata, default=str)})

    @classmethod
    def from_bytes(
        cls, data: bytes, expected_fingerprint: dict | None = None, device: str | torch.device = "cpu"
    ) -> CompactedPrefix:
        """Parse and fully validate a file's bytes on the CPU before anything goes to ``device``, so a
        server refuses a bad artifact before allocating for it. The checksum covers the tensors parsed
        from these same bytes."""
        metadata = read_metadata(io.BytesIO(data))
        _check_metadata(metadata)
        try:
            tensors = load_tensors(data)
        except (SafetensorError, KeyError, TypeError, ValueError, RuntimeError) as error:
            raise ValueError(f"corrupt or truncated (unreadable tensors: {error})") from None
        if tensors_sha256(tensors) != metadata["tensors_sha256"]:
            raise ValueError("corrupt or truncated (checksum mismatch)")
        if expected_fingerprint is not None and metadata["fingerprint"] != expected_fingerprint:
            raise ValueError("compacted for another model (fingerprint mismatch)")
        if metadata["num_layers"] > len(tensors):  # before building names for each layer
            raise ValueError(f"num_layers {metadata['num_layers']} but only {len(tensors)} tensors")
        layers = range(metadata["num_layers"])
        expected = {f"layers.{i}.{part}" for i in layers for part in TENSOR_PARTS}
        if missing := sorted(expected - tensors.keys()):
            raise ValueError(f"missing tensors {', '.join(missing)}")
        if unexpected := sorted(tensors.keys() - expected):
            raise ValueError(f"tensors {', '.join(unexpected)} beyond num_layers {metadata['num_layers']}")
        prefix = cls(
            keys=[tensors[f"layers.{i}.keys"] for i in layers],
            values=[tensors[f"layers.{i}.values"] for i in layers],
            beta=[tensors[f"layers.{i}.beta"] for i in layers],
            logical_length=metadata["logical_length"],
            token_ids=metadata["token_ids"],
            fingerprint=metadata["fingerprint"],
            method=metadata["method"],
            config=metadata["config"],
            timings=metadata["timings"],
        )
        if prefix.layer_slots != metadata["layer_slots"]:
            raise ValueError(f"layer_slots {metadata['layer_slots']} disagree with the tensors' {prefix.layer_slots}")
        prefix._check_values()
        if torch.device(device) == torch.device("cpu"):
            return prefix
        return replace(
            prefix, keys=[t.to(device) for t in prefix.keys], values=[t.to(device) for t in prefix.values],
            beta=[t.to(device) for t in prefix.beta],
        )

    def save(self, path: str | Path) -> Path:
        """Write the single file ``path``, replacing any previous one only once the new one is complete."""
        path = Path(path)
        data = self.to_bytes()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, data)
        except OSError as error:
            raise ValueError(f"cannot write {path}: {error.strerror or error}") from error
        return path

    @classmethod
    def load(
        cls, path: str | Path, expected_fingerprint: dict | None = None, device: str | torch.device = "cpu"
    ) -> CompactedPrefix:
        """Read a saved prefix; refuses missing, truncated or altered files and a fingerprint mismatch."""
        path = Path(path)
        if (path / "prefix.json").is_file():
            raise ValueError(
                f"{path} is a format version 1 directory (prefix.safetensors + prefix.json), which is no longer "
                f"read; compact the document again to get a version {FORMAT_VERSION} file"
            )
        try:
            data = path.read_bytes()
        except OSError as error:
            raise ValueError(f"cannot read {path}: {error.strerror or error}") from None
        try:
            return cls.from_bytes(data, expected_fingerprint, device)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None

    def _metadata(self, checksum: str) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "num_layers": self.num_layers,
            "layer_slots": self.layer_slots,
            "logical_length": self.logical_length,
            "token_ids": list(self.token_ids),
            "fingerprint": self.fingerprint,
            "method": self.method,
            "config": self.config,
            "timings": self.timings,
            "tensors_sha256": checksum,
        }

    def _check_values(self) -> None:
        """Non-finite keys or values, or a +inf or NaN bias, would poison every request on the document;
        -inf bias is how padding slots are switched off."""
        for i, (k, v, b) in enumerate(zip(self.keys, self.values, self.beta)):
            for part, tensor in (("keys", k), ("values", v)):
                if not torch.isfinite(tensor).all():
                    raise ValueError(f"layer {i}: {part} hold NaN or Inf")
            if torch.isnan(b).any() or (b == float("inf")).any():
                raise ValueError(f"layer {i}: beta holds NaN or +Inf (only padding slots may be -inf)")


def read_metadata(stream: BinaryIO) -> dict:
    """The prefix metadata from the safetensors header at the start of ``stream``; reads no tensor
    data, so listing stored prefixes stays cheap."""
    length_bytes = stream.read(8)
    if len(length_bytes) < 8:
        raise ValueError("corrupt or truncated (no safetensors header)")
    (length,) = struct.unpack("<Q", length_bytes)
    if length > MAX_HEADER_BYTES:
        raise ValueError(f"not a compacted prefix (safetensors header of {length} bytes)")
    header = stream.read(length)
    if len(header) < length:
        raise ValueError("corrupt or truncated (header cut short)")
    try:
        metadata = json.loads(json.loads(header)["__metadata__"][METADATA_KEY])
    except (ValueError, KeyError, TypeError, RecursionError):
        raise ValueError(f"not a compacted prefix (no {METADATA_KEY} metadata in the safetensors header)") from None
    if not isinstance(metadata, dict):
        raise ValueError(f"not a compacted prefix ({METADATA_KEY} metadata is not a JSON object)")
    return metadata


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a fresh temporary file beside ``path`` and rename it over ``path``: readers and
    a crash see the old file or the new one, never a partial one. Raises the ``OSError`` (with its
    errno) after removing the temporary file."""
    directory = Path(path).parent
    descriptor, temporary = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, dir=directory)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(descriptor, view):]
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable."""
    descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over each tensor's name, dtype, shape and raw bytes, in name order: what a file's
    ``tensors_sha256`` must equal."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}\0{str(tensor.dtype).removeprefix('torch.')}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _check_metadata(metadata: dict) -> None:
    """Types and consistency of the JSON fields, checked before any tensor is parsed."""
    version = metadata.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise ValueError(f"format version {version!r} is not supported (this version reads {FORMAT_VERSION})")
    expected_types = {
        "num_layers": int, "layer_slots": list, "logical_length": int, "token_ids": list, "fingerprint": dict,
        "method": str, "config": dict, "timings": dict, "tensors_sha256": str,
    }
    for name, kind in expected_types.items():
        if name not in metadata:
            raise ValueError(f"metadata field {name} is missing")
        if not isinstance(metadata[name], kind) or isinstance(metadata[name], bool):
            raise ValueError(f"metadata field {name} is a {type(metadata[name]).__name__}, not a {kind.__name__}")
    if metadata["num_layers"] < 1 or metadata["logical_length"] < 1:
        raise ValueError(
            f"num_layers {metadata['num_layers']} and logical_length {metadata['logical_length']} must be >= 1"
        )
    if not all(_is_count(t) for t in metadata["token_ids"]):
        raise ValueError("token_ids must be non-negative integers")
    if len(metadata["token_ids"]) != metadata["logical_length"]:
        raise ValueError(f"logical_length {metadata['logical_length']} != {len(metadata['token_ids'])} token_ids")
    if not all(_is_count(t) for t in metadata["layer_slots"]):
        raise ValueError("layer_slots must be non-negative integers")


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
