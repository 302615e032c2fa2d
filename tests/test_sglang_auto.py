"""Automatic compaction on a real SGLang server on loopback (the embedded recall model, float32): reused
prefixes get compacted in the background and serve new requests, the automatic budget evicts the least
recently used document to disk and loads it back on reuse, and the counters reach ``/am/stats`` and
SGLang's Prometheus ``/metrics``."""

import re
import time
import urllib.request
from functools import partial

import pytest
import torch

from sglang_am.client import http_json
from sglang_am.prefix import CompactedPrefix
from sglang_am.recall_model import load_recall_model, recall_task
from sglang_am.serve import serving

from . import live_server
from .live_server import STRICT_CHECKS

pytestmark = pytest.mark.slow
KEEP_FIRST, KEEP_LAST, RATIO, BUDGET = 4, 16, 0.1, 40
KEY = "admin-key"  # the store's routes need the server's admin key
# The captured source: these documents are compacted right after their trigger (test_sglang_learn covers "live").
AUTO_FLAGS = ["--am-auto", "--am-auto-min-tokens", "64", "--am-auto-min-requests", "3", "--am-auto-poll-seconds", "0.2",
              "--am-auto-ratio", str(RATIO), "--am-auto-budget", str(BUDGET), "--am-auto-query-source", "repeat-prefill"]
ok = partial(live_server.ok, key=KEY)


@pytest.fixture(scope="module")
def server(store_dir):
    flags = ["--max-total-tokens", "8192", "--dtype", "float32", "--enable-metrics", *AUTO_FLAGS,
             "--am-store-dir", str(store_dir), "--admin-api-key", KEY]
    with serving(flags, env=STRICT_CHECKS) as url:
        yield url


def generate(server, text):
    return ok(server, "POST", "/generate", {"text": text, "sampling_params": {"max_new_tokens": 3, "temperature": 0}})


def wait_for(server, condition, what, seconds=120):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        stats = ok(server, "GET", "/am/stats")
        if condition(stats):
            return stats
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}: {stats}")


def documents(server):
    return {d["doc_id"]: d for d in ok(server, "GET", "/am/documents")["documents"]}


def reuse(server, doc, questions=4):
    """One request that caches the document, then ``questions - 1`` that reuse it."""
    for q in doc.questions[:questions]:
        generate(server, f"{doc.text}\n{q.question}")


def test_reused_prefixes_are_compacted_evicted_to_disk_and_loaded_back(server, tokenizer, store_dir):
    doc_a, doc_b = (recall_task(num_pairs=100, num_questions=6, seed=seed)[0] for seed in (11, 12))
    reuse(server, doc_a)
    wait_for(server, lambda s: s["documents"]["auto"] == 1, "the first automatic document")
    (auto_a,) = documents(server).values()
    prompts = [tokenizer.encode(f"{doc_a.text}\n{q.question}") for q in doc_a.questions[:2]]
    shared = next(i for i, (x, y) in enumerate(zip(*prompts)) if x != y)
    assert auto_a["origin"] == "auto" and auto_a["T"] == shared - KEEP_LAST
    assert auto_a["t"] == KEEP_FIRST + round(RATIO * (auto_a["T"] - KEEP_FIRST))

    question = f"{doc_a.text}\n{doc_a.questions[5].question}"
    first = generate(server, question)
    assert first["meta_info"]["am_document"][0]["doc_id"] == auto_a["doc_id"]

    # A second document does not fit the 40-slot budget beside the first: the first is saved and dropped.
    reuse(server, doc_b)
    stats = wait_for(server, lambda s: s["counters"]["auto_evictions"] == 1 and s["documents"]["auto"] == 1,
                     "the budget eviction")
    assert set(documents(server)) != {auto_a["doc_id"]}
    assert len(list(store_dir.glob(f"*/{auto_a['doc_id']}.safetensors"))) == 1
    assert stats["gauges"]["auto_slots"] <= BUDGET

    # Reused again, the first comes back from disk (no second compaction) and answers as before.
    reuse(server, doc_a)
    stats = wait_for(server, lambda s: s["counters"]["auto_evictions"] == 2 and auto_a["doc_id"] in documents(server),
                     "the reload from disk")
    assert stats["counters"]["compactions"] == {"auto": 2}
    again = generate(server, question)
    assert again["meta_info"]["am_document"][0]["doc_id"] == auto_a["doc_id"]
    assert again["output_ids"] == first["output_ids"]

    stats = wait_for(server, lambda s: s["idle_check"]["idle"], "an idle scheduler")
    assert stats["idle_check"]["leak"] is False
    assert stats["counters"]["hits"] >= 2 and stats["counters"]["auto_triggers"] == 3
    with urllib.request.urlopen(f"{server}/metrics", timeout=30) as response:
        metrics = response.read().decode()
    assert re.search(r'sglang:am_compactions_total\{[^}]*origin="auto"[^}]*\} 2\.0', metrics), metrics[-3000:]
    assert re.search(r"sglang:am_auto_evictions_total\{[^}]*\} 2\.0", metrics)
    assert re.search(r"sglang:am_hits_total\{[^}]*\} [1-9]", metrics)


