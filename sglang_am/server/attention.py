"""The bias-aware ``torch_native`` attention backend (CPU path and the oracle for the GPU kernels).

It replaces SGLang's ``torch_native`` entry (same name, so every code path that branches on the
backend string still sees ``torch_native``). Batches with no compacted document and no capture
request go to SGLang's own implementation unchanged. Otherwise each request is one SDPA call with a
float mask: causal ``-inf`` above the diagonal, plus the document's beta on KV positions ``< t`` (the
compacted slots are always a request's first t KV positions). Capture requests copy their query rows
(post-RoPE, as RadixAttention receives them) into the document being registered.
"""

from __future__ import annotations

import torch
from torch.nn.functional import scaled_dot_product_attention

from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from .hooks import batch_info


class AMTorchNativeAttnBackend(TorchNativeAttnBackend):
    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        info = batch_info(forward_batch)
        if info is not None and info.captures:
            self._capture(q, layer, info)
        if info is None or not info.has_documents:
            return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
        return self._biased(q, k, v, layer, forward_batch, save_kv_cache, info)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        info = batch_info(forward_batch)
        if info is None or not info.has_documents:
            return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
        return self._biased(q, k, v, layer, forward_batch, save_kv_cache, info)

    def _layer_index(self, layer) -> int:
        return layer.layer_id - getattr(self.token_to_kv_pool, "start_layer", 0)

    def _capture(self, q, layer, info) -> None:
        rows = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        for capture in info.captures:
            capture.document.record(capture.source, self._layer_index(layer), rows[capture.rows], layer.scaling)

    def _biased(self, q, k, v, layer, forward_batch, save_kv_cache, info):
        if layer.is_cross_attention or (layer.sliding_window_size is not None and layer.sliding_window_size > -1):
            raise NotImplementedError("sglang-am serves compacted documents on full causal self-attention only")
        if save_kv_cache and k is not None and v is not None:
            self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc, self.swa_out_cache_loc), k, v)
        heads, kv_heads, dim = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        queries = q.reshape(-1, heads, dim)
        output = q.new_empty((queries.shape[0], heads, layer.v_head_dim))
        key_cache = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        value_cache = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
        req_to_token = self.req_to_token_pool.req_to_token
        layer_index = self._layer_index(layer)
        start = 0
        for row, kv_len, q_len, document in zip(
            forward_batch.req_pool_indices.tolist(), forward_batch.seq_lens.tolist(), info.query_lens, info.documents
        ):
            slots = req_to_token[row, :kv_len]
            keys = key_cache[slots].transpose(0, 1).unsqueeze(0).to(queries.dtype)  # [1, H_kv, S, D]
            values = value_cache[slots].transpose(0, 1).unsqueeze(0).to(queries.dtype)
            query = queries[start : start + q_len].transpose(0, 1).unsqueeze(0)  # [1, H_q, L, D]
            mask = attention_mask(q_len, kv_len, document.bias[layer_index] if document else None, heads // kv_heads, queries.device)
            out = scaled_dot_product_attention(query, keys, values, attn_mask=mask.to(queries.dtype),
                                               scale=layer.scaling, enable_gqa=heads != kv_heads)
            output[start : start + q_len] = out[0].transpose(0, 1)
            start += q_len
        return output.reshape(q.shape[0], heads * layer.v_head_dim)


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
