"""What the bias-aware backends share: the float mask of torch_native, checked against attention written
out by hand, and the document rows of each forward."""

from types import SimpleNamespace

import torch
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from torch.nn.functional import scaled_dot_product_attention

from sglang_am.server.attention import DocumentRows, attention_mask
from sglang_am.server.capture import CaptureTag, QueryCapture
from sglang_am.server.registry import RequestRecord, Served

from .samples import document


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


def forward(mode, rows, prefix_lens=None, seq_lens=None):
    return SimpleNamespace(forward_mode=mode, req_pool_indices=torch.tensor(rows), req_pool_indices_cpu=None,
                           extend_prefix_lens_cpu=prefix_lens, extend_seq_lens_cpu=seq_lens)


def test_document_rows_follow_the_request_pool_rows_of_each_forward():
    rows, doc = DocumentRows(), document(slots=4)
    capture = QueryCapture({"context-prefill": 1.0}, 64, {"context-prefill": 1}, {"context-prefill": 30}, group=1,
                           layers=range(1), bytes_per_row=4)
    tag = CaptureTag(doc, capture, capture.add_request("context-prefill", 0, 30))
    request = lambda row, **attrs: SimpleNamespace(kv=SimpleNamespace(req_pool_idx=row), **attrs)
    assert rows.batch(forward(ForwardMode.DECODE, [1, 2])) is None  # nothing bound: the fast path
    rows.bind([request(1, am=RequestRecord(served=Served(doc, doc.installed))), request(2),
               request(3, am=RequestRecord(capture=tag))])
    decode = rows.batch(forward(ForwardMode.DECODE, [2, 1]))
    assert decode.versions == [None, doc.installed] and decode.query_lens == [1, 1] and decode.has_documents
    extend = rows.batch(forward(ForwardMode.EXTEND, [1, 3], prefix_lens=[4, 10], seq_lens=[2, 20]))
    (part,) = extend.captures  # positions 10..29 of the capture request, its rows starting at row 2
    assert part.sink.args == (tag.rows,) and part.query_rows.tolist() == list(range(2, 22))
    assert part.slots.tolist() == list(range(10, 30))
    rows.bind([request(1)])  # the row now serves a request without a document
    assert rows.batch(forward(ForwardMode.DECODE, [1])) is None
