"""Documents on every data-parallel rank of one server (``--dp-size 2``, the embedded recall model on loopback):
registered once and served compacted by both ranks with the same slots, listed with each rank's state,
dropped on both, refused by the whole server when one rank cannot take it, saved and loaded on both."""

from functools import partial

import pytest

from sglang_am.client import http_json
from sglang_am.recall_model import recall_task
from sglang_am.serve import serving

from . import live_server

pytestmark = pytest.mark.slow
ADMIN = "admin-key"
GREEDY = {"max_new_tokens": 1, "temperature": 0}
ok = partial(live_server.ok, key=ADMIN)


@pytest.fixture(scope="module")
def server(store_dir, faults):
    env = {"SGLANG_AM_TEST_FAULTS": str(faults), "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"}
    flags = ["--dp-size", "2", "--max-total-tokens", "8192", "--dtype", "float32", "--admin-api-key", ADMIN,
             "--am-store-dir", str(store_dir)]
    with serving(flags, env=env) as url:
        yield url


@pytest.fixture(autouse=True)
def no_documents_left(server):
    """A test that fails mid-way drops what it registered, so the next test starts from an empty server."""
    yield
    for doc in ok(server, "GET", "/am/documents")["documents"]:
        ok(server, "DELETE", f"/am/documents/{doc['doc_id']}")


def document(tokenizer, seed):
    (doc,) = recall_task(num_pairs=200, num_questions=6, seed=seed)
    ids = tokenizer.encode(doc.text)
    return ids, [tokenizer.encode(f"{doc.text}\n{q.question}") for q in doc.questions]


def on_rank(server, prompts, rank):
    body = ok(server, "POST", "/generate", {"input_ids": prompts, "sampling_params": GREEDY, "routed_dp_rank": rank,
                                           "return_logprob": True, "top_logprobs_num": 3})
    return body


def per_rank(stats, *path):
    values = []
    for rank in stats["ranks"]:
        for key in path:
            rank = rank[key]
        values.append(rank)
    return values


def nothing_held(stats) -> bool:
    """Every rank's pool is free but for what its radix cache could evict, and no leak."""
    pools = per_rank(stats, "pool")
    return all(p["available"] + p["evictable"] == p["total"] for p in pools) and stats["idle_check"]["leak"] is False


def test_registered_once_served_compacted_by_both_ranks_and_dropped_on_both(server, tokenizer):
    ids, prompts = document(tokenizer, seed=3)
    status, body = http_json("POST", server + "/am/documents", {"input_ids": ids, "ratio": 0.1, "adapt": True}, ADMIN)
    assert status == 501 and "adapt with --dp-size > 1" in body["error"]  # each rank would see part of the traffic
    registered = ok(server, "POST", "/am/documents", {"input_ids": ids, "ratio": 0.1})
    assert registered["state"] == "ready" and registered["ranks"] == {"0": "ready", "1": "ready"}
    stats = ok(server, "GET", "/am/stats")
    assert stats["dp_size"] == 2 and per_rank(stats, "documents", "ready") == [1, 1]
    assert stats["documents"]["ready"] == 2  # totals count each rank's copy
    # Compacted once: one rank solved it, the other installed that copy.
    compactions = per_rank(stats, "counters", "compactions")
    handoffs = per_rank(stats, "counters", "handoffs")
    assert sorted(sum(c.values()) for c in compactions) == [0, 1]
    assert sorted(sum(h.values()) for h in handoffs) == [0, 1]
    served = [on_rank(server, prompts, rank) for rank in (0, 1)]
    for outputs in served:
        for out in outputs:
            assert out["meta_info"]["am_document"][0]["compacted_slots"] == registered["t"]
    # The same slots on both ranks: the same answers and log-probs (to float32 noise: the two schedulers may
    # batch the prompts differently, which reorders the reductions; a lossy handoff would differ by far more).
    for first, second in zip(*served):
        assert first["text"] == second["text"]
        assert first["meta_info"]["output_token_logprobs"][0][0] == pytest.approx(
            second["meta_info"]["output_token_logprobs"][0][0], abs=1e-4)
    assert ok(server, "GET", f"/am/documents/{registered['doc_id']}")["requests_served"] == 2 * len(prompts)
    dropped = ok(server, "DELETE", f"/am/documents/{registered['doc_id']}")
    assert dropped["dropped"] and dropped["freed_slots"] >= 2 * registered["t"]
    assert http_json("GET", f"{server}/am/documents/{registered['doc_id']}", None, ADMIN)[0] == 404
    stats = ok(server, "GET", "/am/stats")
    assert per_rank(stats, "documents", "ready") == [0, 0] and nothing_held(stats)


def test_a_failure_on_one_rank_leaves_nothing_on_the_other(server, tokenizer, faults):
    ids, _ = document(tokenizer, seed=4)
    # The handoff cannot be written: the primary compacted it, the other rank cannot take it.
    faults.write_text("store_write")
    try:
        status, body = http_json("POST", f"{server}/am/documents", {"input_ids": ids, "ratio": 0.1}, ADMIN)
    finally:
        faults.write_text("")
    assert status == 507 and "DP rank" in body["error"], body
    # Refused at admission on one rank only (its pool is full): nothing is reserved on the other.
    faults.write_text("prepare_rank_1")
    try:
        status, body = http_json("POST", f"{server}/am/documents", {"input_ids": ids, "ratio": 0.1}, ADMIN)
    finally:
        faults.write_text("")
    assert status == 503 and body["error"].startswith("DP rank 1:"), body
    assert ok(server, "GET", "/am/documents")["documents"] == []
    assert nothing_held(ok(server, "GET", "/am/stats"))
    registered = ok(server, "POST", "/am/documents", {"input_ids": ids, "ratio": 0.1})  # and it works again
    assert registered["ranks"] == {"0": "ready", "1": "ready"}
    ok(server, "DELETE", f"/am/documents/{registered['doc_id']}")


def test_save_and_load_act_on_both_ranks(server, tokenizer):
    ids, prompts = document(tokenizer, seed=5)
    registered = ok(server, "POST", "/am/documents", {"input_ids": ids, "ratio": 0.1})
    doc_id = registered["doc_id"]
    ok(server, "POST", f"/am/documents/{doc_id}/save")
    ok(server, "DELETE", f"/am/documents/{doc_id}")
    loaded = ok(server, "POST", f"/am/documents/{doc_id}/load")
    assert loaded["existing"] is False and loaded["ranks"] == {"0": "ready", "1": "ready"}
    assert per_rank(ok(server, "GET", "/am/stats"), "counters", "loads") == [{"explicit": 1}, {"explicit": 1}]
    for rank in (0, 1):
        assert all(out["meta_info"]["am_document"][0]["doc_id"] == doc_id for out in on_rank(server, prompts[:2], rank))
    ok(server, "DELETE", f"/am/documents/{doc_id}")
    assert ok(server, "DELETE", f"/am/store/{doc_id}")["deleted"] is True
