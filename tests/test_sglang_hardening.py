"""A hostile client and injected faults against a real server on loopback (the embedded recall model, float32).

Every malformed body, path and id gets a 4xx with a reason; every size, count and duration a client can
ask for is bounded; files are written only inside the server's store; and after each injected fault
(solver exception, solver thread exit, capture failure, disk full, slow disk, slow scheduler, failing upkeep
after a batch) SGLang's
own pool invariant check finds nothing leaked and the next registration works. Stopping a server
mid-solve takes seconds, and a server killed mid-solve comes back with its store intact."""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from sglang_am.client import http_json
from sglang_am.prefix import CompactedPrefix
from sglang_am.recall_model import recall_task
from sglang_am.serve import free_port, healthy, serving
from sglang_am.server.scheduler.registry import document_id

from .live_server import STRICT_CHECKS

pytestmark = pytest.mark.slow
ADMIN = "admin-key"
SOLVE_TIMEOUT = 3.0
RPC_TIMEOUT = 1.0
BODY_LIMIT = 1 << 16
QUOTA = 40_000  # bytes: room for one small saved document (about 24 kB), not two
FLAGS = ["--max-total-tokens", "8192", "--dtype", "float32", "--admin-api-key", ADMIN,
         "--am-solve-timeout", str(SOLVE_TIMEOUT), "--am-max-registrations", "2", "--am-rpc-timeout", str(RPC_TIMEOUT),
         "--am-max-body-bytes", str(BODY_LIMIT), "--am-capture-memory-bytes", "1MiB", "--am-store-quota-bytes", str(QUOTA)]
# An OMP solve at half a 1.2k-token document takes far longer than SOLVE_TIMEOUT on this model.
SLOW = {"ratio": 0.5, "method": "AM-OMP", "query_source": "context-prefill", "max_queries_per_head": 1000}


@pytest.fixture(scope="module")
def server(store_dir, faults):
    with serving([*FLAGS, "--am-store-dir", str(store_dir)], env={**STRICT_CHECKS, "SGLANG_AM_TEST_FAULTS": str(faults)}) as url:
        yield url


def call(server, method, path, payload=None, key=ADMIN):
    return http_json(method, server + path, payload, key, timeout=120)


def ok(server, method, path, payload=None):
    status, body = call(server, method, path, payload)
    assert status == 200, (status, body)
    return body


def ids_of(tokenizer, seed, pairs=100):
    (doc,) = recall_task(num_pairs=pairs, num_questions=2, seed=seed)
    ids = tokenizer.encode(doc.text)
    return ids, [tokenizer.encode(f"{doc.text}\n{q.question}") for q in doc.questions]


def clean(server):
    """No document left registering, nothing leaked by SGLang's own pool check, the server healthy."""
    deadline = time.monotonic() + 60
    while True:
        stats = ok(server, "GET", "/am/stats")
        if stats["idle_check"]["idle"] and stats["documents"]["registering"] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert stats["documents"]["registering"] == 0, stats
    assert stats["idle_check"]["idle"] and stats["idle_check"]["leak"] is False, stats["idle_check"]
    assert http_json("GET", server + "/health")[0] == 200
    return stats


def drop_all(server):
    for doc in ok(server, "GET", "/am/documents")["documents"]:
        ok(server, "DELETE", f"/am/documents/{doc['doc_id']}")


# ----- hostile input -----

