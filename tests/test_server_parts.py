"""The server's document logic without a server, as SGLang tests its radix cache: the registration request's
bounds, admission, installing into a real radix tree and KV pool (and freeing on every failure), the
solver thread's deadline and cancellation, bounded query capture, references held by requests, the
automatic budget's eviction order, and the backends' per-forward document metadata."""

import asyncio
import dataclasses
import math
import os
import threading
import time
from array import array
from http import HTTPStatus
from types import SimpleNamespace

import pytest
import torch
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from sglang_am.core import available_methods, compact, get_method
from sglang_am.core.cancel import CompactionCancelled
from sglang_am.core.synthetic import clustered_block
from sglang_am.prefix import CompactedPrefix
from sglang_am.server.admission import ServerRoom, admit
from sglang_am.server.attention import DocumentRows
from sglang_am.server.auto import eviction_order
from sglang_am.server.cache import AMRadixCache
from sglang_am.server.capture import CaptureTag, QueryCapture
from sglang_am.server.chat import common_prefix
from sglang_am.server.config import ServerConfig
from sglang_am.server.errors import DocumentError
from sglang_am.server.jobs import QueueFull, Worker
from sglang_am.server.operations import check_compacted_windows, check_model
from sglang_am.server.registration import OPTION_BOUNDS, SERVER_SET_OPTIONS, RegistrationRequest
from sglang_am.server.registry import BOUNDARY_TOKENS, DocState, Document, DocumentRegistry, Served, document_id
from sglang_am.server.service import DocumentService

CONFIG = ServerConfig(store_dir="/nonexistent", max_document_tokens=4096, max_queries_per_head=8000)
IDS = list(range(100, 300))  # a 200-token document


def request(**fields) -> RegistrationRequest:
    return RegistrationRequest.from_client(CONFIG, **{"input_ids": IDS, "ratio": 0.1, **fields})


# ----- the registration request -----

