"""Question-aware documents, the fidelity guard and refits from live traffic, on a real SGLang server on
loopback (the embedded recall model, float32): the questions' answers come back at 10%, each registration
reports its fidelity, ``"ratio": "auto"`` picks from its ladder, and an adapting document refits from the
requests it serves without disturbing the ones running, leaking, or outliving a drop."""

import threading
import time

import pytest

from sglang_am.client import http_json
from sglang_am.recall_model import recall_task
from sglang_am.serve import serving

from .live_server import STRICT_CHECKS, ok

pytestmark = pytest.mark.slow
FLAGS = ["--max-total-tokens", "8192", "--dtype", "float32", "--am-adapt-refit-every", "32"]
GREEDY = {"max_new_tokens": 1, "temperature": 0}


@pytest.fixture(scope="module")
def server(faults):
    with serving(FLAGS, env={**STRICT_CHECKS, "SGLANG_AM_TEST_FAULTS": str(faults)}) as url:
        yield url


def task(tokenizer, seed, questions=16):
    (doc,) = recall_task(num_pairs=300, num_questions=questions, seed=seed)
    ids = tokenizer.encode(doc.text)
    asked = [tokenizer.encode("\n" + q.question, add_special_tokens=False) for q in doc.questions]
    return doc, ids, asked


def correct(server, doc, ids, asked) -> int:
    outputs = ok(server, "POST", "/generate", {"input_ids": [ids + q for q in asked], "sampling_params": GREEDY})
    return sum(out["text"].strip() == q.answer for out, q in zip(outputs, doc.questions))


def idle_check(server):
    for _ in range(50):
        check = ok(server, "GET", "/am/stats")["idle_check"]
        if check["idle"]:
            return check
        time.sleep(0.2)
    raise AssertionError("the scheduler did not go idle")


def test_a_question_aware_document_answers_its_questions_and_reports_its_fidelity(server, tokenizer):
    doc, ids, asked = task(tokenizer, seed=31)
    plain = ok(server, "POST", "/am/documents", {"input_ids": ids, "ratio": 0.1})
    without = correct(server, doc, ids, asked)
    assert plain["fidelity"]["relative_l2"] > 0 and "answers" not in plain["fidelity"]["layers"]["0"]
    assert "next_token_kl" not in plain["fidelity"]  # no questions: nothing to measure end to end
    ok(server, "DELETE", f"/am/documents/{plain['doc_id']}")
    hits = ok(server, "GET", "/am/stats")["counters"]["hits"]
    texts = ["\n" + q.question for q in doc.questions]  # questions as text, tokenized by the server
    aware = ok(server, "POST", "/am/documents", {"input_ids": ids, "ratio": 0.1, "questions": texts})
    assert aware["t"] == plain["t"] and aware["config"]["questions"] == len(asked)
    assert aware["config"]["query_source"] == {"questions": 1.0}
    fidelity = aware["fidelity"]
    assert fidelity["questions"] == len(asked) and 0 <= fidelity["next_token_kl"] <= fidelity["next_token_kl_max"] < 0.1
    assert all("answers" in layer for layer in fidelity["layers"].values())
    assert fidelity["relative_l2"] < plain["fidelity"]["relative_l2"]
    assert aware["requests_served"] == 0 and ok(server, "GET", "/am/stats")["counters"]["hits"] == hits  # probes count nowhere
    assert correct(server, doc, ids, asked) == len(asked) > without
    ok(server, "DELETE", f"/am/documents/{aware['doc_id']}")


def test_auto_ratio_picks_the_smallest_rung_that_meets_the_bound(server, tokenizer):
    doc, ids, asked = task(tokenizer, seed=32, questions=8)
    loose = ok(server, "POST", "/am/documents", {"input_ids": ids, "ratio": "auto", "fidelity_bound": 5.0, "questions": asked})
    assert loose["fidelity"]["ratio"] == 0.05 and loose["t"] == round(0.05 * len(ids))
    assert [rung["ratio"] for rung in loose["fidelity"]["ladder"]] == [0.05]
    ok(server, "DELETE", f"/am/documents/{loose['doc_id']}")
    strict = ok(server, "POST", "/am/documents", {"input_ids": ids, "ratio": "auto", "fidelity_bound": 1e-6, "questions": asked})
    assert strict["fidelity"]["ratio"] == 0.5 and strict["t"] == round(0.5 * len(ids))
    assert len(strict["fidelity"]["ladder"]) == 5 and strict["config"]["budget"] == "auto"
    ok(server, "DELETE", f"/am/documents/{strict['doc_id']}")


