"""One compaction problem in float32, and the attention statistics the methods share.

Everything that touches the full ``n x T`` score matrix streams over query chunks, so peak memory is
``H x query_chunk x T`` floats (AM-OMP's greedy loop holds mass-feature matrices, ``mass_features``, for as
many heads and candidate keys as its ``memory_bytes`` allows).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from .cancel import checkpoint

SCORE_KINDS = ("rms", "mean", "max")
STATS_BACKENDS = ("auto", "torch", "gpu")
# The n x T products (scores, attention outputs, mass features) may run in bfloat16 with float32 results;
# every reduction, exp and fit stays float32.
SCORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
POOLINGS = (None, "max", "avg")
# Default score tile: 4 Mi floats (16 MiB). Several elementwise passes run over each tile, so one that
# stays cache-sized ran 1.2-1.5x faster on CPU than 1024-query chunks (H=8, D=128, T=2048 and 8192).
SCORE_TILE_ELEMENTS = 1 << 22


def query_chunk_for(heads: int, length: int, query_chunk: int | None) -> int:
    """Queries per chunk: ``query_chunk`` if given, else as many as fit one default score tile."""
    return query_chunk if query_chunk is not None else max(1, SCORE_TILE_ELEMENTS // (heads * length))


@dataclass(frozen=True)
class AttentionStats:
    """Per-query targets and per-key attention scores of the original block."""

    max_logit: torch.Tensor  # [H, n]   c_i = max_j s_ij (the per-query shift of every exp)
    mass: torch.Tensor  # [H, n]        sum_j exp(s_ij - c_i)
    outputs: torch.Tensor | None  # [H, n, Dv] softmax(s) V, the local outputs (None if not needed)
    key_sum: torch.Tensor  # [H, T]     sum_i A_ij
    key_sum_squares: torch.Tensor  # [H, T]
    key_max: torch.Tensor  # [H, T]

    def key_scores(self, kind: str, num_queries: int) -> torch.Tensor:
        if kind == "rms":
            return (self.key_sum_squares / num_queries).sqrt()
        if kind == "mean":
            return self.key_sum / num_queries
        if kind == "max":
            return self.key_max
        raise ValueError(f"score must be one of {SCORE_KINDS}, got {kind!r}")


def resolve_stats_backend(requested: str, keys: torch.Tensor, key_bias: torch.Tensor | None) -> str:
    """``"gpu"`` (FlashInfer targets, Triton key scores: ``sglang_am.kernels``) or ``"torch"``.

    ``"auto"`` picks ``"gpu"`` for CUDA keys in fp16/bf16 (the model's own precision: FlashInfer has no
    float32 path) with a head size FlashInfer covers and no key bias, else ``"torch"``."""
    from ..kernels.attention_targets import DTYPES, HEAD_DIMS

    if requested not in STATS_BACKENDS:
        raise ValueError(f"stats_backend must be one of {STATS_BACKENDS}, got {requested!r}")
    fits = keys.device.type == "cuda" and keys.dtype in DTYPES and keys.shape[-1] in HEAD_DIMS and key_bias is None
    if requested == "gpu" and not fits:
        raise ValueError(f"stats_backend='gpu' needs CUDA keys in {DTYPES} with head_dim in {HEAD_DIMS} and no "
                         f"key_bias; got {keys.device}, {keys.dtype}, head_dim {keys.shape[-1]}, "
                         f"key_bias {'given' if key_bias is not None else 'None'}")
    return "gpu" if requested == "gpu" or (requested == "auto" and fits) else "torch"


class Block:
    """Keys ``[H, T, D]``, values ``[H, T, Dv]`` and reference queries ``[H, n, D]`` as float32, and an
    optional logit bias ``[H, T]`` already on the keys (part of every original logit).

    ``stats_backend`` (see ``resolve_stats_backend``) computes the attention statistics in torch, or on
    GPU with FlashInfer (outputs, log-sum-exp, in the keys' dtype) and Triton (row max, key scores).
    ``score_dtype`` (``SCORE_DTYPES``) is the precision of the n x T matmuls run in torch: the torch backend's
    statistics, OMP's mass features and first-step correlations."""

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        queries: torch.Tensor,
        scale: float,
        query_chunk: int | None = None,
        need_outputs: bool = True,
        key_bias: torch.Tensor | None = None,
        stats_backend: str = "auto",
        score_dtype: str = "float32",
    ):
        if score_dtype not in SCORE_DTYPES:
            raise ValueError(f"score_dtype must be one of {sorted(SCORE_DTYPES)}, got {score_dtype!r}")
        self.stats_backend = resolve_stats_backend(stats_backend, keys, key_bias)
        self.input_dtype = keys.dtype
        self.key_bias = None if key_bias is None else key_bias.float()
        self.keys = keys.float()
        self.values = values.float()
        self.queries = queries.float()
        self.scale = scale
        self.query_chunk = query_chunk_for(keys.shape[0], keys.shape[1], query_chunk)
        self.need_outputs = need_outputs
        self.score_dtype = SCORE_DTYPES[score_dtype]
        # Operands of the n x T products, kept once in score_dtype (the float32 tensors themselves by default).
        self._score_queries = self.queries.to(self.score_dtype)
        self._score_keys_t = self.keys.to(self.score_dtype).transpose(1, 2)
        self._score_values = self.values.to(self.score_dtype)

    def _product(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """``left @ right`` in ``score_dtype``, as float32."""
        return torch.bmm(left.to(self.score_dtype), right).float()

    @property
    def num_heads(self) -> int:
        return self.keys.shape[0]

    @property
    def length(self) -> int:
        return self.keys.shape[1]

    @property
    def num_queries(self) -> int:
        return self.queries.shape[1]

    def logits(self, start: int) -> torch.Tensor:
        """Scaled logits ``[H, chunk, T]`` (plus the key bias) of the query chunk starting at ``start``."""
        logits = self._product(self._score_queries[:, start : start + self.query_chunk], self._score_keys_t).mul_(self.scale)
        return logits if self.key_bias is None else logits.add_(self.key_bias.unsqueeze(1))

    def selected_logits(self, selected_keys: torch.Tensor, heads: slice = slice(None)) -> torch.Tensor:
        """Scaled logits ``[h, n, t]`` of every query of ``heads`` against their selected keys ``[h, t, D]``."""
        return torch.bmm(self.queries[heads], selected_keys.transpose(1, 2)).mul_(self.scale)

    def chunk_starts(self) -> Iterator[int]:
        for start in range(0, self.num_queries, self.query_chunk):
            checkpoint()  # each chunk is one n_chunk x T score pass: where a cancelled solve stops
            yield start

    @cached_property
    def stats(self) -> AttentionStats:
        return self._gpu_stats() if self.stats_backend == "gpu" else self._torch_stats()

    def _gpu_stats(self) -> AttentionStats:
        from ..kernels.attention_targets import attention_targets
        from ..kernels.key_scores import key_stats, row_max

        outputs, lse = attention_targets(self.queries, self.keys, self.values, self.scale, self.input_dtype)
        max_logit = row_max(self.queries, self.keys, self.scale)
        key_sum, key_sum_squares, key_max = key_stats(self.queries, self.keys, lse, self.scale)
        return AttentionStats(
            max_logit=max_logit,
            mass=(lse - max_logit).exp(),
            outputs=outputs if self.need_outputs else None,
            key_sum=key_sum,
            key_sum_squares=key_sum_squares,
            key_max=key_max,
        )

    def _torch_stats(self) -> AttentionStats:
        h, t = self.num_heads, self.length
        key_sum = self.keys.new_zeros(h, t)
        key_sum_squares = self.keys.new_zeros(h, t)
        key_max = self.keys.new_zeros(h, t)
        max_logits, masses, outputs = [], [], []
        for start in self.chunk_starts():
            logits = self.logits(start)
            max_logit = logits.amax(dim=-1)
            weights = logits.sub_(max_logit.unsqueeze(-1)).exp_()
            mass = weights.sum(dim=-1)
            weights.div_(mass.unsqueeze(-1))
            if self.need_outputs:
                outputs.append(self._product(weights, self._score_values))
            key_sum += weights.sum(dim=1)
            key_max = torch.maximum(key_max, weights.amax(dim=1))
            key_sum_squares += weights.square_().sum(dim=1)
            max_logits.append(max_logit)
            masses.append(mass)
        return AttentionStats(
            max_logit=torch.cat(max_logits, dim=1),
            mass=torch.cat(masses, dim=1),
            outputs=torch.cat(outputs, dim=1) if self.need_outputs else None,
            key_sum=key_sum,
            key_sum_squares=key_sum_squares,
            key_max=key_max,
        )

    def key_scores(self, kind: str, pooling: str | None = None, pool_kernel: int = 7) -> torch.Tensor:
        """Per-key attention score ``[H, T]`` over the reference queries, optionally pooled along positions."""
        scores = self.stats.key_scores(kind, self.num_queries)
        if pooling is None:
            return scores
        if pooling == "max":
            return F.max_pool1d(scores.unsqueeze(1), pool_kernel, stride=1, padding=pool_kernel // 2).squeeze(1)
        if pooling == "avg":
            return F.avg_pool1d(scores.unsqueeze(1), pool_kernel, stride=1, padding=pool_kernel // 2).squeeze(1)
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")

    def mass_features(self, heads: torch.Tensor, candidates: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``Phi = exp(s - c)`` ``[h, n, C]`` (materialised) of the ``heads`` (indices ``[h]``) over their
        ``candidates`` (key indices ``[h, C]``; every key when None), and the mass targets ``[h, n]``, always
        over every key."""
        keys_t = self._score_keys_t[heads]
        if candidates is not None:
            keys_t = keys_t.gather(2, candidates.unsqueeze(1).expand(-1, keys_t.shape[1], -1))
        bias = None if self.key_bias is None else self.key_bias[heads]
        if bias is not None and candidates is not None:
            bias = bias.gather(1, candidates)
        shift = self.stats.max_logit[heads]
        phi = self.keys.new_empty(len(heads), self.num_queries, keys_t.shape[2])
        for start in self.chunk_starts():
            stop = start + self.query_chunk
            logits = self._product(self._score_queries[heads, start:stop], keys_t).mul_(self.scale)
            if bias is not None:
                logits.add_(bias.unsqueeze(1))
            phi[:, start:stop] = logits.sub_(shift[:, start:stop].unsqueeze(-1)).exp_()
        return phi, self.stats.mass[heads]

    def first_correlation(self) -> torch.Tensor:
        """``Phi^T m`` ``[H, T]``: each key's correlation with the mass targets, the score of OMP's first step
        (one more streamed pass over the scores)."""
        correlation = self.keys.new_zeros(self.num_heads, self.length)
        for start in self.chunk_starts():
            logits = self.logits(start)
            phi = logits.sub_(self.stats.max_logit[:, start : start + logits.shape[1]].unsqueeze(-1)).exp_()
            correlation += torch.bmm(self.stats.mass[:, start : start + logits.shape[1]].unsqueeze(1), phi).squeeze(1)
        return correlation

    def shifted_exp(self, selected_keys: torch.Tensor, heads: slice = slice(None)) -> torch.Tensor:
        """``exp(q C_kᵀ · scale - c)`` ``[h, n, t]``: the mass features of the selected keys of ``heads``."""
        return self.selected_logits(selected_keys, heads).sub_(self.stats.max_logit[heads].unsqueeze(-1)).exp_()

    def compacted_weights(self, selected_keys: torch.Tensor, beta: torch.Tensor, heads: slice = slice(None)) -> torch.Tensor:
        """``softmax(q C_kᵀ · scale + beta)`` ``[h, n, t]`` over the compacted slots of ``heads``."""
        logits = self.selected_logits(selected_keys, heads)
        # A head left with no slots (possible under a global budget) has all -inf: give it zero weights.
        return torch.softmax(logits.add_(beta.unsqueeze(1)), dim=-1).nan_to_num_(0.0)
