"""``compact``: selection by the named method, then the shared beta and value fits."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence

import torch

from .attention import default_scale
from .block import Block
from .least_squares import masked_lstsq, nnls_box
from .methods import CompactionOptions, Selection, get_method
from .types import CompactedKV
from .validation import budgets_per_head, check_block


def compact(
    keys: torch.Tensor,
    values: torch.Tensor,
    queries: torch.Tensor,
    budget: int | Sequence[int] | torch.Tensor,
    method: str = "AM-HighestAttnKeys",
    key_bias: torch.Tensor | None = None,
    **options: object,
) -> CompactedKV:
    """Compact ``H`` independent heads of ``T`` keys/values to ``budget`` slots each.

    ``keys`` ``[H, T, D]``, ``values`` ``[H, T, Dv]``, ``queries`` ``[H, n, D]`` (reference queries already
    pooled per KV head), any float dtype on any one device. ``budget`` is an int or one int per head.
    ``options`` are the fields of the method's options dataclass (see ``get_method(method).options_class``).
    Math runs in float32 with a per-query max shift; keys, values and beta come back in the input dtype.
    A head whose budget is >= T is returned unchanged with beta = 0.

    ``key_bias`` ``[H, T]`` is an additive logit bias already on the original keys (a block that was
    compacted before, as in online re-compaction): the targets include it, and the returned beta is each
    kept slot's total bias (an unchanged head returns ``key_bias`` itself).
    """
    check_block(keys, values, queries)
    if key_bias is not None and (not isinstance(key_bias, torch.Tensor) or tuple(key_bias.shape) != tuple(keys.shape[:2])):
        raise ValueError(f"key_bias must be a tensor of shape [H, T] = {tuple(keys.shape[:2])}")
    spec = get_method(method)
    opts = spec.make_options(**options)
    heads, length = keys.shape[:2]
    budgets = budgets_per_head(budget, heads)
    solve = budgets < length
    if not bool(solve.any()):
        return _unchanged(keys, values, key_bias)

    if bool(solve.all()):
        part, part_bias = (keys, values, queries), key_bias
    else:  # solve only the heads that shrink; the others are copied through unchanged
        rows = solve.nonzero().squeeze(1).to(keys.device)
        part = tuple(tensor.index_select(0, rows) for tensor in (keys, values, queries))
        part_bias = None if key_bias is None else key_bias.index_select(0, rows)
    block = Block(
        *part,
        key_bias=part_bias,
        scale=default_scale(keys.shape[-1], opts.scale),
        query_chunk=opts.query_chunk,
        need_outputs=opts.fit_values,
        stats_backend=opts.stats_backend,
        score_dtype=opts.score_dtype,
    )
    clock = _StageClock(keys.device)
    selection = _sorted(spec.select(block, budgets[solve].to(keys.device), opts))
    clock.lap("selection")
    beta = _fit_beta(block, selection, opts)
    clock.lap("beta")
    fitted_values = _fit_values(block, selection, beta, opts)
    clock.lap("values")
    solved = _assemble(part[0], part[1], selection, beta, fitted_values, clock.seconds)
    if bool(solve.all()):
        return solved
    return _merge_unchanged(keys, values, key_bias, solve, solved)


class _StageClock:
    """Wall-clock seconds per stage; waits for the device's queued work so GPU stages are timed too."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[stage] = now - self._last
        self._last = now


def _sorted(selection: Selection) -> Selection:
    """Kept positions in ascending order, padding last (order is irrelevant to attention; this is tidy)."""
    key = selection.indices.masked_fill(selection.indices < 0, torch.iinfo(torch.long).max)
    key, order = key.sort(dim=1)
    indices = key.masked_fill(key == torch.iinfo(torch.long).max, -1)
    log_weights = None if selection.log_weights is None else selection.log_weights.gather(1, order)
    return Selection(indices, log_weights)


def _selected_keys(block: Block, selection: Selection) -> torch.Tensor:
    valid = selection.indices >= 0
    positions = selection.indices.clamp(min=0).unsqueeze(-1)
    return block.keys.gather(1, positions.expand(-1, -1, block.keys.shape[2])) * valid.unsqueeze(-1)


