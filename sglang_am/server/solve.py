"""The solve step: a document's KV in the pool and its captured queries become a ``CompactedPrefix``.

It runs on the solver thread (``jobs``) while the scheduler keeps serving, so it only reads: the
document's KV stays locked in the tree (``cache.SourceHold``) until the scheduler has the result, and the
captured queries belong to the registration. The per-layer work is the core's ``LayerPlan``, the same
loop the transformers adapter runs; the result is the artifact that save, load and install all use.
"""

from __future__ import annotations

import time

import torch

from ..core.plan import LayerPlan, assemble_layer, pad_layers
from ..prefix import CompactedPrefix
from . import faults
from .capture import QueryCapture
from .layout import window_slots


def solve_document(pool, source: torch.Tensor, capture: QueryCapture, plan: LayerPlan, token_ids: list[int],
                   windows: tuple[int | None, ...], fingerprint: dict, config: dict) -> CompactedPrefix:
    """Compact every global layer of the document whose KV sits in pool ``source`` slots; a sliding-window
    layer (``windows``) keeps its window of the document, verbatim or compacted (``plan.compact_windows``),
    as the transformers adapter does."""
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(0)
    length, kept = len(token_ids), plan.keep_first
    clock = {"selection": 0.0, "beta": 0.0, "values": 0.0}
    keys, values, betas = [], [], []
    for layer in range(pool.layer_num):
        faults.inject("solve")
        faults.inject("solver_exit")
        # In the pool's dtype: the solver computes in float32, and its GPU path runs FlashInfer in this dtype.
        layer_keys = pool.k_buffer[layer][source].permute(1, 0, 2)  # [H_kv, T, D]
        layer_values = pool.v_buffer[layer][source].permute(1, 0, 2)
        window = window_slots(windows[layer], length)
        if window is not None:
            queries = plan.reference_queries(capture.queries(layer), pool.head_num, generator) if plan.compact_windows else None
            window_kv = layer_keys[:, length - window :], layer_values[:, length - window :]
            layer_k, layer_v, layer_b = plan.compact_window(*window_kv, queries, length - kept, layer, pool.layer_num,
                                                            capture.scales[layer])
            keys.append(layer_k)
            values.append(layer_v)
            betas.append(layer_b.float())
            continue
        queries = plan.reference_queries(capture.queries(layer), pool.head_num, generator)
        result = plan.compact_span(layer_keys[:, kept:], layer_values[:, kept:], queries, length - kept,
                                   range(length - kept), layer, pool.layer_num, capture.scales[layer])
        for stage, seconds in result.timings.items():
            clock[stage] += seconds
        empty = layer_keys[:, :0], layer_values[:, :0]
        layer_k, layer_v, layer_b = assemble_layer((layer_keys[:, :kept], layer_values[:, :kept]), [result], empty)
        keys.append(layer_k)
        values.append(layer_v)
        betas.append(layer_b.float())
    keys, values, betas = pad_layers(keys, values, betas, fixed=[w is not None for w in windows])
    timings = {f"{stage}_seconds": round(seconds, 4) for stage, seconds in clock.items()}
    timings["solve_seconds"] = round(time.perf_counter() - started, 4)
    return CompactedPrefix(keys=keys, values=values, beta=betas, logical_length=length, token_ids=list(token_ids),
                           fingerprint=fingerprint, method=plan.method, config=config, timings=timings)