def test_an_adapting_document_refits_from_its_traffic_and_running_requests_finish_on_their_version(server, tokenizer):
    doc, ids, asked = task(tokenizer, seed=33)
    registered = ok(server, "POST", "/am/documents", {"input_ids": ids, "ratio": 0.1, "adapt": True})
    doc_id, slots = registered["doc_id"], registered["t"]
    assert registered["adapt"]["refits"] == 0 and registered["adapt"]["host_bytes"] > 0
    long_request = {"input_ids": ids + asked[0], "sampling_params": {"max_new_tokens": 400, "temperature": 0,
                                                                      "ignore_eos": True}}
    before = ok(server, "POST", "/generate", long_request)  # the first version's answer, alone
    first_pass = correct(server, doc, ids, asked)
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(ok(server, "POST", "/generate", long_request)))
    worker.start()
    for _ in range(6):  # traffic while the long request decodes: refits install new versions meanwhile
        correct(server, doc, ids, asked)
    worker.join()
    described = ok(server, "GET", f"/am/documents/{doc_id}")
    assert described["adapt"]["refits"] >= 1 and described["adapt"]["queries_seen"] > 0
    assert described["fidelity"]["relative_l2"] is not None
    assert outcome["output_ids"] == before["output_ids"]  # it started on the first version and finished there
    assert correct(server, doc, ids, asked) >= max(first_pass, len(asked) - 1)
    stats = ok(server, "GET", "/am/stats")
    assert stats["counters"]["refits"] >= 1 and stats["gauges"]["compacted_slots"] == slots  # old versions are gone
    assert idle_check(server)["leak"] is False
    assert ok(server, "DELETE", f"/am/documents/{doc_id}")["freed_slots"] >= slots


def test_a_failed_refit_keeps_the_document_and_a_drop_cancels_a_running_one(server, tokenizer, faults):
    doc, ids, asked = task(tokenizer, seed=34)
    registered = ok(server, "POST", "/am/documents", {"input_ids": ids, "ratio": 0.1, "adapt": True})
    faults.write_text("solve")  # a failing refit: the document keeps serving the version it has, and says why
    try:
        for _ in range(3):
            correct(server, doc, ids, asked)
            if ok(server, "GET", f"/am/documents/{registered['doc_id']}")["adapt"]["refit_failures"]:
                break
    finally:
        faults.write_text("")
    described = ok(server, "GET", f"/am/documents/{registered['doc_id']}")
    assert described["state"] == "ready" and described["t"] == registered["t"]
    assert described["adapt"]["refit_failures"] >= 1
    assert described["adapt"]["last_error"] == "RuntimeError: injected solver failure"
    refits = ok(server, "GET", "/am/stats")["counters"]["refits"]
    faults.write_text("refit_slow")
    try:
        for _ in range(3):
            correct(server, doc, ids, asked)
            if ok(server, "GET", f"/am/documents/{registered['doc_id']}")["adapt"]["refitting"]:
                break
        assert ok(server, "GET", f"/am/documents/{registered['doc_id']}")["adapt"]["refitting"]
        assert ok(server, "DELETE", f"/am/documents/{registered['doc_id']}")["dropped"]
    finally:
        faults.write_text("")
    time.sleep(4)  # the cancelled refit wakes up and stops at its first step
    correct(server, doc, ids, asked)  # a batch runs: nothing is installed for the dropped document
    stats = ok(server, "GET", "/am/stats")
    assert stats["counters"]["refits"] == refits and stats["documents"]["ready"] == 0
    assert idle_check(server)["leak"] is False and stats["pool"]["protected"] == 0


def test_adapt_and_questions_are_bounded(server, tokenizer):
    _, ids, asked = task(tokenizer, seed=35)
    cases = [({"questions": asked * 5}, "questions must be a list of 1 to 64"),
             ({"questions": [list(range(300))]}, "a list of 1 to 256 token ids"),
             ({"adapt": 1}, "adapt must be true or false")]
    for fields, reason in cases:
        status, body = http_json("POST", server + "/am/documents", {"input_ids": ids, "ratio": 0.1, **fields})
        assert status == 400 and reason in body["error"], body
