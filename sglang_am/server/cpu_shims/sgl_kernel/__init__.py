"""Stand-in for ``sgl_kernel`` on machines without CUDA (not the real package).

PyPI ships only CUDA builds of ``sgl_kernel`` (distribution ``sglang-kernel``); on a CPU-only machine its
import fails on ``libcuda.so.1``, yet SGLang 0.5.23 imports a few of its CPU names at start-up. This
directory is put on ``PYTHONPATH`` by ``sglang_am.server.cpu`` only when no CUDA device is present. It
provides the two functions SGLang calls while serving plain requests on CPU, written in torch with the
semantics of SGLang's Triton kernels for the same operations, and lazy stubs for every other ``*_cpu``
name (speculative decoding, mamba) that raise ``NotImplementedError`` if they are ever called.
"""

from __future__ import annotations

import ctypes

import torch

__version__ = "0.4.10"  # the version SGLang 0.5.23 pins; some import paths compare it


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """Write ``out_cache_loc`` (consumed in order across requests) into each request's row
    ``req_to_token[req_pool_indices[i], start_offset[i]:end_offset[i]]``."""
    consumed = 0
    for row, start, end in zip(req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist()):
        count = end - start
        if count > 0:
            req_to_token[row, start:end] = out_cache_loc[consumed : consumed + count].to(req_to_token.dtype)
            consumed += count


def copy_all_layer_kv_cache_cpu(
    data_ptrs: torch.Tensor, strides: torch.Tensor, tgt_loc: torch.Tensor, src_loc: torch.Tensor
) -> None:
    """For every KV buffer (raw data pointer, row stride in bytes) copy row ``src_loc[k]`` to row
    ``tgt_loc[k]``. All source rows are read before any is written, so overlapping sets are safe."""
    sources, targets = src_loc.tolist(), tgt_loc.tolist()
    for pointer, stride in zip(data_ptrs.tolist(), strides.tolist()):
        rows = [ctypes.string_at(pointer + source * stride, stride) for source in sources]
        for target, data in zip(targets, rows):
            ctypes.memmove(pointer + target * stride, data, stride)


def _unavailable(name: str):
    def stub(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel.{name} is not available in sglang-am's CPU stand-in")

    stub.__name__ = name
    return stub


def __getattr__(name: str):
    # Only CPU kernel names resolve (to stubs); anything else stays missing so SGLang's
    # `try: from sgl_kernel import x` fallbacks keep working.
    if name.endswith("_cpu"):
        return _unavailable(name)
    raise AttributeError(f"module 'sgl_kernel' (sglang-am CPU stand-in) has no attribute {name!r}")
