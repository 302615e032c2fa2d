"""The float mask of the bias-aware torch_native backend, checked against attention written out by hand."""

import torch
from torch.nn.functional import scaled_dot_product_attention

from sglang_am.server.attention import attention_mask


def _reference(query, keys, values, beta, scale):
    """Softmax over ``q·k·scale + beta`` (beta on the first t keys, per KV head, shared by its query
    heads), causal for the last L of S positions."""
    heads, length, _ = query.shape
    kv_heads, span, _ = keys.shape
    group = heads // kv_heads
    out = torch.empty_like(query)
    for h in range(heads):
        logits = query[h] @ keys[h // group].T * scale  # [L, S]
        logits[:, : beta.shape[1]] += beta[h // group]
        for i in range(length):
            logits[i, span - length + i + 1 :] = float("-inf")
        out[h] = torch.softmax(logits, dim=-1) @ values[h // group]
    return out


def test_mask_adds_beta_on_the_compacted_slots_and_stays_causal():
    torch.manual_seed(0)
    heads, kv_heads, dim, slots, suffix = 4, 2, 8, 5, 3
    span = slots + suffix
    query = torch.randn(heads, suffix, dim, dtype=torch.float64)
    keys, values = torch.randn(kv_heads, span, dim, dtype=torch.float64), torch.randn(kv_heads, span, dim, dtype=torch.float64)
    beta = torch.randn(kv_heads, slots, dtype=torch.float64)
    beta[1, -1] = float("-inf")  # a padding slot of a narrower head
    mask = attention_mask(suffix, span, beta, heads // kv_heads, "cpu").to(torch.float64)
    assert mask.shape == (1, heads, suffix, span)
    served = scaled_dot_product_attention(query[None], keys[None], values[None], attn_mask=mask, scale=0.3, enable_gqa=True)[0]
    assert torch.allclose(served, _reference(query, keys, values, beta, 0.3), atol=1e-12)


def test_mask_without_a_document_is_plain_causal():
    mask = attention_mask(2, 4, None, 2, "cpu")
    assert mask.shape == (1, 1, 2, 4)
    assert torch.equal(torch.isinf(mask[0, 0]), torch.tensor([[False, False, False, True], [False] * 4]))
