"""Reference-query and budget plumbing shared by the adapters: query sources, GQA pooling, subsampling
and per-head slot budgets. No model library imports: the transformers and SGLang adapters both use it."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .head_budgets import head_budgets

QUERY_SOURCES = ("context-prefill", "repeat-prefill", "self-study", "random")
# Named unions of sources: each gets this fraction of the per-head query cap.
QUERY_MIXTURES = {"ss-plus-repeat": {"self-study": 0.5, "repeat-prefill": 0.5}}


def source_fractions(query_source: str | Mapping[str, float]) -> dict[str, float]:
    if isinstance(query_source, str):
        fractions = QUERY_MIXTURES.get(query_source, {query_source: 1.0})
    else:
        fractions = dict(query_source)
    unknown = sorted(set(fractions) - set(QUERY_SOURCES))
    if unknown or not fractions:
        raise ValueError(
            f"query_source must be one of {QUERY_SOURCES}, a mixture {sorted(QUERY_MIXTURES)} or a mapping of "
            f"sources to fractions; got {query_source!r}"
        )
    if any(not f > 0 for f in fractions.values()) or abs(sum(fractions.values()) - 1) > 1e-6:
        raise ValueError(f"query_source fractions must be positive and sum to 1, got {fractions}")
    return fractions


def pool_queries(queries: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``[H_q, L, D]`` -> ``[H_kv, G*L, D]``: KV head k gets query heads k*G .. k*G+G-1 (GQA grouping)."""
    heads, length, dim = queries.shape
    if heads % num_kv_heads:
        raise ValueError(f"{heads} query heads do not split into {num_kv_heads} KV-head groups")
    return queries.reshape(num_kv_heads, heads // num_kv_heads * length, dim)


def check_budget(budget: int | float) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"budget must be an int (slots) or a float ratio, got {budget!r}")
    if isinstance(budget, float) and not 0 < budget <= 1:
        raise ValueError(f"budget ratio must be in (0, 1], got {budget}")
    if isinstance(budget, int) and budget < 1:
        raise ValueError(f"budget must be >= 1 slot, got {budget}")


def chunk_budgets(
    budget: int | float,
    span: int,
    chunk: range,
    layer: int,
    num_kv_heads: int,
    head_proportions: dict[tuple[int, int], float] | None,
    max_ratio_per_head: float,
) -> list[int]:
    """Slots per KV head for one chunk of the compacted span (the chunk gets its share of the budget)."""
    ratio = budget if isinstance(budget, float) else budget / span
    if head_proportions is None:
        return [max(1, round(ratio * len(chunk)))] * num_kv_heads
    per_layer = head_budgets(head_proportions, min(1.0, ratio), len(chunk), max_ratio_per_head, min_budget=1)
    if layer not in per_layer or len(per_layer[layer]) != num_kv_heads:
        raise ValueError(f"head proportions have no entries for the {num_kv_heads} KV heads of layer {layer}")
    return per_layer[layer]


def subsample_queries(queries: torch.Tensor, cap: int, generator: torch.Generator) -> torch.Tensor:
    """At most ``cap`` queries per head, uniformly without replacement (same indices for every head)."""
    if queries.shape[1] <= cap:
        return queries
    keep = torch.randperm(queries.shape[1], generator=generator)[:cap].sort().values
    return queries[:, keep.to(queries.device)]
