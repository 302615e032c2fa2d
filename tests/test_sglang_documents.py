"""Compacted documents served by a real SGLang server on loopback (the embedded recall model, float32):
register/ask/list/drop over HTTP, exactness against a stock server and against the transformers adapter,
bad input, concurrency, drop while in use, eviction pressure, and an in-process Engine."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from sglang_am.batch_qa import complete
from sglang_am.client import http_json
from sglang_am.hf import forward_after_prefix
from sglang_am.prefix import CompactedPrefix
from sglang_am.recall_model import default_model_path, load_recall_model, recall_task
from sglang_am.serve import server_process
from sglang_am.server.cpu import cpu_environment, has_cuda

from .live_server import STRICT_CHECKS, side_by_side

pytestmark = pytest.mark.slow
KEY = "test-key"  # --api-key: ordinary requests
ADMIN = "admin-key"  # --admin-api-key: the /am/ routes (SGLang's ADMIN_OPTIONAL rule with both keys set)
FLAGS = ["--max-total-tokens", "8192", "--dtype", "float32"]
GREEDY = {"max_new_tokens": 1, "temperature": 0}
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def servers(store_dir):
    """The extension, and SGLang itself (no plugin: SGLANG_AM unset; its own radix cache, torch_native), started
    side by side."""
    flags = [*FLAGS, "--api-key", KEY, "--admin-api-key", ADMIN, "--am-store-dir", str(store_dir)]
    with side_by_side(server_process(flags, env=STRICT_CHECKS),
                      server_process(["--model-path", str(default_model_path()), *FLAGS], stock=True)) as urls:
        yield urls


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


def call(server, method, path, payload=None, api_key=None):
    return http_json(method, server + path, payload, api_key or (ADMIN if path.startswith("/am/") else KEY))


def ok(server, method, path, payload=None):
    status, body = call(server, method, path, payload)
    assert status == 200, (status, body)
    return body


def document(tokenizer, seed, pairs=300, questions=8):
    (doc,) = recall_task(num_pairs=pairs, num_questions=questions, seed=seed)
    ids = tokenizer.encode(doc.text)
    prompts = [tokenizer.encode(f"{doc.text}\n{q.question}") for q in doc.questions]
    assert all(p[: len(ids)] == ids for p in prompts)  # the document is a token prefix of every prompt
    return doc, ids, prompts


def generate(server, prompts, sampling=GREEDY, **extra):
    body = ok(server, "POST", "/generate", {"input_ids": prompts, "sampling_params": sampling, **extra})
    return body if isinstance(body, list) else [body]


def answers(outputs):
    return [out["text"].strip() for out in outputs]


def test_register_ask_list_drop(server, tokenizer):
    doc, ids, prompts = document(tokenizer, seed=11)
    registered = ok(server, "POST", "/am/documents", {"input_ids": ids, "ratio": 0.1})
    assert registered["state"] == "ready" and registered["T"] == len(ids) and registered["existing"] is False
    assert registered["t"] == registered["slots"] == round(0.1 * len(ids)) and registered["wasted_slots"] == 0
    assert {"prefill_seconds", "selection_seconds", "beta_seconds", "values_seconds"} <= set(registered["timings"])
    outputs = generate(server, prompts)
    for out in outputs:
        info = out["meta_info"]["am_document"][0]
        assert info == {"doc_id": registered["doc_id"], "document_tokens": len(ids),
                        "compacted_slots": registered["t"], "logical_prompt_tokens": len(prompts[0])}
        assert out["meta_info"]["prompt_tokens"] == registered["t"] + len(prompts[0]) - len(ids)
        assert out["meta_info"]["cached_tokens"] >= registered["t"]  # the pinned node served the document
    # The recall model's lookup is sharp: at 10% some answers survive, all are real words of the document.
    assert sum(a == q.answer for a, q in zip(answers(outputs), doc.questions)) >= 1
    listed = ok(server, "GET", "/am/documents")["documents"]
    assert [d["doc_id"] for d in listed if d["doc_id"] == registered["doc_id"]] == [registered["doc_id"]]
    assert ok(server, "GET", f"/am/documents/{registered['doc_id']}")["requests_served"] == len(prompts)
    dropped = ok(server, "DELETE", f"/am/documents/{registered['doc_id']}")
    assert dropped["dropped"] and dropped["freed_slots"] >= registered["t"]
    assert call(server, "GET", f"/am/documents/{registered['doc_id']}")[0] == 404
    after = generate(server, prompts)  # ordinary prefix caching again, with the full document
    assert "am_document" not in after[0]["meta_info"] and answers(after) == [q.answer for q in doc.questions]


def test_openai_requests_use_the_document_and_partial_prefixes_fall_back(server, tokenizer):
    doc, ids, prompts = document(tokenizer, seed=12)
    registered = ok(server, "POST", "/am/documents", {"text": doc.text, "ratio": 1.0})
    assert registered["T"] == len(ids)
    completion = ok(server, "POST", "/v1/completions", {"model": "default", "prompt": f"{doc.text}\n{doc.questions[0].question}",
                                                         "max_tokens": 1, "temperature": 0})
    assert completion["choices"][0]["text"].strip() == doc.questions[0].answer
    assert completion["usage"]["prompt_tokens"] == len(prompts[0]) - len(ids) + registered["t"]
    half = ids[: len(ids) // 2] + prompts[0][len(ids):]
    (out,) = generate(server, [half])
    assert "am_document" not in out["meta_info"]
    forced = generate(server, [prompts[0]], sampling={**GREEDY, "custom_params": {"am_doc_id": registered["doc_id"]}})
    assert forced[0]["meta_info"]["am_document"][0]["doc_id"] == registered["doc_id"]
    status, body = call(server, "POST", "/generate", {"input_ids": half, "sampling_params": {
        **GREEDY, "custom_params": {"am_doc_id": registered["doc_id"]}}})
    assert status == 400 and "does not start with document" in json.dumps(body)
    ok(server, "DELETE", f"/am/documents/{registered['doc_id']}")


@pytest.fixture(scope="module")
def stock_server(servers):
    return servers[1]


def test_identity_compaction_matches_the_stock_server(server, stock_server, tokenizer):
    doc, ids, prompts = document(tokenizer, seed=13, questions=4)
    sampling = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}
    extra = {"return_logprob": True, "top_logprobs_num": 10}
    status, stock = http_json("POST", stock_server + "/generate", {"input_ids": prompts, "sampling_params": sampling, **extra})
    assert status == 200
    # No document: the extension's own attention path (only the new tokens' queries) against SGLang's padded one.
    for a, b in zip(generate(server, prompts, sampling, **extra), stock):
        assert "am_document" not in a["meta_info"] and a["output_ids"] == b["output_ids"]
        for step_a, step_b in zip(a["meta_info"]["output_top_logprobs"], b["meta_info"]["output_top_logprobs"]):
            assert [t[1] for t in step_a] == [t[1] for t in step_b]
            assert max(abs(x[0] - y[0]) for x, y in zip(step_a, step_b)) < 1e-4
    registered = ok(server, "POST", "/am/documents", {"input_ids": ids, "ratio": 1.0})
    assert registered["t"] == len(ids)
    ours = generate(server, prompts, sampling, **extra)
    for a, b in zip(ours, stock):
        assert "am_document" in a["meta_info"] and a["output_ids"] == b["output_ids"]
        for step_a, step_b in zip(a["meta_info"]["output_top_logprobs"], b["meta_info"]["output_top_logprobs"]):
            assert [t[1] for t in step_a] == [t[1] for t in step_b]
            assert max(abs(x[0] - y[0]) for x, y in zip(step_a, step_b)) < 1e-3
    streamed = complete(server, prompts[0], 6, KEY, api="native", ignore_eos=True)  # as benchmarks/long_decode.py asks
    assert streamed.tokens == ours[0]["output_ids"] and streamed.completion_tokens == 6
    assert streamed.document == registered["doc_id"]
    assert len(streamed.inter_token_latencies()) == 6 - streamed.arrivals[0][1]  # a gap per token after the first chunk
    ok(server, "DELETE", f"/am/documents/{registered['doc_id']}")


def test_served_logits_match_the_transformers_adapter(server, tokenizer, store_dir):
    doc, ids, prompts = document(tokenizer, seed=14, questions=4)
    registered = ok(server, "POST", "/am/documents", {"input_ids": ids, "ratio": 0.1, "query_source": "context-prefill"})
    saved = ok(server, "POST", f"/am/documents/{registered['doc_id']}/save")
    model, _ = load_recall_model()
    from sglang_am.fingerprint import model_fingerprint

    (stored,) = store_dir.glob(f"*/{registered['doc_id']}.safetensors")
    assert saved == {"doc_id": registered["doc_id"], "stored": True, "bytes": stored.stat().st_size}
    prefix = CompactedPrefix.load(stored, expected_fingerprint=model_fingerprint(model))
    assert prefix.logical_length == len(ids) and prefix.num_slots == registered["t"]
    outputs = generate(server, prompts, return_logprob=True, top_logprobs_num=20)
    for prompt, out in zip(prompts, outputs):
        logits, _ = forward_after_prefix(model, prefix, torch.tensor([prompt[len(ids):]]))
        reference = torch.log_softmax(logits[0, -1].double(), dim=-1)
        served = out["meta_info"]["output_top_logprobs"][0]
        assert served[0][1] == int(reference.argmax())
        assert max(abs(value - reference[token].item()) for value, token, _ in served) < 2e-3
    ok(server, "DELETE", f"/am/documents/{registered['doc_id']}")


def test_bad_input_gets_a_4xx_with_the_reason(server, tokenizer):
    _, ids, prompts = document(tokenizer, seed=15)
    cases = [
        ({"input_ids": ids[:5], "ratio": 0.5}, "input_ids must be a list of 16 to"),
        ({"input_ids": ids, "ratio": 0.0}, "ratio must be in (0, 1]"),
        ({"input_ids": ids, "ratio": 1.5}, "ratio must be in (0, 1]"),
        ({"input_ids": ids, "budget": len(ids) + 1}, "budget must be in [1, T - keep_first]"),
        ({"input_ids": ids}, "exactly one of ratio"),
        ({"input_ids": ids, "text": "x", "ratio": 0.1}, "exactly one of text, input_ids or messages"),
        ({"input_ids": ["a"], "ratio": 0.1}, "input_ids must be"),
        # A valid id for the protocol but not for this model: its embedding lookup would crash the scheduler.
        ({"input_ids": ids[:-1] + [tokenizer.vocab_size + 5000], "ratio": 0.1}, "for this model"),
        ({"input_ids": ids, "ratio": 0.1, "questions": [[1, 1 << 20]]}, "questions[0] must be token ids in [0, 1057)"),
        ({"input_ids": ids, "ratio": 0.1, "method": "nope"}, "nope"),
        ({"input_ids": ids, "ratio": 0.1, "query_source": "random"}, "query_source"),
        ({"input_ids": ids, "ratio": 0.1, "head_budgets": {"L0H0": 2.0}}, "sum"),
        ({"input_ids": ids, "ratio": 0.1, "head_budgets": {"L0H0": 1.0}}, "one proportion per (global layer, KV head)"),
        ({"input_ids": ids, "ratio": 0.1, "colour": "red"}, "colour"),
        ({"input_ids": ids, "ratio": 0.1, "options": {"scale": 2.0}}, "options.scale is set by the server"),
        ({"input_ids": ids, "ratio": 0.1, "options": {"nnls_iters": 100_000_000}}, "options.nnls_iters must be"),
        ({"input_ids": ids, "learn": True}, "learn uses the automatic policy: start the server with --am-auto"),
    ]
    for payload, reason in cases:
        status, body = call(server, "POST", "/am/documents", payload)
        assert status == 400 and reason in body["error"], (payload, status, body)
    assert call(server, "POST", "/am/documents", None)[0] == 400
    assert len(ok(server, "GET", "/am/documents")["documents"]) == 0
    huge = (ids * 7)[:4050]  # under the 4096-token context, but its capture prefill (2T + ...) exceeds the pool
    status, body = call(server, "POST", "/am/documents", {"input_ids": huge, "ratio": 0.1})
    assert status == 503 and "raise --max-total-tokens" in body["error"], body
    assert call(server, "GET", "/am/documents/" + "0" * 64)[0] == 404
    assert call(server, "DELETE", "/am/documents/" + "0" * 64)[0] == 404
    assert http_json("GET", server + "/am/documents")[0] == 401
    assert call(server, "GET", "/am/documents", api_key="wrong")[0] == 401
    assert call(server, "GET", "/am/documents", api_key=KEY)[0] == 401  # with both keys set, the admin key
    # SGLang itself would hand an out-of-vocabulary prompt id to the embedding and lose the scheduler.
    status, body = call(server, "POST", "/generate", {"input_ids": [5, tokenizer.vocab_size], "sampling_params": GREEDY})
    assert status == 400 and "for this model" in json.dumps(body), body
    status, body = call(server, "POST", "/generate", {"input_ids": prompts[0], "sampling_params": {
        **GREEDY, "custom_params": {"am_doc_id": "0000000000000000"}}})
    assert status == 400 and "not a registered" in json.dumps(body)

    registered = ok(server, "POST", "/am/documents", {"input_ids": ids, "ratio": 0.05})
    doc_id = registered["doc_id"]
    # Save, drop, load: the reloaded document serves the same answers from the same slots' content.
    before = answers(generate(server, prompts[:4]))
    ok(server, "POST", f"/am/documents/{doc_id}/save")
    ok(server, "DELETE", f"/am/documents/{doc_id}")
    loaded = ok(server, "POST", f"/am/documents/{doc_id}/load")
    assert loaded["doc_id"] == doc_id and loaded["t"] == registered["t"] and loaded["existing"] is False
    assert answers(generate(server, prompts[:4])) == before
    assert ok(server, "POST", f"/am/documents/{doc_id}/load")["existing"] is True
    ok(server, "DELETE", f"/am/documents/{doc_id}")

    skewed = {"L0H0": 0.4, "L0H1": 0.1, "L1H0": 0.4, "L1H1": 0.1}  # per-head budgets, stored padded
    uneven = ok(server, "POST", "/am/documents", {"input_ids": ids, "ratio": 0.1, "head_budgets": skewed})
    assert uneven["t"] == int(0.4 * 0.1 * len(ids) * 4) and uneven["wasted_slots"] > 0
    ok(server, "DELETE", f"/am/documents/{uneven['doc_id']}")


def test_duplicate_and_concurrent_registrations_share_one_document(server, tokenizer):
    _, ids, _ = document(tokenizer, seed=16)
    results = [None, None]

    def register(i):
        results[i] = call(server, "POST", "/am/documents", {"input_ids": ids, "ratio": 0.1, "query_source": "ss-plus-repeat"})

    threads = [threading.Thread(target=register, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [status for status, _ in results] == [200, 200], results
    bodies = [body for _, body in results]
    assert bodies[0]["doc_id"] == bodies[1]["doc_id"] and sorted(b["existing"] for b in bodies) == [False, True]
    assert all(b["state"] == "ready" for b in bodies)
    assert max(b["timings"]["self_study_seconds"] for b in bodies) > 0  # the server generated self-study answers
    again = ok(server, "POST", "/am/documents", {"input_ids": ids, "ratio": 0.5})
    assert again["existing"] is True and again["t"] == bodies[0]["t"]
    ok(server, "DELETE", f"/am/documents/{again['doc_id']}")


def test_drop_is_refused_while_a_request_uses_the_document(server, tokenizer):
    _, ids, prompts = document(tokenizer, seed=17)
    doc_id = ok(server, "POST", "/am/documents", {"input_ids": ids, "ratio": 0.1})["doc_id"]
    sampling = {"max_new_tokens": 600, "temperature": 0, "ignore_eos": True}
    long_run = threading.Thread(target=generate, args=(server, [prompts[0]], sampling))
    long_run.start()
    time.sleep(1.0)
    status, body = call(server, "DELETE", f"/am/documents/{doc_id}")
    long_run.join()
    assert status == 409 and "in use" in body["error"]
    ok(server, "DELETE", f"/am/documents/{doc_id}")


def test_pinned_documents_survive_eviction_pressure(server, tokenizer):
    doc, ids, prompts = document(tokenizer, seed=18)
    registered = ok(server, "POST", "/am/documents", {"input_ids": ids, "ratio": 1.0})
    for seed in range(100, 108):  # 8 other documents of ~1.2k tokens each overflow the 8192-slot pool
        (other,) = recall_task(num_pairs=600, num_questions=1, seed=seed)
        generate(server, [tokenizer.encode(f"{other.text}\n{other.questions[0].question}")])
    outputs = generate(server, prompts)
    assert answers(outputs) == [q.answer for q in doc.questions]
    assert all(out["meta_info"]["am_document"][0]["doc_id"] == registered["doc_id"] for out in outputs)
    ok(server, "DELETE", f"/am/documents/{registered['doc_id']}")
    assert http_json("GET", server + "/health")[0] == 200  # the idle memory checks held throughout


def test_engine_documents_example_runs():
    env = {**os.environ, "SGLANG_AM": "1"}
    env = env if has_cuda() else cpu_environment(env)
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "engine_documents.py")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["registered"]["state"] == "ready" and report["served_compacted"] is True
    assert report["dropped"]["dropped"] is True and report["documents_after_drop"] == []
