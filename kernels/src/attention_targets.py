"""The solver's attention targets on GPU from FlashInfer's fused attention: each reference query's
attention output over a block's keys and its log-sum-exp, in one pass that never holds the ``n x T``
scores. The torch twin is ``sglang_am.core.block.Block.stats``; ``benchmarks/gpu_check.py`` compares them.
"""

from __future__ import annotations

import math

import torch

# FlashInfer's prefill kernels return the log-sum-exp in base 2 (max + log2 sum exp2).
LN2 = math.log(2.0)
HEAD_DIMS = (64, 128, 256)  # head sizes FlashInfer's prebuilt/JIT prefill kernels cover
DTYPES = (torch.float16, torch.bfloat16)


def attention_targets(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
                      dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(outputs [H, n, Dv], lse [H, n])`` in float32 (natural log) for queries ``[H, n, D]`` over keys
    ``[H, T, D]`` and values ``[H, T, Dv]`` on a CUDA device, computed in ``dtype`` (fp16/bf16) with
    float32 accumulation."""
    if queries.device.type != "cuda":
        raise ValueError(f"FlashInfer attention targets need CUDA tensors, got {queries.device}")
    if dtype not in DTYPES or keys.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"FlashInfer attention targets need dtype in {DTYPES} and head_dim in {HEAD_DIMS}, "
                         f"got {dtype} and {keys.shape[-1]}")
    import flashinfer

    q, k, v = (tensor.transpose(0, 1).to(dtype).contiguous() for tensor in (queries, keys, values))  # NHD
    outputs, lse = flashinfer.single_prefill_with_kv_cache(q, k, v, causal=False, sm_scale=scale, return_lse=True)
    return outputs.transpose(0, 1).float(), lse.transpose(0, 1).float() * LN2
