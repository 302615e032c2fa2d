"""``AMRadixCache`` over a real SGLang radix tree and KV pool: installing a document (windows verbatim or
compacted), freeing it on removal and on every failure, and holding or removing captured prefixes."""

import dataclasses
import math
from array import array

import pytest
import torch
from sglang.srt.managers.schedule_batch import Req
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool

from sglang_am.prefix import CompactedPrefix
from sglang_am.server.auto import AutoPolicy
from sglang_am.server.errors import DocumentError
from sglang_am.server.scheduler.cache import AMRadixCache
from sglang_am.server.scheduler.registry import DocState, Document, DocumentRegistry, document_id


def radix_cache(windows, dtype=torch.float32):
    """A radix cache over a 2-layer pool of ``dtype`` whose layers have ``windows``."""
    pool = MHATokenToKVPool(size=256, page_size=1, dtype=dtype, head_num=2, head_dim=8, layer_num=2,
                            device="cpu", enable_memory_saver=False)
    allocator = TokenToKVPoolAllocator(size=256, dtype=dtype, device="cpu", kvcache=pool, need_sort=False)
    requests = ReqToTokenPool(size=4, max_context_len=512, device="cpu", enable_memory_saver=False)
    params = CacheInitParams(disable=False, req_to_token_pool=requests, token_to_kv_pool_allocator=allocator, page_size=1)
    return AMRadixCache(params, DocumentRegistry(None), windows), pool, allocator


@pytest.fixture(params=[(None, None)])
def tree(request):
    """``radix_cache``; ``request.param`` gives its layers' windows (indirect parametrize)."""
    return radix_cache(request.param)


def prefix(slots=12, heads=2, dim=8, value_dim=8, layers=2, length=50) -> CompactedPrefix:
    keys = [torch.randn(heads, slots, dim) for _ in range(layers)]
    beta = [torch.randn(heads, slots) for _ in range(layers)]
    beta[0][1, -1] = -math.inf  # a padding slot of a narrower head
    return CompactedPrefix(keys, [torch.randn(heads, slots, value_dim) for _ in range(layers)], beta, length,
                           list(range(length)), {"model": "test"}, "AM-HighestAttnKeys")


def test_install_writes_the_slots_pins_the_node_and_remove_frees_everything(tree):
    cache, pool, allocator = tree
    made = prefix()
    installed = cache.install_document(made, 1)
    assert allocator.available_size() == 256 - 12 and cache.protected_size() == 12
    assert torch.equal(pool.k_buffer[1][installed.slots], made.keys[1].permute(1, 0, 2))
    assert installed.head_slots == [[12, 11], [12, 12]] and installed.bias[0].dtype == torch.float32
    assert cache.remove_document(installed) == 12
    assert allocator.available_size() == 256 and cache.protected_size() == 0 and cache.evictable_size() == 0


@pytest.mark.parametrize("tree", [(6, None)], indirect=True)
@pytest.mark.parametrize("global_slots", [4, 12])
def test_a_verbatim_window_sits_right_aligned_and_needs_no_bias(tree, global_slots):
    """Layer 0 has a 6-token window: it holds the document's last 6 tokens at the node's last slots, so
    physical distances past the node are logical ones; the global layer's slots come first."""
    cache, pool, allocator = tree
    made = prefix(slots=global_slots)
    window_keys, window_values = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    made = dataclasses.replace(made, keys=[window_keys, made.keys[1]], values=[window_values, made.values[1]],
                               beta=[torch.zeros(2, 6), made.beta[1]])
    installed = cache.install_document(made, 1)
    width = max(6, global_slots)
    assert installed.num_slots == width and allocator.available_size() == 256 - width
    node_keys = pool.k_buffer[0][installed.slots].permute(1, 0, 2)
    assert torch.equal(node_keys[:, width - 6 :], window_keys) and not node_keys[:, : width - 6].any()
    assert torch.equal(pool.k_buffer[1][installed.slots[:global_slots]].permute(1, 0, 2), made.keys[1])
    # The window's columns have beta 0; columns left of it (a window away from any later token) -inf.
    assert torch.equal(installed.bias[0][:, width - 6 :], torch.zeros(2, 6))
    assert installed.bias[0][:, : width - 6].eq(-math.inf).all() and not installed.layout.compacted_windows
    assert installed.bias[1][:, global_slots:].eq(-math.inf).all()
    assert [installed.slots[installed.layout.columns(layer)].numel() for layer in (0, 1)] == [6, global_slots]
    assert installed.kv_bytes(50) == {"global": width * 128, "sliding": width * 128, "total": 2 * width * 128,
                                      "uncompacted": 2 * 50 * 128}
    cache.remove_document(installed)


