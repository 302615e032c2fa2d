"""Triton kernels for the solver's streamed attention statistics, without an ``n x T`` matrix in memory.

For ``H`` heads of queries ``[H, n, D]`` and keys ``[H, T, D]`` (float32, scaled logits
``s = scale * q k^T``):

- ``row_max``: ``c_i = max_j s_ij`` per query, the shift of every exp in the mass problem;
- ``key_stats``: per key, the sum, sum of squares and max over queries of the attention weights
  ``A_ij = exp(s_ij - lse_i)`` given each query's log-sum-exp (the RMS/mean/max key scores).

Products run in IEEE float32 (``input_precision="ieee"``), not TF32, to match the torch twin in
``sglang_am.core.block`` (the oracle of ``tests/test_kernels.py``, run under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_QUERIES = 32
BLOCK_KEYS = 64


@triton.jit
def _load_rows(Base, head, stride_h, rows, stride_r, limit, dims, D: tl.constexpr):
    """Rows ``rows`` (< ``limit``) of head ``head``, zero-padded to ``len(dims)`` columns (< ``D``)."""
    return tl.load(Base + head * stride_h + rows[:, None] * stride_r + dims[None, :],
                   mask=(rows[:, None] < limit) & (dims[None, :] < D), other=0.0)


@triton.jit
def _row_max_kernel(Q, K, RowMax, n, T, scale, stride_qh, stride_qn, stride_kh, stride_kt,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
    head = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    q = _load_rows(Q, head, stride_qh, rows, stride_qn, n, dims, D)
    best = tl.full([BLOCK_N], float("-inf"), tl.float32)
    for start in range(0, T, BLOCK_T):
        cols = start + tl.arange(0, BLOCK_T)
        k = _load_rows(K, head, stride_kh, cols, stride_kt, T, dims, D)
        logits = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        logits = tl.where(cols[None, :] < T, logits, float("-inf"))
        best = tl.maximum(best, tl.max(logits, axis=1))
    tl.store(RowMax + head * n + rows, best, mask=rows < n)


@triton.jit
def _key_stats_kernel(Q, K, Lse, Sum, SumSquares, Max, n, T, scale, stride_qh, stride_qn, stride_kh, stride_kt,
                      D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr):
    head = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    dims = tl.arange(0, BLOCK_D)
    k = _load_rows(K, head, stride_kh, cols, stride_kt, T, dims, D)
    total = tl.zeros([BLOCK_T], tl.float32)
    squares = tl.zeros([BLOCK_T], tl.float32)
    best = tl.zeros([BLOCK_T], tl.float32)
    for start in range(0, n, BLOCK_N):
        rows = start + tl.arange(0, BLOCK_N)
        q = _load_rows(Q, head, stride_qh, rows, stride_qn, n, dims, D)
        lse = tl.load(Lse + head * n + rows, mask=rows < n, other=float("inf"))  # padded rows weigh 0
        weights = tl.exp(tl.dot(q, tl.trans(k), input_precision="ieee") * scale - lse[:, None])
        total += tl.sum(weights, axis=0)
        squares += tl.sum(weights * weights, axis=0)
        best = tl.maximum(best, tl.max(weights, axis=0))
    offsets = head * T + cols
    tl.store(Sum + offsets, total, mask=cols < T)
    tl.store(SumSquares + offsets, squares, mask=cols < T)
    tl.store(Max + offsets, best, mask=cols < T)


def _checked(queries: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if queries.dtype != torch.float32 or keys.dtype != torch.float32:
        raise ValueError(f"queries and keys must be float32, got {queries.dtype} and {keys.dtype}")
    if queries.ndim != 3 or keys.ndim != 3 or queries.shape[0] != keys.shape[0] or queries.shape[2] != keys.shape[2]:
        raise ValueError(f"queries [H, n, D] and keys [H, T, D] do not match: {tuple(queries.shape)}, {tuple(keys.shape)}")
    return queries.contiguous(), keys.contiguous()


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def row_max(queries: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """``[H, n]``: each query's largest scaled logit over the keys."""
    queries, keys = _checked(queries, keys)
    heads, n, dim = queries.shape
    out = queries.new_empty(heads, n)
    grid = (heads, triton.cdiv(n, BLOCK_QUERIES))
    _row_max_kernel[grid](queries, keys, out, n, keys.shape[1], scale, queries.stride(0), queries.stride(1),
                          keys.stride(0), keys.stride(1), D=dim, BLOCK_D=_block_d(dim), BLOCK_N=BLOCK_QUERIES,
                          BLOCK_T=BLOCK_KEYS)
    return out


def key_stats(queries: torch.Tensor, keys: torch.Tensor, lse: torch.Tensor, scale: float):
    """``(sum, sum of squares, max)`` over queries of ``exp(s_ij - lse_i)``, each ``[H, T]``."""
    queries, keys = _checked(queries, keys)
    heads, n, dim = queries.shape
    length = keys.shape[1]
    if tuple(lse.shape) != (heads, n):
        raise ValueError(f"lse must be [H, n] = {(heads, n)}, got {tuple(lse.shape)}")
    total, squares, best = (keys.new_empty(heads, length) for _ in range(3))
    grid = (heads, triton.cdiv(length, BLOCK_KEYS))
    _key_stats_kernel[grid](queries, keys, lse.float().contiguous(), total, squares, best, n, length, scale,
                            queries.stride(0), queries.stride(1), keys.stride(0), keys.stride(1), D=dim,
                            BLOCK_D=_block_d(dim), BLOCK_N=BLOCK_QUERIES, BLOCK_T=BLOCK_KEYS)
    return total, squares, best