@pytest.mark.parametrize("fields, reason", [
    ({"input_ids": IDS[:5]}, "input_ids must be a list of 16 to 4096"),
    ({"input_ids": list(range(5000))}, "input_ids must be a list of 16 to 4096"),
    ({"input_ids": IDS[:-1] + [-1]}, "token ids in [0,"),
    ({"input_ids": IDS[:-1] + [1 << 40]}, "token ids in [0,"),
    ({"input_ids": IDS[:-1] + [True]}, "token ids"),
    ({"input_ids": "abc" * 10}, "input_ids must be a list"),
    ({"input_ids": None, "text": ""}, "text must be a non-empty string"),
    ({"input_ids": None, "text": "x" * (4096 * 64 + 1)}, "text must be a non-empty string of at most"),
    ({"text": "hello"}, "exactly one of text, input_ids or messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, "exactly one of text, input_ids or messages"),
    ({"input_ids": None, "messages": []}, "messages must be a list of 1 to 64"),
    ({"input_ids": None, "messages": {"role": "system"}}, "messages must be a list of 1 to 64"),
    ({"input_ids": None, "messages": [{"role": "narrator", "content": "x"}]}, "messages[0].role must be one of"),
    ({"input_ids": None, "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]},
     "messages[0].content must be a non-empty string"),
    ({"input_ids": None, "messages": [{"role": "user", "content": "x", "name": "n"}]}, 'exactly "role" and "content"'),
    ({"input_ids": None, "messages": [{"role": "system", "content": "x" * (4096 * 64 + 1)}]}, "messages hold"),
    ({"ratio": None}, "exactly one of ratio"),
    ({"budget": 10}, "exactly one of ratio"),
    ({"ratio": 0.0}, "ratio must be in (0, 1]"),
    ({"ratio": 1.5}, "ratio must be in (0, 1]"),
    ({"ratio": float("nan")}, "ratio must be in (0, 1]"),
    ({"ratio": True}, "ratio must be in (0, 1]"),
    ({"ratio": None, "budget": 0}, "budget must be an int in [1, 4096]"),
    ({"ratio": None, "budget": 2.5}, "budget must be an int"),
    ({"method": "nope"}, "unknown method 'nope'"),
    ({"method": 7}, "method must be a string"),
    ({"query_source": "random"}, "query_source for the server must use"),
    ({"query_source": "x" * 100}, "query_source must be a source name"),
    ({"query_source": {"repeat-prefill": 0.5}}, "sum to 1"),
    ({"query_source": ["repeat-prefill"]}, "query_source must be a source name"),
    ({"max_queries_per_head": 0}, "max_queries_per_head must be an int in [1, 8000]"),
    ({"max_queries_per_head": 8001}, "max_queries_per_head must be an int in [1, 8000]"),
    ({"self_study_max_new_tokens": 10**6}, "self_study_max_new_tokens must be an int in [1, 512]"),
    ({"keep_first": -1}, "keep_first must be an int in [0, 4096]"),
    ({"head_budgets": [1, 2]}, "head_budgets must be the head-budget JSON object"),
    ({"head_budgets": {"L0H0": 2.0}}, "sum"),
    ({"head_budgets": {"bad": 1.0}}, "not of the form"),
    ({"options": [1]}, "options must be an object"),
    ({"options": {"scale": 2.0}}, "options.scale is set by the server"),
    ({"options": {"layer": 1}}, "options.layer is set by the server"),
    ({"options": {"nnls_iters": 100_000_000}}, "options.nnls_iters must be a int in [0, 1000]"),
    ({"options": {"nnls_iters": 1.5}}, "options.nnls_iters must be a int"),
    ({"options": {"beta_min": float("-inf")}}, "options.beta_min must be a float"),
    ({"options": {"beta_max": 1e9}}, "options.beta_max must be a float in [-50, 50]"),
    ({"options": {"query_chunk": 1 << 30}}, "options.query_chunk must be null or a int in [1, 65536]"),
    ({"options": {"seed": -1}}, "options.seed must be a int"),
    ({"options": {"fit_beta": "yes"}}, "options.fit_beta must be a bool"),
    ({"options": {"score": "x" * 100}}, "options.score must be a str"),
    ({"options": {"score": "median"}}, "score must be one of"),
    ({"options": {"colour": "red"}}, "unknown option 'colour'"),
    ({"options": {"keys_per_step": 4}}, "unknown option(s) ['keys_per_step']"),
    ({"method": "AM-OMP", "options": {"keys_per_step": 5000}}, "options.keys_per_step must be a int in [1, 1024]"),
    ({"method": "AM-OMP", "options": {"schedule": [[None, 4, 2]] * 17}}, "options.schedule must be null or a schedule"),
    ({"method": "AM-OMP", "options": {"schedule": [[None, 0, 2]]}}, "options.schedule must be null or a schedule"),
    ({"method": "AM-OMP", "options": {"drop_rounds": 11}}, "options.drop_rounds must be a int in [0, 10]"),
    ({"options": {"beta_min": 3.0, "beta_max": 1.0}}, "must be below beta_max"),
    ({"options": {"stats_backend": "quantum"}}, "stats_backend must be one of"),
    ({"compact_windows": 1}, "compact_windows must be true or false"),
    ({"compact_windows": "yes"}, "compact_windows must be true or false"),
    ({"questions": "What is K1?"}, "questions must be a list of 1 to 64 prompts"),
    ({"questions": []}, "questions must be a list of 1 to 64 prompts"),
    ({"questions": ["q"] * 65}, "questions must be a list of 1 to 64 prompts"),
    ({"questions": [""]}, "questions[0] must be a non-empty string"),
    ({"questions": ["x" * (256 * 64 + 1)]}, "questions[0] must be a non-empty string of at most"),
    ({"questions": [[1, 2], list(range(257))]}, "questions[1] must be a string or a list of 1 to 256 token ids"),
    ({"questions": [[-1]]}, "questions[0] must be a string or a list"),
    ({"questions": [[True]]}, "questions[0] must be a string or a list"),
    ({"questions": [None]}, "questions[0] must be a string or a list"),
    ({"query_source": {"questions": 1.0}}, "query_source uses questions: give them in questions"),
    ({"ratio": "half"}, 'ratio must be in (0, 1] or "auto"'),
    ({"fidelity_bound": 0.2}, 'fidelity_bound goes with "ratio": "auto"'),
    ({"ratio": "auto", "fidelity_bound": 0}, "fidelity_bound must be a relative attention error in (0, 10]"),
    ({"ratio": "auto", "fidelity_bound": True}, "fidelity_bound must be a relative attention error"),
    ({"adapt": "yes"}, "adapt must be true or false"),
])
def test_bad_registration_fields_are_refused_with_the_field_named(fields, reason):
    with pytest.raises(ValueError) as error:
        request(**fields)
    assert reason in str(error.value), str(error.value)


def test_unknown_fields_are_refused():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['colour'\]"):
        request(colour="red")


def test_every_option_of_every_method_has_a_bound_or_is_set_by_the_server():
    for method in available_methods():
        for field in dataclasses.fields(get_method(method).options_class):
            assert field.name in OPTION_BOUNDS or field.name in SERVER_SET_OPTIONS, (method, field.name)


def test_a_valid_request_round_trips_through_the_scheduler_payload():
    made = request(method="AM-OMP-fast", query_source="ss-plus-repeat", options={"schedule": [[8, 2, 1], [None, 4, 2]]},
                   head_budgets={"L0H0": 0.5, "L0H1": 0.5}, keep_first=4)
    assert RegistrationRequest.from_payload(made.to_payload()) == made
    assert made.query_source == {"self-study": 0.5, "repeat-prefill": 0.5} and made.head_proportions == {(0, 0): 0.5, (0, 1): 0.5}
    assert request(method="PyramidKV").options == {}  # its layer options come from the server


def test_questions_mix_with_the_query_agnostic_source_and_travel_as_token_ids():
    made = request(questions=[[5, 6, 7], "What is K1?"], query_source="ss-plus-repeat", adapt=True)
    assert made.query_source == {"questions": 1.0}  # given questions, they are the reference queries (QUESTION_SHARE)
    with pytest.raises(ValueError, match="must be tokenized"):
        made.to_payload()  # text reaches the scheduler only as ids
    tokenized = made.with_question_ids(CONFIG, lambda text: [ord(c) for c in text])
    assert tokenized.questions == ((5, 6, 7), tuple(ord(c) for c in "What is K1?"))
    assert RegistrationRequest.from_payload(tokenized.to_payload()) == tokenized
    explicit = request(questions=[[1]], query_source={"questions": 0.5, "repeat-prefill": 0.5})
    assert explicit.query_source == {"questions": 0.5, "repeat-prefill": 0.5}  # a client's own mixture is kept
    with pytest.raises(ValueError, match=r"questions\[0\] has 300 tokens; this server takes 1 to 256"):
        request(questions=["long"]).with_question_ids(CONFIG, lambda text: [1] * 300)


def test_auto_ratio_walks_the_ladder_with_a_bound_and_admission_reserves_its_top():
    from sglang_am.server.admission import capture_slots, compacted_slots
    from sglang_am.server.registration import DEFAULT_FIDELITY_BOUND, RATIO_LADDER

    auto = request(ratio="auto")
    assert auto.budget == "auto" and auto.ladder == RATIO_LADDER and auto.fidelity_bound == DEFAULT_FIDELITY_BOUND
    assert request(ratio="auto", fidelity_bound=0.3).fidelity_bound == 0.3 and request().ladder is None
    assert compacted_slots(auto, 200) == round(RATIO_LADDER[-1] * 200) and compacted_slots(request(), 200) == 20
    assert RegistrationRequest.from_payload(auto.to_payload()) == auto
    asked = request(questions=[[1] * 10, [2] * 30])
    # The document once (questions alone need no repeat copy), then each question beside the others.
    assert capture_slots(asked, 200, 4) == 200 + 64 + (10 + 64) + (30 + 64)


# ----- admission -----

ROOM = ServerRoom(pool_slots=8192, pinned_slots=0, max_prompt_tokens=4096, registrations_in_progress=0,
                  capture_bytes_in_use=0)


def test_admission_refuses_what_never_fits_with_400_and_what_does_not_fit_now_with_503():
    assert admit(request(), len(IDS), ROOM, CONFIG, 1000, 4) == 20
    cases = [
        (request(), 10, ROOM, 400, "document has 10 tokens"),
        (request(), 4096, ROOM, 400, "this server takes 16 to 4095"),
        (request(keep_first=199), len(IDS), ROOM, 400, "keep_first must be in [0, T - 2]"),
        (request(ratio=None, budget=len(IDS) + 1), len(IDS), ROOM, 400, "budget must be in [1, T - keep_first]"),
        (request(), len(IDS), dataclasses.replace(ROOM, registrations_in_progress=4), 503, "registrations are in progress"),
        (request(), len(IDS), dataclasses.replace(ROOM, pinned_slots=8000), 503, "the KV pool has 192 slots"),
        (request(), len(IDS), dataclasses.replace(ROOM, bias_slots_free=5), 503, "bias table has room for 5"),
        (request(), len(IDS), dataclasses.replace(ROOM, auto_budget_slots=10), 503, "automatic-compaction budget"),
        (request(), len(IDS), dataclasses.replace(ROOM, capture_bytes_in_use=CONFIG.capture_memory_bytes - 10), 503,
         "captured queries would need"),
    ]
    for made, length, room, status, reason in cases:
        with pytest.raises(DocumentError) as error:
            admit(made, length, room, CONFIG, 1000, 4)
        assert error.value.status == status and reason in error.value.message, (reason, error.value.message)


def test_capture_memory_is_fixed_up_front_by_the_query_cap():
    # 2 query heads per KV head: 5000 pooled queries need 2500 positions per layer, whatever the document length.
    capture = QueryCapture({"repeat-prefill": 1.0}, 5000, {"repeat-prefill": 1}, {"repeat-prefill": 10**6}, group=2,
                           layers=range(3), bytes_per_row=64)
    assert capture.nbytes == 2500 * 3 * 64
    mixed = QueryCapture({"self-study": 0.5, "repeat-prefill": 0.5}, 5000, {"self-study": 4, "repeat-prefill": 1},
                         {"self-study": 100, "repeat-prefill": 2000}, group=2, layers=range(1), bytes_per_row=8)
    assert mixed.keep == {"self-study": 100, "repeat-prefill": 1250}  # a self-study answer has at most 100 positions
    assert mixed.nbytes == (4 * 100 + 1250) * 8
    # Only the layers the solve compacts are kept (Gemma-3: its three global layers of 18).
    globals_only = QueryCapture({"repeat-prefill": 1.0}, 40, {"repeat-prefill": 1}, {"repeat-prefill": 100}, group=1,
                                layers=[5, 11, 17], bytes_per_row=4)
    assert globals_only.nbytes == 40 * 3 * 4
    rows = globals_only.add_request("repeat-prefill", 0, 40)
    for layer in (0, 5, 11, 12, 17):
        globals_only.record(rows, layer, torch.ones(40, 1, 2), torch.arange(40), scale=0.5)
    assert set(rows.rows) == {5, 11, 17} and rows.filled.all() and globals_only.scales == {5: 0.5, 11: 0.5, 17: 0.5}


# ----- query capture -----

def test_capture_keeps_a_bounded_subset_across_chunks_and_hands_back_every_layer():
    capture = QueryCapture({"context-prefill": 1.0}, 40, {"context-prefill": 1}, {"context-prefill": 100}, group=2,
                           layers=range(2), bytes_per_row=4)
    rows = capture.add_request("context-prefill", 0, 100)  # keeps 20 of 100 positions
    assert len(rows.positions) == 20 and "did not finish" in capture.problem()
    queries = torch.arange(100 * 4 * 3, dtype=torch.float32).reshape(100, 4, 3)  # [positions, H_q, D]
    for prefix, length in ((0, 37), (37, 63)):  # chunked prefill: two forwards
        planned = rows.plan(prefix, length, offset=5)  # this request's rows start at row 5 of the forward
        forward = torch.cat([torch.zeros(5, 4, 3), queries[prefix : prefix + length]])
        for layer in range(2):
            capture.record(rows, layer, forward[planned[0]], planned[1], scale=0.5)
    rows.finished = True
    assert capture.problem() is None and capture.scales == {0: 0.5, 1: 0.5}
    kept = capture.queries(1)["context-prefill"]  # [H_q, n, D]
    assert torch.equal(kept, queries[rows.positions].transpose(0, 1))
    with pytest.raises(ValueError, match="unexpected capture request"):
        capture.add_request("context-prefill", 0, 100)  # one part only


def test_a_question_keeps_every_position_and_its_answer_position_is_marked():
    mixed = QueryCapture({"questions": 0.75, "repeat-prefill": 0.25}, 40, {"questions": 2, "repeat-prefill": 1},
                         {"questions": 6, "repeat-prefill": 100}, group=2, layers=range(1), bytes_per_row=4)
    assert mixed.keep == {"questions": 6, "repeat-prefill": 5}  # a question keeps all of its (at most 6) positions
    capture = QueryCapture({"questions": 1.0}, 40, {"questions": 2}, {"questions": 6}, group=2, layers=range(1),
                           bytes_per_row=4)
    first, second = capture.add_request("questions", 100, 106), capture.add_request("questions", 100, 104)
    assert first.positions.tolist() == list(range(100, 106)) and second.positions.tolist() == list(range(100, 104))
    for rows, length in ((first, 6), (second, 4)):
        planned = rows.plan(100, length, offset=0)
        capture.record(rows, 0, torch.ones(length, 2, 3), planned[1], scale=1.0)
    marks = capture.last_positions()["questions"]
    assert capture.queries(0)["questions"].shape == (2, 10, 3)
    assert marks.tolist() == [False] * 5 + [True] + [False] * 3 + [True]


def test_positions_a_cached_prefix_skipped_are_left_out():
    capture = QueryCapture({"self-study": 1.0}, 100, {"self-study": 1}, {"self-study": 10}, group=1, layers=range(1),
                           bytes_per_row=4)
    rows = capture.add_request("self-study", 50, 60)
    rows.finished = True
    assert capture.problem() == "no self-study query was captured"
    queries = torch.arange(10, dtype=torch.float32).reshape(10, 1, 1)
    planned = rows.plan(53, 7, offset=0)  # positions 50..52 came from the cache
    capture.record(rows, 0, queries[3:][planned[0]], planned[1], scale=1.0)
    assert capture.problem() is None and capture.queries(0)["self-study"].flatten().tolist() == list(range(3, 10))


def test_a_failure_while_recording_marks_the_capture_failed_without_raising(monkeypatch, tmp_path):
    capture = QueryCapture({"context-prefill": 1.0}, 8, {"context-prefill": 1}, {"context-prefill": 8}, group=1,
                           layers=range(1), bytes_per_row=4)
    rows = capture.add_request("context-prefill", 0, 8)
    (tmp_path / "faults").write_text("capture")
    monkeypatch.setenv("SGLANG_AM_TEST_FAULTS", str(tmp_path / "faults"))
    capture.record(rows, 0, torch.zeros(8, 1, 1), torch.arange(8), 1.0)  # must not raise inside the forward pass
    assert "injected capture failure" in capture.problem()
    capture.release()
    assert capture.problem() is not None and capture.requests == {"context-prefill": []}


# ----- the radix tree and the KV pool -----

@pytest.fixture(params=[(None, None)])
def tree(request):
    """A radix cache over a 2-layer pool; ``request.param`` gives its layers' windows (indirect parametrize)."""
    pool = MHATokenToKVPool(size=256, page_size=1, dtype=torch.float32, head_num=2, head_dim=8, layer_num=2,
                            device="cpu", enable_memory_saver=False)
    allocator = TokenToKVPoolAllocator(size=256, dtype=torch.float32, device="cpu", kvcache=pool, need_sort=False)
    requests = ReqToTokenPool(size=4, max_context_len=512, device="cpu", enable_memory_saver=False)
    params = CacheInitParams(disable=False, req_to_token_pool=requests, token_to_kv_pool_allocator=allocator, page_size=1)
    return AMRadixCache(params, DocumentRegistry(None), request.param), pool, allocator


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


# ----- the registry: references and states -----

def document(index=1, auto=False, slots=0, last_used=0.0) -> Document:
    doc = Document(document_id(IDS[index:]), index, array("q", IDS[index:]), "AM-HighestAttnKeys", {}, auto, DocState.READY)
    doc.last_used = last_used
    doc.installed = SimpleNamespace(num_slots=slots, head_slots=[], bias=[], users=0) if slots else None
    return doc


def test_a_request_holds_its_document_until_it_ends_once():
    registry, doc = DocumentRegistry(None), document(slots=4)
    registry.add(doc)
    first, second = SimpleNamespace(), SimpleNamespace()
    registry.acquire(doc, first)
    version = doc.installed
    doc.installed = SimpleNamespace(num_slots=4, head_slots=[], bias=[], users=0)  # a refit installed meanwhile
    registry.acquire(doc, second, counted=False)  # a registration's probe
    assert doc.users == 2 and doc.requests_served == 1 and version.users == doc.installed.users == 1
    assert first.am_served.version is version and second.am_served.version is doc.installed
    assert first.am_served.client and not second.am_served.client
    registry.release(first)
    registry.release(first)  # the stream and an abort report may both see the end: counted once
    registry.release(SimpleNamespace())  # never rewritten
    assert doc.users == 1 and version.users == 0
    registry.release(second)
    assert doc.users == 0 and doc.installed.users == 0


def test_lookup_takes_the_longest_ready_or_registering_prefix_and_ids_are_full_sha256():
    registry = DocumentRegistry(None)
    short, long = document(index=1), document(index=1)
    long.tokens = array("q", IDS[1:150])
    short.tokens = array("q", IDS[1:50])
    short.doc_id, long.doc_id = document_id(short.tokens), document_id(long.tokens)
    loading = Document("f" * 64, 9, array("q"), "", {}, False, DocState.LOADING)  # no tokens yet
    for doc in (short, long, loading):
        registry.add(doc)
    assert registry.longest_prefix(IDS[1:]) is long and registry.longest_prefix(IDS[1:100]) is short
    assert registry.longest_prefix([1, 2, 3]) is None
    assert len(short.doc_id) == 64 and int(short.doc_id, 16) >= 0


def test_a_prompt_that_leaves_a_document_within_its_last_tokens_is_a_boundary_miss():
    registry, doc = DocumentRegistry(None), document(index=1)
    registry.add(doc)
    merged = list(IDS[1:-3]) + [7, 8, 9, 10]  # the last 3 tokens tokenized differently, then the question
    assert registry.longest_prefix(merged) is None and registry.boundary_miss(merged) is doc
    assert registry.boundary_miss(list(IDS[1:-BOUNDARY_TOKENS - 1]) + [7] * 20) is None  # parted earlier
    assert registry.boundary_miss(list(IDS[1:-BOUNDARY_TOKENS])) is None  # ends where the boundary begins
    doc.state = DocState.CAPTURING
    assert registry.boundary_miss(merged) is None  # only ready documents


def test_the_chat_document_is_what_every_probe_render_shares():
    assert common_prefix([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == [1, 2]
    assert common_prefix([[1, 2, 3], [1, 2, 3, 4]]) == [1, 2, 3]
    assert common_prefix([[5, 1], [6, 1]]) == []


class ScriptedRank:
    """One scheduler rank answering each operation from a script (the service's side of the channel)."""

    num_ranks = 1

    def __init__(self, script: dict):
        self.script, self.calls = script, []

    async def call(self, op: str, ranks=None, **payload):
        self.calls.append(op)
        return [self.script.get(op, {})]


def test_a_load_whose_document_is_dropped_once_ready_answers_409_not_a_crash():
    doc_id = "a" * 64
    rank = ScriptedRank({"load": {"doc_id": doc_id, "state": "loading", "existing": False},
                         "advance": {"doc_id": doc_id, "state": "ready"},
                         "get": DocumentError(HTTPStatus.NOT_FOUND, "no document")})  # a drop came in between
    service = DocumentService(None, rank, CONFIG)
    with pytest.raises(DocumentError) as refused:
        asyncio.run(service.load(doc_id))
    assert refused.value.status == HTTPStatus.CONFLICT and "dropped while it was being loaded" in refused.value.message
    assert rank.calls == ["load", "advance", "get"]  # the drop took it all: nothing left to abandon


def test_eviction_takes_the_least_recently_used_idle_automatic_documents():
    old, busy, recent, explicit = (document(i, auto=True, slots=10, last_used=t)
                                   for i, t in ((1, 1.0), (2, 2.0), (3, 3.0), (4, 0.0)))
    explicit.auto = False
    busy.users = 1
    assert eviction_order([old, busy, recent, explicit], budget=30, width=10) == [old]
    assert eviction_order([old, busy, recent, explicit], budget=30, width=20) == [old, recent]
    assert eviction_order([old, busy, recent, explicit], budget=30, width=25) is None  # busy stays
    assert eviction_order([old], budget=30, width=5) == []


# ----- the solver thread -----

def slow_solve():
    block = clustered_block(heads=2, length=512, head_dim=16, num_queries=512, seed=0)
    return compact(block.keys, block.values, block.queries, 8, "AM-HighestAttnKeys", nnls_iters=10**9)


def test_a_solve_past_its_deadline_stops_and_the_worker_takes_the_next_job():
    worker = Worker("solver", max_queued=2)
    started = time.monotonic()
    job = worker.submit(slow_solve, "the solve", timeout=0.5)
    assert job.wait(30) and time.monotonic() - started < 10
    with pytest.raises(CompactionCancelled, match="the solve exceeded the server's 0.5 s limit"):
        job.result()
    assert worker.submit(lambda: 7, "a quick job").wait(10)


def test_a_niced_worker_runs_its_jobs_below_the_schedulers_priority():
    base = os.getpriority(os.PRIO_PROCESS, 0)
    job = Worker("solver", max_queued=1, nice=10).submit(
        lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id()), "its priority")
    assert job.wait(10) and job.result() == min(base + 10, 19)
    assert os.getpriority(os.PRIO_PROCESS, 0) == base  # the calling thread keeps its own


def test_cancel_stops_a_running_solve_and_a_dying_job_does_not_kill_the_worker():
    worker = Worker("solver", max_queued=1)
    job = worker.submit(slow_solve, "the solve")
    time.sleep(0.3)
    job.cancel("dropped")
    assert job.wait(10)
    with pytest.raises(CompactionCancelled, match="dropped"):
        job.result()

    def exits():
        raise SystemExit("the thread is told to die")

    exited = worker.submit(exits, "exit")
    assert exited.wait(10)
    with pytest.raises(RuntimeError, match="exit was stopped: SystemExit"):
        exited.result()  # the job failed alone: the thread goes on
    assert worker.submit(lambda: threading.current_thread().name, "next").result() == "sglang-am-solver"


def test_a_full_queue_refuses_at_once():
    worker = Worker("solver", max_queued=1)
    gate = threading.Event()
    worker.submit(gate.wait, "blocker")
    time.sleep(0.2)  # the blocker runs; the queue is empty again
    worker.submit(lambda: None, "queued")
    with pytest.raises(QueueFull):
        worker.submit(lambda: None, "one too many")
    gate.set()


# ----- the backends' per-forward metadata -----

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
    rows.bind([request(1, am_served=Served(doc, doc.installed)), request(2), request(3, am_capture=tag)])
    decode = rows.batch(forward(ForwardMode.DECODE, [2, 1]))
    assert decode.versions == [None, doc.installed] and decode.query_lens == [1, 1] and decode.has_documents
    extend = rows.batch(forward(ForwardMode.EXTEND, [1, 3], prefix_lens=[4, 10], seq_lens=[2, 20]))
    (part,) = extend.captures  # positions 10..29 of the capture request, its rows starting at row 2
    assert part.sink.args == (tag.rows,) and part.query_rows.tolist() == list(range(2, 22))
    assert part.slots.tolist() == list(range(10, 30))
    rows.bind([request(1)])  # the row now serves a request without a document
    assert rows.batch(forward(ForwardMode.DECODE, [1])) is None


def test_cancelling_a_queued_job_ends_it_at_once():
    worker = Worker("solver", max_queued=2)
    gate = threading.Event()
    worker.submit(gate.wait, "blocker")
    queued = worker.submit(lambda: pytest.fail("a cancelled job never runs"), "queued")
    queued.cancel("dropped")
    assert queued.wait(0.1) and queued.done()
    gate.set()


def test_the_radix_cache_refuses_overlap_scheduling_with_the_reason():
    from sglang_am.server.plugin import _radix_cache

    context = SimpleNamespace(server_args=SimpleNamespace(disable_overlap_schedule=False))
    with pytest.raises(ValueError, match="--radix-cache-backend am needs --disable-overlap-schedule"):
        _radix_cache(context)


@pytest.mark.parametrize(("hybrid_pool", "chunk", "compacted_windows_served"), [(True, None, True), (False, 8192, True),
                                                                                (False, None, False)])
def test_models_the_layout_cannot_serve_are_refused_with_the_reason(hybrid_pool, chunk, compacted_windows_served):
    """Models on SGLang's hybrid sliding-window pool (gpt-oss, Gemma-4, Llama-4) or with chunked attention,
    whose weights cannot be had here: the runner's flags that SGLang sets for them, on a stand-in runner.
    A backend without compacted-window support refuses those documents only."""
    backend = SimpleNamespace(adds_document_bias=True, serves_compacted_windows=compacted_windows_served)
    runner = SimpleNamespace(attn_backend=backend, spec_algorithm=SimpleNamespace(is_none=lambda: True),
                             is_hybrid_swa=hybrid_pool, model_config=SimpleNamespace(attention_chunk_size=chunk),
                             token_to_kv_pool=SimpleNamespace(k_buffer=[], store_dtype=torch.float32, dtype=torch.float32))
    scheduler = SimpleNamespace(tp_worker=SimpleNamespace(model_runner=runner))
    if compacted_windows_served:
        with pytest.raises(DocumentError, match="hybrid sliding-window pool or chunked attention") as error:
            check_model(scheduler)
        assert error.value.status == 400
    else:
        check_model(scheduler)
        with pytest.raises(DocumentError, match="torch_native only"):
            check_compacted_windows(runner)
