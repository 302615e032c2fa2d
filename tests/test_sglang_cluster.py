"""Two sglang-am servers behind sglang-router (``sglang_am.cluster``, the embedded recall model on loopback):
a document registered once is served compacted by both; one worker killed under load, the router keeps
serving from the other; restarted, it loads the shared store and rejoins, without a document dropped
while it was down."""

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from sglang_am.batch_qa import complete
from sglang_am.client import ClusterDocuments, DocumentsClient, http_json
from sglang_am.cluster import cluster
from sglang_am.recall_model import recall_task

pytestmark = pytest.mark.slow
GREEDY = {"max_new_tokens": 1, "temperature": 0}


@pytest.fixture(scope="module")
def running():
    # --am-auto for documents that learn; with a reuse threshold no test reaches, nothing is compacted automatically.
    flags = ["--max-total-tokens", "8192", "--dtype", "float32", "--am-auto", "--am-auto-min-requests", "100000"]
    with cluster(workers=2, policy="manual", flags=flags) as running:
        yield running


def document(tokenizer, seed):
    (doc,) = recall_task(num_pairs=200, num_questions=6, seed=seed)
    return tokenizer.encode(doc.text), [tokenizer.encode(f"{doc.text}\n{q.question}") for q in doc.questions]


def served_compacted(url: str, prompts, doc_id: str) -> bool:
    status, body = http_json("POST", f"{url}/generate", {"input_ids": prompts, "sampling_params": GREEDY})
    assert status == 200, body
    return all(out["meta_info"].get("am_document", [{}])[0].get("doc_id") == doc_id for out in body)


def test_registered_once_served_by_both_workers_through_the_router(running, tokenizer):
    documents = ClusterDocuments(running.url, running.admin_key)
    assert sorted(documents.workers()) == sorted(running.worker_urls)
    ids, prompts = document(tokenizer, seed=21)
    registered = documents.register(input_ids=ids, ratio=0.1)
    assert set(registered["workers"].values()) == {"ready"}
    counters = [DocumentsClient(url, running.admin_key).stats()["counters"] for url in running.worker_urls]
    assert sorted(sum(c["compactions"].values()) for c in counters) == [0, 1]  # compacted once
    assert sorted(sum(c["loads"].values()) for c in counters) == [0, 1]  # loaded from the store by the other
    for url in running.worker_urls:
        assert served_compacted(url, prompts, registered["doc_id"])
    route = documents.route(registered["doc_id"])
    answers = [complete(running.url, prompt, 1, headers=route, api="native") for prompt in prompts]
    assert all(answer.error is None for answer in answers)
    documents.drop(registered["doc_id"])


def test_a_learned_document_is_registered_on_every_worker_each_learning_from_the_requests_it_serves(running, tokenizer):
    documents = ClusterDocuments(running.url, running.admin_key)
    ids, prompts = document(tokenizer, seed=24)
    registered = documents.register(input_ids=ids, learn=True, questions=[prompts[0][len(ids):]])
    assert registered["workers"] == dict.fromkeys(running.worker_urls, "observing"), registered
    for url in running.worker_urls:  # its question was asked on each worker as a client's request
        observed = DocumentsClient(url, running.admin_key).get(registered["doc_id"])["observe"]
        assert observed["requests_tagged"] == 1, observed
    assert documents.drop(registered["doc_id"])["dropped"] == dict.fromkeys(running.worker_urls, True)


def test_a_killed_worker_fails_only_its_requests_and_rejoins_without_dropped_documents(running, tokenizer):
    documents = ClusterDocuments(running.url, running.admin_key)
    kept_ids, kept_prompts = document(tokenizer, seed=22)
    dropped_ids, _ = document(tokenizer, seed=23)
    kept = documents.register(input_ids=kept_ids, ratio=0.1)
    dropped = documents.register(input_ids=dropped_ids, ratio=0.1)
    load = kept_prompts * 8

    with ThreadPoolExecutor(4) as pool:  # requests spread over the workers, round robin by routing key
        futures = [pool.submit(complete, running.url, prompt, 4, headers={"x-smg-routing-key": f"user-{i}"}, api="native")
                   for i, prompt in enumerate(load)]
        time.sleep(1.0)
        running.kill_worker(1)
        answers = [future.result() for future in futures]
    failed = sum(answer.error is not None for answer in answers)
    assert failed < len(load) // 2, [a.error for a in answers if a.error]  # at most the killed worker's share

    deadline = time.monotonic() + 30  # the router stops routing to it after its health checks fail
    while len(documents.workers()) != 1 and time.monotonic() < deadline:
        time.sleep(1)
    assert documents.workers() == [running.worker_urls[0]]
    after = [complete(running.url, prompt, 1, headers={"x-smg-routing-key": f"user-{i}"}, api="native")
             for i, prompt in enumerate(kept_prompts)]
    assert all(answer.error is None for answer in after), [a.error for a in after]

    documents.drop(dropped["doc_id"])  # while worker 1 is down
    start = time.monotonic()
    running.start_worker(1)
    rejoined = time.monotonic() - start
    deadline = time.monotonic() + 30
    while len(documents.workers()) != 2 and time.monotonic() < deadline:
        time.sleep(1)
    assert sorted(documents.workers()) == sorted(running.worker_urls)
    restarted = DocumentsClient(running.worker_urls[1], running.admin_key)
    assert [doc["doc_id"] for doc in restarted.list()] == [kept["doc_id"]]  # reloaded, and not the dropped one
    assert served_compacted(running.worker_urls[1], kept_prompts, kept["doc_id"])
    print(f"failed during the kill: {failed} of {len(load)}; restart to serving: {rejoined:.1f} s")
    documents.drop(kept["doc_id"])
