"""A FlashInfer JIT attention variant adding a compacted document's beta (``am_bias_variant.cuh``).

``jit_args`` builds the ``jit_args`` list of FlashInfer 0.7.2's ``BatchPrefillWithPagedKVCacheWrapper``
and (with ``use_tensor_cores=True``) ``BatchDecodeWithPagedKVCacheWrapper``: two extra tensors, the
layer's bias region and the per-request ``(base, slots)`` rows of a ``BiasTable`` (one row per
request, ``batch_idx``), and the attention scale as an extra scalar; ``run`` takes them after the KV
cache, in that order. Building a wrapper compiles the variant with nvcc (once per uri, cached by
FlashInfer); ``generate_sources`` only renders the CUDA sources, which works without a GPU.
"""

from __future__ import annotations

from pathlib import Path

import torch

VARIANT_NAME = "AMDocumentBias"
VARIANT_SOURCE = Path(__file__).with_name("am_bias_variant.cuh")
TENSOR_NAMES = ["am_bias", "am_rows"]
TENSOR_DTYPES = ["float", "float"]
SCALAR_NAMES = ["sm_scale"]
SCALAR_DTYPES = ["double"]
_DTYPE_NAMES = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float8_e4m3fn: "e4m3"}


def jit_args(q_dtype: torch.dtype, kv_dtype: torch.dtype, head_dim: int) -> list:
    """The ``jit_args`` of a wrapper running the variant for these dtypes and head size."""
    if q_dtype not in (torch.float16, torch.bfloat16) or kv_dtype not in _DTYPE_NAMES:
        raise ValueError(f"the FlashInfer bias variant needs fp16/bf16 queries and fp16/bf16/fp8 KV, "
                         f"got {q_dtype} and {kv_dtype}")
    uri = f"am_document_bias_q{_DTYPE_NAMES[q_dtype]}_kv{_DTYPE_NAMES[kv_dtype]}_d{head_dim}"
    return [uri, q_dtype, kv_dtype, q_dtype, torch.int32, head_dim, head_dim, TENSOR_NAMES, TENSOR_DTYPES,
            SCALAR_NAMES, SCALAR_DTYPES, VARIANT_NAME, VARIANT_SOURCE.read_text()]


def generate_sources(args: list) -> list[Path]:
    """Render the batch prefill module's CUDA sources for ``args`` (no compilation; without a GPU, set
    ``FLASHINFER_CUDA_ARCH_LIST``, e.g. ``9.0``, to name the target)."""
    from flashinfer.jit.attention.modules import gen_customize_batch_prefill_module

    return [Path(source) for source in gen_customize_batch_prefill_module("fa2", *args).sources]