@pytest.mark.parametrize("tree", [(6, None)], indirect=True)
def test_a_compacted_window_sits_right_aligned_with_its_bias(tree):
    cache, pool, _ = tree
    made = prefix(slots=4)  # layer 0 (window 6) holds 4 compacted slots, one of them padding
    installed = cache.install_document(made, 1)
    assert installed.num_slots == 4 and installed.layout.compacted_windows
    assert torch.equal(pool.k_buffer[0][installed.slots].permute(1, 0, 2), made.keys[0])
    assert torch.equal(installed.bias[0], made.beta[0])
    cache.remove_document(installed)


@pytest.mark.parametrize("tree", [(6, None)], indirect=True)
def test_a_window_layer_holds_its_window_verbatim_or_fewer_slots(tree):
    cache, _, allocator = tree
    for made in (prefix(slots=8), dataclasses.replace(prefix(slots=6), beta=[torch.ones(2, 6), torch.zeros(2, 6)])):
        with pytest.raises(DocumentError, match="sliding-window layer: the document must hold its last 6 tokens"):
            cache.install_document(made, 1)
    assert allocator.available_size() == 256


@pytest.mark.parametrize("made, reason", [
    (prefix(value_dim=4), "does not fit this model's KV pool"),  # the load finding: only keys were checked
    (prefix(heads=3), "does not fit this model's KV pool"),
    (prefix(layers=3), "the document has 3 layers, this model 2"),
])
def test_a_prefix_that_does_not_fit_is_refused_before_anything_is_allocated(tree, made, reason):
    cache, _, allocator = tree
    with pytest.raises(DocumentError) as error:
        cache.install_document(made, 1)
    assert error.value.status == 400 and reason in error.value.message
    assert allocator.available_size() == 256


def test_values_a_float16_pool_cannot_hold_are_refused_naming_the_layer_and_nothing_is_allocated():
    """Casting a fitted value above 65504 into a float16 pool gives Inf, which would poison every request's
    attention on the document; within range, the same prefix installs."""
    cache, _, allocator = radix_cache((None, None), torch.float16)
    made = prefix()
    made.values[1][0, 3, 2] = -7.0e4
    with pytest.raises(DocumentError) as error:
        cache.install_document(made, 1)
    assert error.value.status == 422 and allocator.available_size() == 256
    assert "layer 1: the document's values reach 7e+04" in error.value.message and "torch.float16" in error.value.message
    made.values[1][0, 3, 2] = -6.0e4
    installed = cache.install_document(made, 1)
    assert allocator.available_size() == 256 - 12
    cache.remove_document(installed)


def test_a_full_pool_gives_503_and_a_failing_step_frees_its_slots(tree, monkeypatch):
    cache, _, allocator = tree
    with pytest.raises(DocumentError) as error:
        cache.install_document(prefix(slots=300, length=400), 1)
    assert error.value.status == 503 and allocator.available_size() == 256

    def broken_insert(params):
        raise RuntimeError("insert failed")

    monkeypatch.setattr(cache, "insert", broken_insert)
    with pytest.raises(RuntimeError, match="insert failed"):
        cache.install_document(prefix(), 1)
    assert allocator.available_size() == 256 and cache.protected_size() == 0


