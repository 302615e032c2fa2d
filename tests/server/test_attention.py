"""What the bias-aware backends share: the float mask of torch_native, checked against attention written
out by hand, and the document rows of each forward."""

from types import SimpleNamespace

import pytest
import torch
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from torch.nn.functional import scaled_dot_product_attention

from sglang_am.server.scheduler.capture import CaptureTag, QueryCapture
from sglang_am.server.scheduler.registry import RequestRecord, Served
from sglang_am.server.sglang_hooks.attention import DocumentRows, attention_mask

from .samples import document


def _reference(query, keys, values, beta, scale, window=None):
    """Softmax over ``q·k·scale + beta`` (beta on the first t keys, per KV head, shared by its query
    heads), causal for the last L of S positions, and on a window layer blind to keys more than ``window``
    positions back."""
    heads, length, _ = query.shape
    kv_heads, span, _ = keys.shape
    group = heads // kv_heads
    out = torch.empty_like(query)
    for h in range(heads):
        logits = query[h] @ keys[h // group].T * scale  # [L, S]
        logits[:, : beta.shape[1]] += beta[h // group]
        for i in range(length):
            logits[i, span - length + i + 1 :] = float("-inf")
            if window is not None:
                logits[i, : max(0, span - length + i - window)] = float("-inf")
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
    request = lambda row, **attrs: SimpleNamespace(kv=SimpleNamespace(req_pool_idx=row), output_ids=[], **attrs)
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


def test_an_adapting_document_samples_decode_steps_only_where_python_runs():
    from sglang_am.server.scheduler.adapt import LiveQueries

    rows, doc = DocumentRows(), document(slots=4)
    doc.adaptation = SimpleNamespace(live=LiveQueries(layers=[0], capacity=8), answer_steps=3)
    served = RequestRecord(served=Served(doc, doc.installed))
    request = lambda generated: SimpleNamespace(kv=SimpleNamespace(req_pool_idx=1), am=served, output_ids=[7] * generated)
    rows.bind([request(2)])
    (sample,) = rows.batch(forward(ForwardMode.DECODE, [1])).captures  # an eager decode step: its one position
    assert sample.query_rows.tolist() == [0] and sample.slots.tolist() == [0]
    # A CUDA graph's replay runs no Python: a planned sample would never be stored.
    assert rows.batch(forward(ForwardMode.DECODE, [1]), eager=False).captures == []
    rows.bind([request(3)])  # past the answer tokens a registration fits: a long generation does not crowd the prompts out
    assert rows.batch(forward(ForwardMode.DECODE, [1])).captures == [] and doc.adaptation.live.seen == 1


def test_an_observed_request_keeps_its_positions_after_the_document_its_answer_included():
    from sglang_am.server.scheduler.adapt import LiveQueries, Observation
    from sglang_am.server.scheduler.registry import Observed

    rows, observation = DocumentRows(), Observation(LiveQueries(layers=[0], capacity=64), requests_needed=2, answer_steps=2)
    records = {row: RequestRecord(observed=Observed(observation, observation.tag(), start=30)) for row in (1, 3)}
    request = lambda row, generated: SimpleNamespace(kv=SimpleNamespace(req_pool_idx=row), am=records[row],
                                                     output_ids=[7] * generated)
    other = RequestRecord(served=Served(document(slots=4), document(slots=4).installed))
    rows.bind([request(1, 0), request(3, 0), SimpleNamespace(kv=SimpleNamespace(req_pool_idx=2), am=other, output_ids=[])])
    # Request 1: nothing cached, the extend computes the document's 30 positions and 5 after it, from row 3 of the
    # batch; request 3: 2 positions after its cached document, from row 38.
    extend = rows.batch(forward(ForwardMode.EXTEND, [2, 1, 3], prefix_lens=[4, 0, 30], seq_lens=[3, 35, 2]))
    (part,) = extend.captures  # one slice per observation
    assert part.query_rows.tolist() == [33, 34, 35, 36, 37, 38, 39] and extend.versions[1] is None
    assert observation.live.parts[part.slots].tolist() == [0] * 5 + [1] * 2 and observation.live.requests == {0, 1}
    (step,) = rows.batch(forward(ForwardMode.DECODE, [1, 2])).captures  # its answer's first decode step
    assert step.query_rows.tolist() == [0]
    rows.bind([request(1, 2)])  # past the answer steps
    assert rows.batch(forward(ForwardMode.DECODE, [1])).captures == []


def _backend_and_batch(window: int | None, dtype=torch.float32):
    """A torch_native backend of each kind over one real KV pool, a layer, and an extend batch of three requests:
    10 new tokens after a 40-token cached prefix, a 25-token prompt from scratch, 1 token after 60."""
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
    from sglang.srt.layers.radix_attention import AttentionType
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool

    from sglang_am.server.sglang_hooks.attention import AMTorchNativeAttnBackend

    torch.manual_seed(0)
    heads, kv_heads, dim = 4, 2, 16
    pool = MHATokenToKVPool(size=512, page_size=1, dtype=dtype, head_num=kv_heads, head_dim=dim, layer_num=1,
                            device="cpu", enable_memory_saver=False)
    rows = ReqToTokenPool(size=4, max_context_len=128, device="cpu", enable_memory_saver=False)
    runner = SimpleNamespace(device="cpu", req_to_token_pool=rows, token_to_kv_pool=pool)
    prefixes, news = [40, 0, 60], [10, 25, 1]
    slots = torch.randperm(500)[: sum(prefixes) + sum(news)] + 1
    out_cache_loc, start = [], 0
    for row, (prefix, new) in enumerate(zip(prefixes, news), start=1):
        row_slots = slots[start : start + prefix + new]
        rows.req_to_token[row, : prefix + new] = row_slots.to(torch.int32)
        out_cache_loc.append(row_slots[prefix:])
        start += prefix + new
    pool.k_buffer[0][slots] = torch.randn(len(slots), kv_heads, dim, dtype=dtype)  # every prefix's cached KV
    pool.v_buffer[0][slots] = torch.randn(len(slots), kv_heads, dim, dtype=dtype)
    layer = SimpleNamespace(layer_id=0, tp_q_head_num=heads, tp_k_head_num=kv_heads, qk_head_dim=dim, v_head_dim=dim,
                            scaling=dim ** -0.5, sliding_window_size=window, is_cross_attention=False,
                            attn_type=AttentionType.DECODER, k_scale=None, v_scale=None)
    batch = SimpleNamespace(
        forward_mode=ForwardMode.EXTEND, req_pool_indices=torch.tensor([1, 2, 3]), req_pool_indices_cpu=None,
        seq_lens=torch.tensor([p + n for p, n in zip(prefixes, news)]), extend_prefix_lens=torch.tensor(prefixes),
        extend_seq_lens=torch.tensor(news), extend_prefix_lens_cpu=prefixes, extend_seq_lens_cpu=news,
        out_cache_loc=torch.cat(out_cache_loc), encoder_lens=None)
    tokens = sum(news)
    qkv = [torch.randn(tokens, heads * dim, dtype=dtype), torch.randn(tokens, kv_heads, dim, dtype=dtype),
           torch.randn(tokens, kv_heads, dim, dtype=dtype)]  # as RadixAttention hands them over
    return TorchNativeAttnBackend(runner), AMTorchNativeAttnBackend(runner), layer, batch, qkv


@pytest.mark.parametrize("window", [None, 7])
def test_the_extend_computes_only_the_new_tokens_and_matches_sglangs_padded_extend(window):
    stock, ours, layer, batch, (q, k, v) = _backend_and_batch(window)
    for backend in (stock, ours):
        backend.init_forward_metadata(batch)
    expected = stock.forward_extend(q, k, v, layer, batch)  # writes the new tokens' KV too
    served = ours.forward_extend(q, k, v, layer, batch)
    assert ours.documents is None  # no document in this batch: the efficient path all the same
    torch.testing.assert_close(served, expected, rtol=1e-5, atol=1e-5)


def _version(bias: torch.Tensor):
    from sglang_am.server.scheduler.registry import Installed

    return Installed(torch.arange(bias.shape[1]), None, None, [bias], [], None, 0, 1)


def _assert_decode_matches_reference(ours, layer, extend, versions, betas, window=None):
    """One decode query per request of ``extend`` through ``_attend`` with ``versions``, against ``_reference``
    with each request's beta ``[H_kv, t]`` (``betas``)."""
    lengths = extend.seq_lens.tolist()  # each request's cached KV, now attended by one new query
    batch = SimpleNamespace(forward_mode=ForwardMode.DECODE, req_pool_indices=extend.req_pool_indices, seq_lens=extend.seq_lens)
    heads, dim = layer.tp_q_head_num, layer.qk_head_dim
    q = torch.randn(len(lengths), heads * dim)
    served = ours._attend(q, None, None, layer, batch, False, [1] * len(lengths), versions)
    pool, rows = ours.token_to_kv_pool, ours.req_to_token_pool.req_to_token
    for request, (length, bias) in enumerate(zip(lengths, betas)):
        slots = rows[request + 1, :length]
        keys, values = pool.k_buffer[0][slots].transpose(0, 1), pool.v_buffer[0][slots].transpose(0, 1)
        expected = _reference(q[request].view(heads, 1, dim), keys, values, bias, layer.scaling, window)
        torch.testing.assert_close(served[request].view(heads, dim), expected[:, 0], rtol=1e-5, atol=1e-5)


def test_a_decode_step_adds_each_versions_beta_and_nothing_where_beta_is_zero():
    _, ours, layer, extend, _ = _backend_and_batch(None)
    heads, kv_heads = layer.tp_q_head_num, layer.tp_k_head_num
    beta = torch.randn(kv_heads, 6)
    beta[1, -2:] = float("-inf")  # a narrower head's padding
    compacted, verbatim = _version(beta), _version(torch.zeros(kv_heads, 8))
    none = torch.zeros(kv_heads, 0)
    _assert_decode_matches_reference(ours, layer, extend, [compacted, verbatim, None], [beta, none, none])
    assert verbatim.decode_bias(0, heads // kv_heads, torch.float32) is None  # plain attention: no mask at all


@pytest.mark.parametrize("window", [None, 7])
def test_a_decode_step_without_documents_matches_sglangs_decode(window):
    stock, ours, layer, extend, _ = _backend_and_batch(window)
    batch = SimpleNamespace(forward_mode=ForwardMode.DECODE, req_pool_indices=extend.req_pool_indices,
                            req_pool_indices_cpu=None, seq_lens=extend.seq_lens, encoder_lens=None,
                            out_cache_loc=None)
    q = torch.randn(3, layer.tp_q_head_num * layer.qk_head_dim)
    for backend in (stock, ours):
        backend.init_forward_metadata(batch)
    expected = stock.forward_decode(q, None, None, layer, batch, save_kv_cache=False)
    torch.testing.assert_close(ours.forward_decode(q, None, None, layer, batch, save_kv_cache=False), expected,
                               rtol=1e-5, atol=1e-5)


def test_a_window_layer_gathers_only_its_window_and_keeps_a_compacted_windows_beta():
    """Decode steps 50, 25 and 61 positions in, window 45: the first skips 4 of its 6 compacted slots (beta
    sliced), the second sees all, the third none of them."""
    window = 45
    _, ours, layer, extend, _ = _backend_and_batch(window)
    beta = torch.randn(layer.tp_k_head_num, 6)
    beta[:, 0] = float("-inf")  # left of a compacted window's slots
    _assert_decode_matches_reference(ours, layer, extend, [_version(beta)] * 3, [beta] * 3, window)
