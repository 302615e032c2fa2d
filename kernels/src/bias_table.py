"""A compacted document's logit bias inside SGLang's Triton attention kernels (``score_mod`` hook).

SGLang 0.5.23's Triton extend and decode kernels call ``score_mod(qk, q_pos, kv_pos, q_idx, head, mask,
Aux0, aux0_stride_t, aux0_stride_h, aux0_len)`` on every score tile, after ``qk *= sm_scale``, with one
3-D aux tensor whose two leading strides and last size reach the function as integers. A document's
slots are always a request's first ``t`` KV positions, so the bias is found from the logical KV
position plus a per-row (base, t) pair; no page table is read.

``BiasTable`` owns one persistent fp32 buffer, so CUDA-graph replays read fresh data in place:

    [ rows: (base, t) per query row | layer 0: biases | layer 1: biases | ... ]

A document's beta ``[H_kv, t]`` sits at the same ``base`` in every layer region; ``base = -1`` marks a
row without a document. The per-layer aux tensor is a ``(1, 1, layer_size)`` strided view whose
(free) size-1 strides carry the GQA group size and the distance back to the rows region.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import triton
import triton.language as tl


@triton.jit
def am_bias_score_mod(qk, q_pos, kv_pos, q_idx, head, mask, Aux0, group, rows_distance, layer_size):
    rows = Aux0 - rows_distance
    q_idx = q_idx + tl.zeros(qk.shape, dtype=tl.int32)  # a scalar in the grouped decode kernel
    base = tl.load(rows + 2 * q_idx, mask=mask, other=-1.0).to(tl.int32)
    slots = tl.load(rows + 2 * q_idx + 1, mask=mask, other=0.0).to(tl.int32)
    use = mask & (base >= 0) & (kv_pos < slots)
    bias = tl.load(Aux0 + base + (head // group) * slots + kv_pos, mask=use, other=0.0)
    return qk + bias


class BiasTable:
    """The buffer ``am_bias_score_mod`` reads: per-row metadata and every placed document's beta.

    ``capacity_slots`` bounds the placed documents' slots (the KV pool size always suffices: each
    compacted slot is a pool slot); ``max_rows`` bounds the query rows of one forward (tokens of an
    extend batch, requests of a decode batch). Row values are stored as floats: exact below 2**24.
    """

    def __init__(self, num_layers: int, kv_heads: int, group: int, capacity_slots: int, max_rows: int, device):
        if min(num_layers, kv_heads, group, capacity_slots, max_rows) < 1:
            raise ValueError("num_layers, kv_heads, group, capacity_slots and max_rows must be positive")
        if max(capacity_slots * kv_heads, max_rows) >= 1 << 24:
            raise ValueError("capacity_slots * kv_heads and max_rows must stay below 2**24 (float-exact offsets)")
        self.num_layers, self.kv_heads, self.group = num_layers, kv_heads, group
        self.rows_size = 2 * max_rows
        self.layer_size = kv_heads * capacity_slots
        self.buffer = torch.full((self.rows_size + num_layers * self.layer_size,), -1.0, dtype=torch.float32, device=device)
        self._layers = self.buffer[self.rows_size :].view(num_layers, self.layer_size)
        self._aux = [
            torch.as_strided(self.buffer, (1, 1, self.layer_size), (group, self.rows_size + layer * self.layer_size, 1),
                             self.rows_size + layer * self.layer_size)
            for layer in range(num_layers)
        ]
        self._placed: dict[int, tuple[int, int]] = {}  # document key -> (base, width)
        self._rows_filled = 0

    def aux(self, layer: int) -> torch.Tensor:
        """The ``aux_tensors[0]`` for ``layer`` (index among this rank's layers)."""
        return self._aux[layer]

    def layer_region(self, layer: int) -> torch.Tensor:
        """``layer``'s bias region, 1-D (the FlashInfer variant's ``am_bias``)."""
        return self._layers[layer]

    def rows(self) -> torch.Tensor:
        """The rows region, 1-D: ``(base, t)`` pairs (the FlashInfer variant's ``am_rows``)."""
        return self.buffer[: self.rows_size]

    @property
    def max_rows(self) -> int:
        return self.rows_size // 2

    def free_slots(self) -> int:
        """Compacted slots (per KV head) that still fit, after repacking."""
        return (self.layer_size - sum(width for _, width in self._placed.values())) // self.kv_heads

    def release(self, key: int) -> None:
        """Document ``key`` was removed: its room may be reused."""
        self._placed.pop(key, None)

    def base_of(self, key: int, bias: Callable[[], Sequence[torch.Tensor]]) -> int:
        """Offset of document ``key``'s beta in every layer region, writing ``bias()`` (per layer
        ``[H_kv, t]``) on first use."""
        placed = self._placed.get(key)
        if placed is not None:
            return placed[0]
        layers = list(bias())
        if len(layers) != self.num_layers or layers[0].shape[0] != self.kv_heads:
            raise ValueError(f"bias must be {self.num_layers} layers of [{self.kv_heads}, t], got "
                             f"{len(layers)} of {tuple(layers[0].shape) if layers else None}")
        width = layers[0].numel()
        base = self._find_room(width)
        if base is None:
            self._repack()
            base = self._find_room(width)
        if base is None:
            raise RuntimeError(f"bias table full: {width} more floats per layer do not fit {self.layer_size}")
        self._layers[:, base : base + width] = torch.stack([b.reshape(-1) for b in layers]).to(self.buffer)
        self._placed[key] = (base, width)
        return base

    def _find_room(self, width: int) -> int | None:
        start = 0
        for base, used in sorted(self._placed.values()):
            if base - start >= width:
                return start
            start = base + used
        return start if self.layer_size - start >= width else None

    def _repack(self) -> None:
        start, moved = 0, {}
        for key, (base, width) in sorted(self._placed.items(), key=lambda item: item[1][0]):
            if base != start:
                self._layers[:, start : start + width] = self._layers[:, base : base + width].clone()
            moved[key] = (start, width)
            start += width
        self._placed = moved

    def set_rows(self, bases: Sequence[int], slots: Sequence[int], rows_per_entry: Sequence[int]) -> int:
        """Write the rows of one forward: entry i (a request) covers ``rows_per_entry[i]`` consecutive
        query rows with document ``(bases[i], slots[i])`` (base -1: none). Returns the row count."""
        if not rows_per_entry and not self._rows_filled:  # most forwards: no document now or before
            return 0
        counts = torch.tensor(rows_per_entry, dtype=torch.int64)
        total = int(counts.sum())
        if total > self.max_rows:
            raise ValueError(f"{total} query rows exceed the bias table's {self.max_rows}")
        pairs = torch.tensor([bases, slots], dtype=torch.float32).T.repeat_interleave(counts, dim=0)
        self.buffer[: 2 * total].copy_(pairs.reshape(-1), non_blocking=True)
        if self._rows_filled > total:  # rows a previous, larger forward left behind
            self.buffer[2 * total : 2 * self._rows_filled].fill_(-1.0)
        self._rows_filled = total
        return total
