"""Nonuniform per-head budgets (paper §3.4): the official proportions file, the max-ratio cap, and the
greedy swap that derives proportions from per-head sensitivity curves.

Proportions are keyed by ``(layer, kv_head)`` and cover the KV heads of the global-attention layers; on
disk they are JSON ``{"L{layer}H{kv_head}": proportion}`` summing to 1.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

_KEY = re.compile(r"^L(\d+)H(\d+)$")
PAPER_TARGET_RATIOS = (0.01, 0.02, 0.05, 0.1)


def load_head_proportions(source: str | Path | Mapping[str, float]) -> dict[tuple[int, int], float]:
    """Read ``{"L{layer}H{kv_head}": proportion}`` from a JSON file or a mapping; proportions must sum to 1."""
    if isinstance(source, Mapping):
        raw = dict(source)
    else:
        try:
            raw = json.loads(Path(source).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read head proportions from {source}: {error}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"head proportions in {source} must be a JSON object")
    if not raw:
        raise ValueError("head proportions are empty")
    proportions = {}
    for key, value in raw.items():
        match = _KEY.match(str(key))
        if match is None:
            raise ValueError(f"head proportion key {key!r} is not of the form 'L<layer>H<kv_head>'")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"head proportion {key!r} must be a finite number >= 0, got {value!r}")
        proportions[int(match.group(1)), int(match.group(2))] = float(value)
    heads_per_layer = {layer: sorted(h for l, h in proportions if l == layer) for layer, _ in proportions}
    for layer, heads in heads_per_layer.items():
        if heads != list(range(len(heads))) or len(heads) != len(next(iter(heads_per_layer.values()))):
            raise ValueError(f"layer {layer} must list KV heads 0..H-1, the same H for every layer; got {heads}")
    total = sum(proportions.values())
    if abs(total - 1.0) > 1e-3:
        raise ValueError(f"head proportions must sum to 1, got {total:.6f}")
    return proportions


def save_head_proportions(path: str | Path, proportions: Mapping[tuple[int, int], float]) -> Path:
    path = Path(path)
    path.write_text(json.dumps({f"L{l}H{h}": p for (l, h), p in sorted(proportions.items())}, indent=1) + "\n")
    return path


def head_budgets(
    proportions: Mapping[tuple[int, int], float],
    ratio: float,
    span_length: int,
    max_ratio_per_head: float = 1.0,
    min_budget: int = 0,
) -> dict[int, list[int]]:
    """Slots per KV head for a span of ``span_length`` tokens compacted at ``ratio``: ``{layer: [t_h, ...]}``.

    ``t_h = int(p_h * ratio * span_length * H)`` with H the number of entries, so the total matches a
    uniform allocation. Heads above ``max_ratio_per_head * span_length`` are clamped and their excess is
    shared by the other heads in proportion to p, until none exceeds the cap (water-filling). A head may
    get 0 slots (it then ignores the span); ``min_budget=1`` keeps every head usable by ``compact``.
    """
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    if span_length < 1:
        raise ValueError(f"span_length must be >= 1, got {span_length}")
    if not 0 < max_ratio_per_head <= 1:
        raise ValueError(f"max_ratio_per_head must be in (0, 1], got {max_ratio_per_head}")
    if min_budget < 0:
        raise ValueError(f"min_budget must be >= 0, got {min_budget}")
    keys = sorted(proportions)
    p = torch.tensor([proportions[key] for key in keys], dtype=torch.float64)
    slots = p * ratio * span_length * len(keys)
    cap = max_ratio_per_head * span_length
    capped = torch.zeros_like(p, dtype=torch.bool)
    while True:
        over = slots > cap + 1e-9
        if not bool(over.any()):
            break
        excess = float((slots[over] - cap).sum())
        slots[over] = cap
        capped |= over
        free_weight = float(p[~capped].sum())
        if free_weight == 0:
            break  # every head is at the cap: the rest of the budget cannot be placed
        slots[~capped] += excess * p[~capped] / free_weight
    budgets: dict[int, list[int]] = {}
    for (layer, _), value in zip(keys, slots.tolist()):
        budgets.setdefault(layer, []).append(max(min_budget, int(value + 1e-9)))
    return budgets


def optimize_head_proportions(
    curves: torch.Tensor,
    sweep_ratios: Sequence[float] | torch.Tensor,
    target_ratios: Sequence[float] = PAPER_TARGET_RATIOS,
    step: float = 0.001,
    max_swaps: int = 1_000_000,
) -> torch.Tensor:
    """Proportions ``[N]`` from per-head sensitivity curves by the paper's greedy swap from uniform.

    ``curves[h, i]`` is the loss increase (e.g. Δ log-perplexity) when head h alone is compacted at
    ``sweep_ratios[i]`` and every other head stays at the baseline; values between sweep points are
    interpolated linearly and held flat outside. The objective of head h at proportion x averages
    ``J_h(x * N * r)`` over ``target_ratios`` (the ratio-agnostic version). Each swap moves ``step``
    from the head whose loss rises least to the head whose loss falls most, while that helps.
    """
    if curves.ndim != 2 or curves.shape[0] < 2:
        raise ValueError(f"curves must be [heads >= 2, sweep points], got shape {tuple(curves.shape)}")
    grid = torch.as_tensor(sweep_ratios, dtype=torch.float64)
    if grid.ndim != 1 or grid.shape[0] != curves.shape[1] or not bool((grid[1:] > grid[:-1]).all()):
        raise ValueError("sweep_ratios must be increasing, one per column of curves")
    if not bool(torch.isfinite(curves).all()):
        raise ValueError("curves contain NaN or Inf")
    if not 0 < step < 1 / curves.shape[0]:
        raise ValueError(f"step must be in (0, 1/heads), got {step}")
    values = curves.to(torch.float64)
    heads = values.shape[0]
    targets = torch.as_tensor(target_ratios, dtype=torch.float64)

    def objective(proportion: torch.Tensor) -> torch.Tensor:  # [N] proportions -> [N] losses
        ratios = (proportion.unsqueeze(1) * heads * targets).clamp(grid[0], grid[-1])  # [N, R]
        right = torch.searchsorted(grid, ratios.contiguous()).clamp(1, len(grid) - 1)
        left = right - 1
        weight = (ratios - grid[left]) / (grid[right] - grid[left])
        low, high = values.gather(1, left), values.gather(1, right)
        return (low + weight * (high - low)).mean(dim=1)

    p = torch.full((heads,), 1.0 / heads, dtype=torch.float64)
    for _ in range(max_swaps):
        current = objective(p)
        gain = current - objective(p + step)
        cost = objective(p - step) - current
        receiver = int(gain.argmax())
        cost = cost.masked_fill(p < step - 1e-12, math.inf)
        cost[receiver] = math.inf
        giver = int(cost.argmin())
        if not gain[receiver] > cost[giver]:
            break
        p[giver] -= step
        p[receiver] += step
    p = p.clamp(min=0)  # repeated steps of 0.001 leave rounding residue such as -2e-16 on emptied heads
    return p / p.sum()
