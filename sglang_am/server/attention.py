"""The bias-aware ``torch_native`` attention backend (CPU path and the oracle for the GPU kernels),
and the helpers every bias-aware backend shares.

It replaces SGLang's ``torch_native`` entry (same name, so every code path that branches on the
backend string still sees ``torch_native``). Batches with no compacted document and no capture
request go to SGLang's own implementation unchanged. Otherwise each request is one SDPA call with a
float mask: causal ``-inf`` above the diagonal, plus the document's beta on KV positions ``< t`` (the
compacted slots are always a request's first t KV positions). Capture requests copy their query rows
(post-RoPE, as RadixAttention receives them) into the document being registered.
"""

from __future__ import annotations

import os

import torch
from torch.nn.functional import scaled_dot_product_attention

from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from .documents import STORE
from .hooks import batch_info


class AMTorchNativeAttnBackend(TorchNativeAttnBackend):
    adds_document_bias = True  # checked before a document is registered

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        info = batch_info(forward_batch)
        if info is not None and info.captures:
            capture_queries(q, layer, info, layer_index(self, layer))
        if info is None or not info.has_documents:
            return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
        return self._biased(q, k, v, layer, forward_batch, save_kv_cache, info)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        info = batch_info(forward_batch)
        if info is None or not info.has_documents:
            return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
        return self._biased(q, k, v, layer, forward_batch, save_kv_cache, info)

    def _biased(self, q, k, v, layer, forward_batch, save_kv_cache, info):
        check_full_attention(layer)
        if save_kv_cache and k is not None and v is not None:
            self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc, self.swa_out_cache_loc), k, v)
        heads, kv_heads, dim = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        queries = q.reshape(-1, heads, dim)
        output = q.new_empty((queries.shape[0], heads, layer.v_head_dim))
        key_cache = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        value_cache = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
        req_to_token = self.req_to_token_pool.req_to_token
        index = layer_index(self, layer)
        start = 0
        for row, kv_len, q_len, document in zip(
            forward_batch.req_pool_indices.tolist(), forward_batch.seq_lens.tolist(), info.query_lens, info.documents
        ):
            slots = req_to_token[row, :kv_len]
            keys = key_cache[slots].transpose(0, 1).unsqueeze(0).to(queries.dtype)  # [1, H_kv, S, D]
            values = value_cache[slots].transpose(0, 1).unsqueeze(0).to(queries.dtype)
            query = queries[start : start + q_len].transpose(0, 1).unsqueeze(0)  # [1, H_q, L, D]
            mask = attention_mask(q_len, kv_len, document.bias[index] if document else None, heads // kv_heads, queries.device)
            out = scaled_dot_product_attention(query, keys, values, attn_mask=mask.to(queries.dtype),
                                               scale=layer.scaling, enable_gqa=heads != kv_heads)
            output[start : start + q_len] = out[0].transpose(0, 1)
            start += q_len
        return output.reshape(q.shape[0], heads * layer.v_head_dim)


BIAS_SLOTS_VARIABLE = "SGLANG_AM_BIAS_SLOTS"
DEFAULT_BIAS_SLOTS = 1 << 17  # compacted slots of all resident documents: 2 MiB per layer at 4 KV heads


def bias_capacity_slots(pool_size: int) -> int:
    """Slots the bias table holds: ``SGLANG_AM_BIAS_SLOTS`` or the default, at most the KV pool size."""
    raw = os.environ.get(BIAS_SLOTS_VARIABLE)
    try:
        slots = DEFAULT_BIAS_SLOTS if raw is None else int(raw)
    except ValueError:
        raise ValueError(f"{BIAS_SLOTS_VARIABLE} must be a positive integer, got {raw!r}") from None
    if slots < 1:
        raise ValueError(f"{BIAS_SLOTS_VARIABLE} must be a positive integer, got {raw!r}")
    return min(slots, pool_size)


def layer_index(backend, layer) -> int:
    """``layer``'s index among this rank's layers (a document's per-layer lists are indexed so)."""
    return layer.layer_id - getattr(backend.token_to_kv_pool, "start_layer", 0)


def capture_queries(q, layer, info, index: int) -> None:
    """Copy the query rows of a registration's capture requests into their document."""
    rows = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
    for capture in info.captures:
        capture.document.record(capture.source, index, rows[capture.rows], layer.scaling)


def write_bias_rows(table, forward_batch, per_token: bool) -> None:
    """Fill ``table``'s rows for ``forward_batch``: one per query token (``per_token``: the Triton
    kernels' ``q_idx`` in extend) or one per request, placing each used document's beta on first use."""
    info = batch_info(forward_batch)
    if info is None or not info.has_documents:
        table.set_rows([], [], [])
        return
    bases = [-1 if doc is None else table.base_of(doc.index, lambda doc=doc: doc.bias, _is_ready)
             for doc in info.documents]
    slots = [0 if doc is None else doc.num_slots for doc in info.documents]
    table.set_rows(bases, slots, info.query_lens if per_token else [1] * len(bases))


def _is_ready(index: int) -> bool:
    """Is document ``index`` still ready? Asked only when the bias table runs out of room."""
    return any(doc.index == index and doc.state == "ready" for doc in STORE.documents.values())


class DocumentBiasRows:
    """Mixin for a backend with a ``bias_table``: fills its rows for every forward, at both of SGLang's
    metadata entry points (eager forwards; CUDA-graph capture and replay). ``ROWS_PER_TOKEN``: one row
    per query token (the Triton kernels' ``q_idx``) rather than one per request."""

    adds_document_bias = True  # checked before a document is registered
    ROWS_PER_TOKEN: bool

    def make_bias_table(self, model_runner, q_heads: int, kv_heads: int):
        from sglang_am.kernels.bias_table import BiasTable  # imports triton: not on the torch_native path

        pool_size = model_runner.max_total_num_tokens
        requests = model_runner.req_to_token_pool.size
        return BiasTable(
            num_layers=model_runner.token_to_kv_pool.layer_num,
            kv_heads=kv_heads,
            group=q_heads // kv_heads,
            capacity_slots=bias_capacity_slots(pool_size),
            # Every extend token needs a pool slot, every request a request slot; padding rows need slack.
            max_rows=(pool_size + requests if self.ROWS_PER_TOKEN else requests) + 256,
            device=model_runner.device,
        )

    def init_forward_metadata(self, forward_batch):
        super().init_forward_metadata(forward_batch)
        write_bias_rows(self.bias_table, forward_batch, per_token=self.ROWS_PER_TOKEN)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        super().init_forward_metadata_out_graph(forward_batch, in_capture)
        write_bias_rows(self.bias_table, forward_batch, per_token=self.ROWS_PER_TOKEN)


def check_full_attention(layer) -> None:
    if layer.is_cross_attention or (layer.sliding_window_size is not None and layer.sliding_window_size > -1):
        raise NotImplementedError("sglang-am serves compacted documents on full causal self-attention only")


def attention_mask(q_len: int, kv_len: int, bias: torch.Tensor | None, group: int, device) -> torch.Tensor:
    """Additive mask ``[1, H_q or 1, q_len, kv_len]`` for the last ``q_len`` of ``kv_len`` positions:
    ``-inf`` above the causal diagonal, and ``bias`` ``[H_kv, t]`` (repeated over each GQA group) on the
    first t KV positions."""
    query_pos = torch.arange(kv_len - q_len, kv_len, device=device).unsqueeze(1)
    causal = torch.zeros(q_len, kv_len, device=device).masked_fill(torch.arange(kv_len, device=device) > query_pos, float("-inf"))
    if bias is None:
        return causal[None, None]
    per_head = causal.expand(bias.shape[0] * group, q_len, kv_len).clone()
    per_head[:, :, : bias.shape[1]] += bias.repeat_interleave(group, dim=0)[:, None, :]
    return per_head[None]