def test_malformed_bodies_paths_and_ids_get_a_4xx_with_the_reason(server, tokenizer, store_dir):
    ids, _ = ids_of(tokenizer, seed=1)
    other, _ = ids_of(tokenizer, seed=5)  # never registered: its registrations reach the length checks
    long, _ = ids_of(tokenizer, seed=6, pairs=600)  # 1.2k positions of every query head: 1.2 MB to capture
    good = ok(server, "POST", "/am/documents", {"input_ids": ids, "ratio": 0.1})["doc_id"]
    missing = "ab" * 32
    raw = [  # bodies that are not JSON objects
        b"", b"{", b"[]", b"null", b"42", b'"text"', b"\xff\xfe", b'{"input_ids": [1, 2', b"{" * 10_000,
    ]
    bad_ids = ["0" * 63, "0" * 65, "G" * 64, "A" * 64, "..", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd",
               "0" * 64 + "%00", "%C3%A9" * 32, "%20" * 64]
    cases = [("POST", "/am/documents", body, 400, "JSON object") for body in raw]
    cases += [("GET", f"/am/documents/{i}", None, (400, 404), "") for i in bad_ids]
    cases += [("DELETE", f"/am/documents/{i}", None, (400, 404), "") for i in bad_ids]
    cases += [("POST", f"/am/documents/{i}/save", None, (400, 404), "") for i in bad_ids[:5]]
    cases += [("POST", f"/am/documents/{i}/load", None, (400, 404), "") for i in bad_ids[:5]]
    cases += [("DELETE", f"/am/store/{i}", None, (400, 404), "") for i in bad_ids[:5]]
    cases += [
        ("POST", f"/am/documents/{good}/save", {"path": "/tmp/evil"}, 400, "takes no fields"),
        ("POST", f"/am/documents/{good}/save", {"path": "../../evil"}, 400, "takes no fields"),
        ("POST", f"/am/documents/{good}/load", {"path": str(store_dir)}, 400, "takes no fields"),
        ("POST", f"/am/documents/{good}/save", b"[1]", 400, "JSON object"),
        ("POST", f"/am/documents/{missing}/save", None, 404, "no document"),
        ("POST", f"/am/documents/{missing}/load", None, 404, "no stored document"),
        ("DELETE", f"/am/documents/{missing}", None, 404, "no document"),
        ("POST", "/am/documents", {"input_ids": ids, "ratio": 0.1, "path": "/tmp/x"}, 400, "path"),
        ("POST", "/am/documents", {"input_ids": [ids]}, 400, "token ids"),
        ("POST", "/am/documents", {"input_ids": {"a": 1}, "ratio": 0.1}, 400, "input_ids must be a list"),
        ("POST", "/am/documents", {"input_ids": ids, "ratio": "0.1"}, 400, "ratio must be in (0, 1]"),
        ("POST", "/am/documents", {"input_ids": ids, "ratio": 1e308}, 400, "ratio must be in (0, 1]"),
        ("POST", "/am/documents", {"input_ids": ids, "budget": 10**30}, 400, "budget must be an int"),
        ("POST", "/am/documents", {"input_ids": ids, "ratio": 0.1, "method": ["AM-OMP"]}, 400, "method must be a string"),
        ("POST", "/am/documents", {"input_ids": ids, "ratio": 0.1, "options": {"scale": 2.0}}, 400, "options.scale"),
        ("POST", "/am/documents", {"input_ids": ids, "ratio": 0.1, "options": {"nnls_iters": 10**8}}, 400, "nnls_iters"),
        ("POST", "/am/documents", {"input_ids": ids, "ratio": 0.1, "options": {"query_chunk": 10**9}}, 400, "query_chunk"),
        ("POST", "/am/documents", {"input_ids": ids, "ratio": 0.1, "method": "PyramidKV",
                                   "options": {"layer": 5, "num_layers": 1}}, 400, "set by the server"),
        ("POST", "/am/documents", {"input_ids": ids, "ratio": 0.1, "self_study_max_new_tokens": 10**6}, 400, "self_study"),
        ("POST", "/am/documents", {"input_ids": ids, "ratio": 0.1, "max_queries_per_head": 10**9}, 400, "max_queries"),
        ("POST", "/am/documents", {"input_ids": other, "ratio": 0.1, "keep_first": len(other)}, 400, "keep_first"),
        ("POST", "/am/documents", {"input_ids": other, "budget": len(other) + 1}, 400, "budget must be in [1, T - keep_first]"),
        ("POST", "/am/documents", {"input_ids": other, "ratio": 0.1, "head_budgets": {"L0H0": 1.0}}, 400,
         "one proportion per (global layer, KV head)"),
        ("POST", "/am/documents", {"text": "x" * 40000 + "y"}, 400, "exactly one of ratio"),
        ("POST", "/am/documents", {"input_ids": ids * 100, "ratio": 0.1}, 413, "limited to"),  # over the body limit
        # 10 MB, far more than the socket buffers: the client still gets the 413, not a reset connection
        ("POST", "/am/documents", {"messages": [{"role": "system", "content": "x" * 10_000_000}]}, 413,
         f"limited to {BODY_LIMIT} bytes (--am-max-body-bytes)"),
        ("POST", "/am/documents", {"input_ids": long, "ratio": 0.1, "max_queries_per_head": 20000}, 503,
         "captured queries would need"),
        ("GET", "/am/nowhere", None, 404, ""),
    ]
    assert len(cases) >= 60
    for method, path, body, status, reason in cases:
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        code, answer = raw_call(server, method, path, data)
        expected = status if isinstance(status, tuple) else (status,)
        assert code in expected and (not reason or reason in json.dumps(answer)), (method, path, body, code, answer)
    assert not list(store_dir.rglob("*evil*")) and not Path("/tmp/evil").exists()
    ok(server, "DELETE", f"/am/documents/{good}")
    clean(server)


