"""How well a compacted block reproduces the original block's attention on held-out queries."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import attention
from .types import CompactedKV
from .validation import check_block


@dataclass(frozen=True)
class CompactionError:
    """Per-head means over the held-out queries (each ``[H]``, float32). With a suffix, every metric is
    of attention over ``[block; suffix]``, which is what a request that continues the block sees.

    relative_l2: ``||out_c - out|| / ||out||`` of the block-local attention outputs.
    cosine: cosine similarity of those outputs.
    lse_error: ``|lse_c - lse|``, the log-mass error.
    mass_error: ``|exp(lse_c - lse) - 1|``, the relative mass error the paper reports.
    """

    relative_l2: torch.Tensor
    cosine: torch.Tensor
    lse_error: torch.Tensor
    mass_error: torch.Tensor

    def mean(self) -> dict[str, float]:
        """Each metric averaged over heads."""
        return {name: float(getattr(self, name).mean()) for name in ("relative_l2", "cosine", "lse_error", "mass_error")}


def evaluate(
    keys: torch.Tensor,
    values: torch.Tensor,
    compacted: CompactedKV | tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    heldout_queries: torch.Tensor,
    scale: float | None = None,
    suffix_keys: torch.Tensor | None = None,
    suffix_values: torch.Tensor | None = None,
) -> CompactionError:
    """Compare attention over ``compacted`` with attention over the original ``keys``/``values``.

    ``compacted`` is a ``CompactedKV`` or its ``(keys, values, beta)`` (e.g. one layer of a prefix).

    ``suffix_keys``/``suffix_values`` (``[H, s, D]``, optional) are tokens that follow the block, such as
    a question; they are appended unchanged (bias 0) to both sides. The block-only error misses what
    beta is for: keeping the block's mass right against whatever follows it.
    """
    check_block(keys, values, heldout_queries, queries_name="heldout_queries")
    if isinstance(compacted, CompactedKV):
        compacted = (compacted.keys, compacted.values, compacted.beta)
    if not (isinstance(compacted, tuple) and len(compacted) == 3 and compacted[0].shape[0] == keys.shape[0]):
        raise ValueError(f"compacted must be a CompactedKV or (keys, values, beta) with {keys.shape[0]} heads")
    compacted_keys, compacted_values, beta = (t.float() for t in compacted)
    keys, values = keys.float(), values.float()
    if (suffix_keys is None) != (suffix_values is None):
        raise ValueError("suffix_keys and suffix_values must be given together")
    if suffix_keys is not None:
        check_block(suffix_keys, suffix_values, heldout_queries, queries_name="heldout_queries")
        suffix_keys, suffix_values = suffix_keys.float(), suffix_values.float()
        keys, values = torch.cat([keys, suffix_keys], dim=1), torch.cat([values, suffix_values], dim=1)
        compacted_keys = torch.cat([compacted_keys, suffix_keys], dim=1)
        compacted_values = torch.cat([compacted_values, suffix_values], dim=1)
        beta = torch.cat([beta, beta.new_zeros(suffix_keys.shape[:2])], dim=1)
    reference, reference_lse = attention(heldout_queries, keys, values, scale=scale)
    approx, approx_lse = attention(heldout_queries, compacted_keys, compacted_values, beta, scale=scale)
    tiny = torch.finfo(torch.float32).tiny
    relative_l2 = (approx - reference).norm(dim=-1) / reference.norm(dim=-1).clamp(min=tiny)
    cosine = torch.nn.functional.cosine_similarity(approx, reference, dim=-1)
    log_ratio = approx_lse - reference_lse
    return CompactionError(
        relative_l2=relative_l2.mean(dim=1),
        cosine=cosine.mean(dim=1),
        lse_error=log_ratio.abs().mean(dim=1),
        mass_error=(log_ratio.exp() - 1).abs().mean(dim=1),
    )