def test_kept_first_tokens_are_stored_verbatim_with_zero_bias(server, tokenizer, store_dir):
    (doc,) = recall_task(num_pairs=60, num_questions=1, seed=13)
    ids = tokenizer.encode(doc.text)
    registered = ok(server, "POST", "/am/documents", {"input_ids": ids, "ratio": 0.1, "keep_first": 8})
    assert registered["origin"] == "explicit" and registered["config"]["keep_first"] == 8
    assert registered["t"] == 8 + round(0.1 * (len(ids) - 8))
    ok(server, "POST", f"/am/documents/{registered['doc_id']}/save")
    (stored,) = store_dir.glob(f"*/{registered['doc_id']}.safetensors")
    prefix = CompactedPrefix.load(stored)
    model, _ = load_recall_model(dtype=torch.float32)
    with torch.no_grad():
        cache = model(torch.tensor([ids]), use_cache=True).past_key_values
    for layer, (keys, beta) in enumerate(zip(prefix.keys, prefix.beta)):
        assert torch.equal(beta[:, :8], torch.zeros_like(beta[:, :8]))
        torch.testing.assert_close(keys[:, :8], cache.layers[layer].keys[0, :, :8].float(), atol=1e-4, rtol=1e-4)
        assert beta[:, 8:].abs().sum() > 0  # the compacted span carries its fitted bias
    status, body = http_json("POST", f"{server}/am/documents", {"input_ids": ids, "ratio": 0.1, "keep_first": -1}, KEY)
    assert status == 400 and "keep_first" in body["error"]
    ok(server, "DELETE", f"/am/documents/{registered['doc_id']}")


def automatic_ids(tokenizer, doc) -> list[int]:
    """The tokens automatic compaction takes from ``doc``'s prompts: their shared prefix minus keep_last."""
    prompts = [tokenizer.encode(f"{doc.text}\n{q.question}") for q in doc.questions[:2]]
    shared = next(i for i, (x, y) in enumerate(zip(*prompts)) if x != y)
    return prompts[0][: shared - KEEP_LAST]


def test_registering_an_automatic_document_explicitly_keeps_it_from_eviction(server, tokenizer):
    from sglang_am.server.scheduler.registry import document_id

    doc_c, doc_d = (recall_task(num_pairs=100, num_questions=6, seed=seed)[0] for seed in (31, 32))
    ids_c, id_d = automatic_ids(tokenizer, doc_c), document_id(automatic_ids(tokenizer, doc_d))
    reuse(server, doc_c)
    ready = lambda s: documents(server).get(document_id(ids_c), {}).get("state") == "ready"
    wait_for(server, ready, "the automatic document")
    assert documents(server)[document_id(ids_c)]["origin"] == "auto"
    explicit = ok(server, "POST", "/am/documents", {"input_ids": ids_c, "ratio": 0.5})
    assert explicit["existing"] is True and explicit["origin"] == "explicit", ok(server, "GET", "/am/stats")
    reuse(server, doc_d)  # needs the automatic budget: evicts automatic documents, never doc_c now
    wait_for(server, lambda s: id_d in documents(server), "the next automatic document")
    assert documents(server)[document_id(ids_c)]["origin"] == "explicit"
    for doc_id in documents(server):
        ok(server, "DELETE", f"/am/documents/{doc_id}")


def test_with_the_default_guarded_ratio_prefixes_no_rung_certifies_stay_uncompacted_and_then_untried():
    """Random tokens compact badly at every ratio (held-out error about 0.5 here): with the default ratio
    "auto", each automatic document is refused after part of one solve, and the radix cache keeps serving
    the prefix; after three refusals in a row the server stops trying for a window."""
    import random

    rng = random.Random(0)
    flags = ["--max-total-tokens", "4096", "--am-auto", "--am-auto-min-tokens", "64", "--am-auto-min-requests", "3",
             "--am-auto-poll-seconds", "0.2", "--am-auto-query-source", "repeat-prefill"]
    with serving(flags, env={"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"}) as url:
        def answer(ids):
            return ok(url, "POST", "/generate", {"input_ids": ids, "sampling_params": {"max_new_tokens": 3,
                                                                                      "temperature": 0}})

        def failures(stats):
            return stats["counters"].get("compaction_failures", {}).get("auto", 0)

        for refused in range(1, 5):
            prefix = [rng.randrange(10, 1000) for _ in range(300)]
            prompts = [prefix + [rng.randrange(10, 1000) for _ in range(20)] for _ in range(3)]
            before = [answer(ids)["output_ids"] for ids in prompts]
            if refused == 4:  # paused: proposed, not tried
                wait_for(url, lambda s: s["counters"]["auto_triggers"] == 4, "the fourth proposal")
                time.sleep(2)
                assert failures(ok(url, "GET", "/am/stats")) == 3
                break
            stats = wait_for(url, lambda s, n=refused: failures(s) == n, f"refusal {refused}")
            assert stats["documents"]["auto"] == 0 and not stats["counters"].get("compactions")
            after = [answer(ids) for ids in prompts]
            assert [out["output_ids"] for out in after] == before  # the exact prefix, from the radix cache
            assert all("am_document" not in out["meta_info"] for out in after)
        assert wait_for(url, lambda s: s["idle_check"]["idle"], "an idle scheduler")["idle_check"]["leak"] is False