def raw_call(server, method, path, data: bytes | None):
    return http_json(method, server + path, data, ADMIN, timeout=60)


NASTY = [None, True, -1, 0, 1, 2**63, -(2**63), 1e308, -1e-308, float("inf"), "", "x" * 5000, "../../etc", [], [[]],
         [1] * 20, {}, {"a": {"b": {"c": []}}}, "AM-OMP", "repeat-prefill", 0.5, [None], {"scale": 1}]
FIELDS = ["text", "input_ids", "ratio", "budget", "method", "query_source", "head_budgets", "max_queries_per_head",
          "self_study_max_new_tokens", "keep_first", "options", "compact_windows"]


def test_random_registration_bodies_never_get_a_5xx_or_leave_anything_behind(server):
    rng = random.Random(0)
    codes = []
    for _ in range(300):
        body = {name: rng.choice(NASTY) for name in rng.sample(FIELDS, rng.randint(1, len(FIELDS)))}
        if rng.random() < 0.3:
            body["options"] = {rng.choice(["nnls_iters", "beta_min", "seed", "pool_kernel", "schedule", "z"]): rng.choice(NASTY)}
        payload = json.dumps(body, allow_nan=True).encode()
        status, answer = raw_call(server, "POST", "/am/documents", payload)
        assert 400 <= status < 500 and isinstance(answer, dict) and answer.get("error"), (body, status, answer)
        codes.append(status)
    assert set(codes) <= {400, 413, 503}
    drop_all(server)
    clean(server)


def test_requests_with_any_custom_params_are_served(server, tokenizer):
    ids, prompts = ids_of(tokenizer, seed=2)
    doc_id = ok(server, "POST", "/am/documents", {"input_ids": ids, "ratio": 0.2})["doc_id"]
    for custom in ([1, 2], "am_doc_id", 7, {"am_doc_id": 5}, {"am_op": "capture"}, {"am_doc_id": ["x"]}):
        status, out = call(server, "POST", "/generate", {"input_ids": prompts[0], "sampling_params": {
            "max_new_tokens": 1, "temperature": 0, "custom_params": custom}})
        assert status in (200, 400), (custom, status, out)  # a named document that is not one: 400, never a crash
    assert http_json("GET", server + "/health")[0] == 200
    ok(server, "DELETE", f"/am/documents/{doc_id}")
    clean(server)


def test_a_constrained_request_holds_its_document_while_its_grammar_compiles(server, tokenizer):
    ids, prompts = ids_of(tokenizer, seed=7)
    doc_id = ok(server, "POST", "/am/documents", {"input_ids": ids, "ratio": 0.2})["doc_id"]
    # A JSON schema that takes xgrammar seconds to compile: the request waits in SGLang's grammar queue.
    fields = {f"field_{i}": {"type": "string", "enum": [f"value_{i}_{j}" for j in range(40)]} for i in range(3000)}
    schema = json.dumps({"type": "object", "properties": fields, "required": sorted(fields)})
    result = {}
    request = {"input_ids": prompts[0], "sampling_params": {"max_new_tokens": 1, "json_schema": schema}}
    thread = threading.Thread(target=lambda: result.update(answer=call(server, "POST", "/generate", request)))
    thread.start()
    time.sleep(0.5)
    assert thread.is_alive()  # still compiling its grammar
    status, body = call(server, "DELETE", f"/am/documents/{doc_id}")
    thread.join()
    assert status == 409 and "in use by 1 request" in body["error"], body
    status, out = result["answer"]
    assert status == 200 and out["meta_info"]["am_document"][0]["doc_id"] == doc_id
    ok(server, "DELETE", f"/am/documents/{doc_id}")  # the request ended: its reference is gone
    clean(server)


# ----- bounded work -----

def slow_registration(server, tokenizer, seed, results, index):
    ids, _ = ids_of(tokenizer, seed=seed, pairs=600)
    results[index] = call(server, "POST", "/am/documents", {"input_ids": ids, **SLOW})