def test_a_captured_document_is_held_in_the_tree_only_when_all_of_it_is_cached(tree):
    from sglang.srt.mem_cache.base_prefix_cache import InsertParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    cache, _, allocator = tree
    tokens = array("q", range(100, 140))
    slots = allocator.alloc(30)
    cache.insert(InsertParams(key=RadixKey(tokens[:30], cache_salt="s"), value=slots.to(torch.int64)))
    assert cache.hold_prefix(tokens, "s") is None  # 30 of 40 tokens cached
    assert cache.hold_prefix(tokens[:30], "other salt") is None
    hold = cache.hold_prefix(tokens[:30], "s")
    assert torch.equal(hold.slots, slots.to(torch.int64)) and cache.protected_size() == 30
    cache.unlock(hold.lock)
    assert cache.protected_size() == 0 and cache.evictable_size() == 30


def test_a_solved_registrations_captures_leave_the_tree_and_nothing_else_does(tree):
    from sglang.srt.mem_cache.base_prefix_cache import InsertParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    cache, _, allocator = tree
    for tokens, salt in ((range(100, 120), "reg-a"), (range(100, 110), "reg-a-context"), (range(100, 115), "reg-b"),
                         (range(100, 125), None)):
        key = RadixKey(array("q", tokens), cache_salt=salt)
        cache.insert(InsertParams(key=key, value=allocator.alloc(len(key.token_ids)).to(torch.int64)))
    held = cache.hold_prefix(array("q", range(100, 115)), "reg-b")
    assert cache.remove_namespace("reg-a") == 30  # both of registration a's salts
    assert cache.remove_namespace("reg-b") == 0  # still held
    cache.unlock(held.lock)
    assert cache.remove_namespace("reg-b") == 15
    assert cache.evictable_size() == 25 and allocator.available_size() == 256 - 25  # a client's prefix stays


@pytest.mark.parametrize("state", [DocState.OBSERVING, DocState.SOLVING, DocState.CERTIFYING])
def test_only_requests_extending_no_document_count_as_reuse(state):
    """Requests reusing a document that learns or registers are that document's: counted as reuse, they would
    propose a second, slightly shorter prefix of the same text beside it (seen with ``learn``). Each request goes
    through the request hook, as SGLang creates it, then the radix match."""
    from types import SimpleNamespace

    from sglang.srt.mem_cache.radix_cache import RadixKey
    from sglang.srt.sampling.sampling_params import SamplingParams

    from sglang_am.server.scheduler.adapt import LiveQueries, Observation
    from sglang_am.server.sglang_hooks.hooks import after_create_req

    cache, _, _ = radix_cache((None, None))
    cache.registry = DocumentRegistry(AutoPolicy(min_tokens=16, min_requests=3, keep_first=0, keep_last=2))
    learning = array("q", range(100, 140))
    cache.registry.add(Document(document_id(learning), 1, learning, "AM-HighestAttnKeys", {}, False, state,
                                observation=Observation(LiveQueries([0], 4), requests_needed=2, answer_steps=1)))
    scheduler = SimpleNamespace(tree_cache=cache)
    plain = SimpleNamespace(input_embeds=None, mm_inputs=None, logprob_start_len=None)

    def reuse(prefix, rid):
        ids = array("q", [*prefix, 7, rid])
        req = after_create_req(Req(f"r{rid}", "", ids, SamplingParams()), scheduler, plain)
        cache.match_prefix(MatchPrefixParams(key=RadixKey(ids), req=req))

    for rid in range(4):
        reuse(learning, rid)
    assert cache.registry.tracker.take_candidates() == []
    other = range(200, 240)
    for rid in range(3):
        reuse(other, rid)
    assert cache.registry.tracker.take_candidates() == [list(other)[:-1]]  # minus keep_last of the shared 41