def _fit_beta(block: Block, selection: Selection, opts: CompactionOptions) -> torch.Tensor:
    """beta ``[H, t]`` in float32, ``-inf`` on padding: the total bias of each kept slot."""
    valid = selection.indices >= 0
    # The fitted mass weights multiply exp(q·k) alone, so they already absorb an existing key bias;
    # unfitted beta and OMP's weights (fitted against biased features) keep the kept keys' own bias.
    kept_bias = 0.0 if block.key_bias is None else block.key_bias.gather(1, selection.indices.clamp(min=0))
    if not opts.fit_beta:
        beta = torch.zeros_like(valid, dtype=torch.float32) + kept_bias
    elif selection.log_weights is not None:
        beta = selection.log_weights + kept_bias
    else:
        selected_keys = _selected_keys(block, selection)
        weights = torch.cat([
            nnls_box(
                block.shifted_exp(selected_keys[heads], heads),
                block.stats.mass[heads],
                valid[heads],
                math.exp(opts.beta_min),
                math.exp(opts.beta_max),
                opts.nnls_iters,
                or_unit=opts.nnls_or_unit,
            )
            for heads in fit_head_groups(block, valid.shape[1], opts.memory_bytes)
        ])
        beta = weights.clamp(min=math.exp(opts.beta_min)).log()
    return beta.masked_fill(~valid, -math.inf)


def _fit_values(block: Block, selection: Selection, beta: torch.Tensor, opts: CompactionOptions) -> torch.Tensor:
    """Values ``[H, t, Dv]`` in float32: least squares on the attention outputs, or the originals."""
    valid = selection.indices >= 0
    if not opts.fit_values:
        positions = selection.indices.clamp(min=0).unsqueeze(-1)
        return block.values.gather(1, positions.expand(-1, -1, block.values.shape[2])) * valid.unsqueeze(-1)
    selected_keys = _selected_keys(block, selection)
    return torch.cat([
        masked_lstsq(block.compacted_weights(selected_keys[heads], beta[heads], heads), block.stats.outputs[heads],
                     valid[heads])
        for heads in fit_head_groups(block, valid.shape[1], opts.memory_bytes)
    ])


# Copies of a head's weight matrix (n x t, plus t padding rows) a fit holds at once: the matrix, its masked
# copy, its QR factors and the gradient steps' masked copy; R (t x t) is no larger than one of them.
FIT_COPIES = 4


def fit_head_groups(block: Block, width: int, memory_bytes: int) -> list[slice]:
    """Consecutive head groups whose fits hold at most ``memory_bytes`` (at least one head each)."""
    per_head = FIT_COPIES * 4 * (block.num_queries + width) * width
    size = max(1, min(block.num_heads, memory_bytes // per_head))
    return [slice(start, start + size) for start in range(0, block.num_heads, size)]


def _assemble(
    keys: torch.Tensor,
    values: torch.Tensor,
    selection: Selection,
    beta: torch.Tensor,
    fitted: torch.Tensor,
    timings: dict[str, float],
) -> CompactedKV:
    valid = selection.indices >= 0
    positions = selection.indices.clamp(min=0).unsqueeze(-1)
    # Keys are copied from the input, not from the float32 copy, so they are bit-exact originals.
    kept_keys = keys.gather(1, positions.expand(-1, -1, keys.shape[2])) * valid.unsqueeze(-1).to(keys.dtype)
    return CompactedKV(
        keys=kept_keys,
        values=fitted.to(values.dtype),
        beta=beta.to(keys.dtype),
        indices=selection.indices,
        lengths=valid.sum(dim=1),
        timings=timings,
    )


def _unchanged(keys: torch.Tensor, values: torch.Tensor, key_bias: torch.Tensor | None) -> CompactedKV:
    heads, length = keys.shape[:2]
    return CompactedKV(
        keys=keys,
        values=values,
        beta=keys.new_zeros(heads, length) if key_bias is None else key_bias.to(keys.dtype),
        indices=torch.arange(length, device=keys.device).expand(heads, length).clone(),
        lengths=torch.full((heads,), length, dtype=torch.long, device=keys.device),
    )


def _merge_unchanged(
    keys: torch.Tensor, values: torch.Tensor, key_bias: torch.Tensor | None, solve: torch.Tensor, solved: CompactedKV
) -> CompactedKV:
    """Heads with budget >= T keep all T slots; the solved heads fill the rest, padded to T."""
    merged = _unchanged(keys.clone(), values.clone(), None if key_bias is None else key_bias.clone())
    rows = solve.nonzero().squeeze(1).to(keys.device)
    width = solved.max_length
    for target, part, padding in (
        (merged.keys, solved.keys, 0),
        (merged.values, solved.values, 0),
        (merged.beta, solved.beta, -math.inf),
        (merged.indices, solved.indices, -1),
    ):
        target[rows] = padding
        target[rows, :width] = part
    merged.lengths[rows] = solved.lengths
    return dataclasses.replace(merged, timings=solved.timings)