def wait_state(server, doc_id, state, seconds=60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status, doc = call(server, "GET", f"/am/documents/{doc_id}")
        if status == 200 and doc["state"] == state:
            return doc
        time.sleep(0.05)
    raise AssertionError(f"{doc_id} never reached {state}")


def test_a_solve_past_its_deadline_fails_with_the_reason_and_releases_everything(server, tokenizer):
    started = time.monotonic()
    status, body = call(server, "POST", "/am/documents", {"input_ids": ids_of(tokenizer, 3, pairs=600)[0], **SLOW})
    assert status == 503 and f"exceeded the server's {SOLVE_TIMEOUT:g} s limit" in body["error"], body
    assert time.monotonic() - started < SOLVE_TIMEOUT + 30
    clean(server)
    ids, _ = ids_of(tokenizer, seed=4)
    assert ok(server, "POST", "/am/documents", {"input_ids": ids, "ratio": 0.1})["state"] == "ready"
    drop_all(server)


def test_registrations_beyond_the_limit_are_refused_and_a_drop_cancels_one_in_any_state(server, tokenizer):
    results = [None, None]
    threads = [threading.Thread(target=slow_registration, args=(server, tokenizer, 10 + i, results, i)) for i in range(2)]
    for thread in threads:
        thread.start()
    first = document_id(ids_of(tokenizer, 10, pairs=600)[0])
    wait_state(server, first, "solving")
    wait_state(server, document_id(ids_of(tokenizer, 11, pairs=600)[0]), "solving")
    status, body = call(server, "POST", "/am/documents", {"input_ids": ids_of(tokenizer, 12)[0], "ratio": 0.1})
    assert status == 503 and "registrations are in progress" in body["error"], body
    dropped = ok(server, "DELETE", f"/am/documents/{first}")  # cancels its running solve
    assert dropped["cancelled"] == "solving"
    for thread in threads:
        thread.join()
    assert results[0][0] == 409 and "dropped while it was being registered" in results[0][1]["error"], results[0]
    assert results[1][0] == 503 and "exceeded" in results[1][1]["error"], results[1]
    clean(server)
    # A drop while capturing: the capture requests are aborted and the registration answers 409.
    results = [None]
    thread = threading.Thread(target=slow_registration, args=(server, tokenizer, 13, results, 0))
    thread.start()
    doc_id = document_id(ids_of(tokenizer, 13, pairs=600)[0])
    deadline = time.monotonic() + 30
    while call(server, "GET", f"/am/documents/{doc_id}")[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ok(server, "DELETE", f"/am/documents/{doc_id}")["dropped"] is True
    thread.join()
    assert results[0][0] == 409, results[0]
    clean(server)


def test_one_scheduler_call_waits_at_most_the_rpc_timeout_and_a_late_answer_is_not_mistaken(server, faults):
    faults.write_text("rpc_slow")
    started = time.monotonic()
    status, body = call(server, "GET", "/am/stats")
    assert status == 504 and "did not answer stats" in body["error"] and time.monotonic() - started < RPC_TIMEOUT + 2
    faults.write_text("")
    time.sleep(4)  # the slow answer arrives meanwhile; the next call must not take it for its own
    listed = ok(server, "GET", "/am/documents")
    assert set(listed) == {"documents"}
    clean(server)


# ----- the store -----

def stored_file(store_dir, doc_id) -> Path:
    (path,) = store_dir.glob(f"*/{doc_id}.safetensors")
    return path


def test_the_store_refuses_symlinks_corrupt_and_foreign_files_and_keeps_its_quota(server, tokenizer, store_dir, tmp_path):
    ids, prompts = ids_of(tokenizer, seed=20)
    doc_id = ok(server, "POST", "/am/documents", {"input_ids": ids, "ratio": 0.1})["doc_id"]
    saved = ok(server, "POST", f"/am/documents/{doc_id}/save")
    path = stored_file(store_dir, doc_id)
    assert saved["bytes"] == path.stat().st_size and str(store_dir) not in json.dumps(ok(server, "GET", "/am/stats"))
    listed = ok(server, "GET", "/am/store")
    assert [d["doc_id"] for d in listed["documents"]] == [doc_id] and listed["quota_bytes"] == QUOTA
    good = CompactedPrefix.load(path)
    ok(server, "DELETE", f"/am/documents/{doc_id}")

    def planted(name: str, prefix: CompactedPrefix | None = None, data: bytes | None = None) -> str:
        """A file for document ``name``'s id in the store, as another writer (or an attacker) could leave."""
        planted_id = document_id(prefix.token_ids) if prefix is not None else name
        target = path.parent / f"{planted_id}.safetensors"
        target.write_bytes(data if data is not None else prefix.to_bytes())
        return planted_id

    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(path.read_bytes())
    link_id = "cd" * 32
    (path.parent / f"{link_id}.safetensors").symlink_to(outside)
    other_tokens = [t + 1 for t in good.token_ids]
    nan_beta = [b.clone() for b in good.beta]
    nan_beta[0][0, 0] = float("nan")
    cases = {
        link_id: (400, "not a regular file"),
        planted("ef" * 32, data=path.read_bytes()[:-100]): (400, "corrupt or truncated"),
        planted("", CompactedPrefix(good.keys, [v[..., :16] for v in good.values], good.beta, good.logical_length,
                                    other_tokens, good.fingerprint, good.method)): (400, "does not fit this model's KV pool"),
        planted("", CompactedPrefix(good.keys, good.values, good.beta, good.logical_length, other_tokens[:-1] + [7],
                                    {**good.fingerprint, "weights_sha256": "0" * 64}, good.method)): (400, "fingerprint"),
        planted("12" * 32, prefix=None, data=CompactedPrefix(good.keys, good.values, good.beta, good.logical_length,
                                                             other_tokens[:-1] + [8], good.fingerprint,
                                                             good.method).to_bytes()): (400, "another document's tokens"),
    }
    with torch.no_grad():  # NaN cannot be written by to_bytes: patch the bytes of a valid file's beta instead
        stored = good.beta[0].clone()
        stored[0, 0] = 1.5
        variant = CompactedPrefix(good.keys, good.values, [stored, *good.beta[1:]], good.logical_length,
                                  other_tokens[:-1] + [9], good.fingerprint, good.method)
        data = bytearray(variant.to_bytes())
        marker = torch.tensor([1.5], dtype=torch.float32).numpy().tobytes()
        data[data.index(marker) : data.index(marker) + 4] = torch.tensor([float("nan")]).numpy().tobytes()
        cases[planted(document_id(variant.token_ids), data=bytes(data))] = (400, "")
    for planted_id, (status, reason) in cases.items():
        code, body = call(server, "POST", f"/am/documents/{planted_id}/load")
        assert code == status and reason in body["error"], (planted_id, code, body)
        assert str(store_dir) not in body["error"]
    assert outside.read_bytes() == path.read_bytes()  # never written through the link
    ok(server, "DELETE", f"/am/store/{link_id}")
    assert outside.exists() and not (path.parent / f"{link_id}.safetensors").exists()
    for planted_id in cases:
        call(server, "DELETE", f"/am/store/{planted_id}")
    clean(server)

    # The quota: a second document does not fit beside the first.
    second_ids, _ = ids_of(tokenizer, seed=21)
    second = ok(server, "POST", "/am/documents", {"input_ids": second_ids, "ratio": 0.1})["doc_id"]
    status, body = call(server, "POST", f"/am/documents/{second}/save")
    assert status == 507 and "quota" in body["error"], body
    assert ok(server, "GET", "/am/stats")["counters"]["store_failures"] >= 1
    ok(server, "DELETE", f"/am/store/{doc_id}")
    ok(server, "POST", f"/am/documents/{second}/save")
    drop_all(server)
    ok(server, "DELETE", f"/am/store/{second}")
    clean(server)


# ----- injected faults -----

@pytest.mark.parametrize("fault, status, reason", [
    ("solve", 500, "injected solver failure"),
    ("solver_exit", 500, "the solve was stopped: SystemExit('injected solver thread exit')"),
    ("capture", 503, "injected capture failure"),
])
def test_a_fault_during_registration_releases_everything(server, tokenizer, faults, fault, status, reason):
    drop_all(server)
    ids, prompts = ids_of(tokenizer, seed=30)
    faults.write_text(fault)
    try:
        code, body = call(server, "POST", "/am/documents", {"input_ids": ids, "ratio": 0.1})
    finally:
        faults.write_text("")
    assert code == status and reason in body["error"], (code, body)
    stats = clean(server)
    assert stats["documents"] == {"ready": 0, "observing": 0, "registering": 0, "auto": 0}
    registered = ok(server, "POST", "/am/documents", {"input_ids": ids, "ratio": 0.1})  # the solver thread lives on
    assert registered["state"] == "ready"
    status, out = call(server, "POST", "/generate", {"input_ids": prompts[0], "sampling_params": {"max_new_tokens": 1}})
    assert status == 200 and out["meta_info"]["am_document"][0]["doc_id"] == registered["doc_id"]
    drop_all(server)
    clean(server)


def test_a_failing_upkeep_step_after_batches_is_counted_and_serving_goes_on(server, tokenizer, faults):
    _, prompts = ids_of(tokenizer, seed=32)
    before = ok(server, "GET", "/am/stats")["counters"].get("background_failures", 0)
    faults.write_text("upkeep")
    try:
        outputs = [call(server, "POST", "/generate", {"input_ids": prompt, "sampling_params": {"max_new_tokens": 2}})
                   for prompt in prompts[:2]]
    finally:
        faults.write_text("")
    assert [status for status, _ in outputs] == [200, 200]
    assert ok(server, "GET", "/am/stats")["counters"]["background_failures"] > before
    clean(server)


def test_disk_full_mid_save_keeps_the_previous_copy_and_a_slow_save_does_not_block_serving(server, tokenizer, faults,
                                                                                            store_dir):
    ids, prompts = ids_of(tokenizer, seed=31)
    doc_id = ok(server, "POST", "/am/documents", {"input_ids": ids, "ratio": 0.1})["doc_id"]
    ok(server, "POST", f"/am/documents/{doc_id}/save")
    before = stored_file(store_dir, doc_id).read_bytes()
    faults.write_text("store_write")
    status, body = call(server, "POST", f"/am/documents/{doc_id}/save")
    faults.write_text("")
    assert status == 507 and "disk full" in body["error"], body
    assert stored_file(store_dir, doc_id).read_bytes() == before
    assert not [p for p in store_dir.rglob("*") if p.name.startswith(".tmp-")]

    faults.write_text("store_slow")  # a save that takes 3 s runs beside the scheduler, not on it
    saving = threading.Thread(target=call, args=(server, "POST", f"/am/documents/{doc_id}/save"))
    saving.start()
    time.sleep(0.5)
    started = time.monotonic()
    status, _ = call(server, "POST", "/generate", {"input_ids": prompts[0], "sampling_params": {"max_new_tokens": 1}})
    served = time.monotonic() - started
    faults.write_text("")
    saving.join()
    assert status == 200 and served < 2.0, served
    ok(server, "DELETE", f"/am/store/{doc_id}")
    drop_all(server)
    clean(server)


# ----- stopping and crashing mid-solve -----

def start(flags, env):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "sglang_am.serve", "--host", "127.0.0.1", "--port", str(port),
                                *flags], env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while not healthy(url):
        assert process.poll() is None and time.monotonic() < deadline, "server did not start"
        time.sleep(0.25)
    return process, url


def test_sigterm_mid_solve_stops_within_10_s_and_a_kill_mid_solve_leaves_the_store_intact(tokenizer, tmp_path):
    # With automatic compaction's poller, whose scheduler calls must not hold up the stop.
    flags = ["--max-total-tokens", "8192", "--dtype", "float32", "--admin-api-key", ADMIN,
             "--am-store-dir", str(tmp_path / "store"), "--am-auto", "--am-auto-poll-seconds", "0.2"]
    ids, prompts = ids_of(tokenizer, seed=40)
    slow_ids, _ = ids_of(tokenizer, seed=41, pairs=600)
    for stop in (signal.SIGTERM, signal.SIGKILL):
        process, url = start(flags, STRICT_CHECKS)
        try:
            if stop == signal.SIGTERM:
                saved_id = ok(url, "POST", "/am/documents", {"input_ids": ids, "ratio": 0.1})["doc_id"]
                ok(url, "POST", f"/am/documents/{saved_id}/save")
            else:  # the restarted server loads what the first one saved, without compacting again
                assert ok(url, "POST", f"/am/documents/{saved_id}/load")["state"] == "ready"
            threading.Thread(target=call, args=(url, "POST", "/am/documents", {"input_ids": slow_ids, **SLOW}),
                             daemon=True).start()
            wait_state(url, document_id(slow_ids), "solving")
            started = time.monotonic()
            os.killpg(process.pid, stop)
            process.wait(timeout=30)
            assert time.monotonic() - started < 10, f"{stop.name} took {time.monotonic() - started:.1f} s"
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    process, url = start(flags, STRICT_CHECKS)
    try:
        assert ok(url, "POST", f"/am/documents/{saved_id}/load")["state"] == "ready"
        status, out = call(url, "POST", "/generate", {"input_ids": prompts[0], "sampling_params": {"max_new_tokens": 1}})
        assert status == 200 and out["meta_info"]["am_document"][0]["doc_id"] == saved_id
        clean(url)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
