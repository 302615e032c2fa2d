"""Batch QA on one server against two: SGLang's --dp-size 2, and two servers behind sglang-router.

The same workload everywhere (recall documents, questions interleaved across documents, streamed through
SGLang's native /generate at --concurrency, after one untimed warm-up request per document), each server or
rank with --max-total-tokens KV slots. Configurations:
- one server, stock SGLang (its radix cache holds full documents) and with every document compacted at --ratio;
- one server with --dp-size 2, compacted (registered once: one rank compacts, the other installs its copy);
- two workers behind the router for each --policies (manual: the routing header is the document id;
  cache_aware: the router matches the text it has routed), stock and compacted (``ClusterDocuments``:
  compacted on one worker, loaded from the shared store by the other).
Per configuration: requests/s, TTFT p50/p99, the hit rate (requests whose document was cached on the worker
that served them: a compacted document, or a stock prefix hit of the whole document), and the document
copies still resident after the run. For the compacted cluster also: registering once and loading on the
other worker against compacting on each worker, and whether the two give the same log-probs.

    python benchmarks/scale_out.py        # about 15 minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from common import RESULTS_DIR, environment, finish
from matplotlib.figure import Figure
from transformers import AutoTokenizer

from sglang_am.batch_qa import ask_all, documents_and_questions, summarize
from sglang_am.client import ClusterDocuments, DocumentsClient, http_json
from sglang_am.cluster import POLICIES, cluster
from sglang_am.serve import model_path, serving
from sglang_am.server.scheduler.registry import document_id

GREEDY = {"max_new_tokens": 1, "temperature": 0}


def hit(answer, document_tokens: int) -> bool:
    return answer.document is not None or (answer.cached_tokens or 0) >= document_tokens


def run_workload(name: str, url: str, questions, documents, args, route=None) -> dict:
    """Warm up (one request per document), then every question; the row of numbers."""
    for index in range(len(documents)):
        headers = route(index) if route else None
        probe = next(q for q in questions if q.document == index)
        http_json("POST", f"{url}/generate", {"input_ids": probe.prompt, "sampling_params": GREEDY}, headers=headers)
    answers, wall = ask_all(url, questions, args.concurrency, args.max_tokens, progress=name, api="native",
                            route=(lambda q: route(q.document)) if route else None)
    hits = sum(hit(a, len(documents[q.document])) for q, a in zip(questions, answers) if a.error is None)
    row = {"config": name, **summarize(questions, answers, wall), "hit_rate": round(hits / len(questions), 3)}
    print(f"{name}: {row['request_throughput']:.2f} req/s, hit rate {row['hit_rate']:.2f}, TTFT p50 "
          f"{row['ttft_p50']:.3f} s, errors {row['errors']}", flush=True)
    return row


def resident_copies(urls: list[str], questions, documents) -> int:
    """Documents still cached, counted on every server: one probe each, most recently used first."""
    count = 0
    for url in urls:
        for index in reversed(range(len(documents))):
            probe = next(q for q in questions if q.document == index)
            status, body = http_json("POST", f"{url}/generate", {"input_ids": probe.prompt, "sampling_params": GREEDY})
            meta = body["meta_info"] if status == 200 else {}
            count += "am_document" in meta or meta.get("cached_tokens", 0) >= len(documents[index])
    return count


def compare_registrations(running, documents: list[list[int]], prompts: list[list[int]], ratio: float, count: int = 3) -> dict:
    """``count`` documents compacted once and loaded by the other worker, against compacted on each worker at
    once: mean seconds per document, and the largest log-prob difference between the workers on ``prompts``
    (questions on the first document)."""
    cluster_docs = ClusterDocuments(running.url, running.admin_key)
    workers = [DocumentsClient(url, running.admin_key) for url in running.worker_urls]
    count = min(count, len(documents))
    for worker in workers:  # the store and the model fingerprint are set up once per server, not timed
        worker.stored()

    def gap() -> float:
        served = []
        for url in running.worker_urls:
            status, body = http_json("POST", f"{url}/generate", {"input_ids": prompts, "sampling_params": GREEDY,
                                                                  "return_logprob": True})
            assert status == 200, body
            served.append([out["meta_info"]["output_token_logprobs"][0][0] for out in body])
        return max(abs(a - b) for a, b in zip(*served))

    start = time.perf_counter()
    once = [cluster_docs.register(input_ids=ids, ratio=ratio)["doc_id"] for ids in documents[:count]]
    once_seconds = (time.perf_counter() - start) / count
    once_gap = gap()
    for doc_id in once:
        cluster_docs.drop(doc_id)
    start = time.perf_counter()
    with ThreadPoolExecutor(len(workers)) as pool:
        for ids in documents[:count]:
            list(pool.map(lambda worker, ids=ids: worker.register(input_ids=ids, ratio=ratio), workers))
    each_seconds = (time.perf_counter() - start) / count
    each_gap = gap()
    for doc_id in once:
        for worker in workers:
            worker.drop(doc_id)
    result = {"documents": count, "compact_once_and_load_seconds": round(once_seconds, 3),
              "compact_once_max_logprob_gap": once_gap, "compact_on_each_seconds": round(each_seconds, 3),
              "compact_on_each_max_logprob_gap": each_gap}
    print(f"registration, per document: {result}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--max-total-tokens", type=int, default=8192, help="KV pool slots of each server or rank")
    parser.add_argument("--documents", type=int, default=12)
    parser.add_argument("--questions", type=int, default=12, help="questions per document")
    parser.add_argument("--size", type=int, default=600, help="key-value pairs per recall document (~2 tokens each)")
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=["manual", "cache_aware"])
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=4, help="tokens generated per answer")
    parser.add_argument("--no-stock", action="store_true", help="skip the stock SGLang configurations")
    parser.add_argument("--output", default=str(RESULTS_DIR / "scale_out.json"))
    args = parser.parse_args()

    path = str(model_path("recall"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    _, documents, questions = documents_and_questions(tokenizer, args.documents, args.questions, "recall", args.size)
    ids_by_key = [document_id(ids) for ids in documents]
    flags = ["--model-path", path, "--max-total-tokens", str(args.max_total_tokens)]
    rows = []

    def route(index: int) -> dict:
        return ClusterDocuments.route(ids_by_key[index])

    def register_all(client) -> tuple[float, list[dict]]:
        """Every document; the seconds it took and each registration's timings."""
        start = time.perf_counter()
        registered = [client.register(input_ids=ids, ratio=args.ratio) for ids in documents]
        return round(time.perf_counter() - start, 3), [doc["timings"] for doc in registered]

    if not args.no_stock:
        with serving(flags, stock=True) as url:
            row = run_workload("1 server, stock", url, questions, documents, args)
            rows.append({**row, "resident_copies": resident_copies([url], questions, documents)})
    with serving(flags) as url:
        seconds, _ = register_all(DocumentsClient(url))
        row = run_workload(f"1 server, compacted @ {args.ratio}", url, questions, documents, args)
        rows.append({**row, "registration_seconds": seconds, "resident_copies": resident_copies([url], questions, documents)})
    with serving([*flags, "--dp-size", "2"]) as url:
        seconds, timings = register_all(DocumentsClient(url))
        handoffs = [t["handoff_seconds"] for t in timings]
        row = run_workload(f"1 server --dp-size 2, compacted @ {args.ratio}", url, questions, documents, args)
        rows.append({**row, "registration_seconds": seconds, "handoff_seconds_mean": sum(handoffs) / len(handoffs),
                     "resident_copies": resident_copies([url], questions, documents)})
    comparison = None
    for policy in args.policies:
        if not args.no_stock:
            with cluster(2, policy, flags, stock=True) as running:
                row = run_workload(f"2 workers ({policy}), stock", running.url, questions, documents, args, route)
                rows.append({**row, "resident_copies": resident_copies(running.worker_urls, questions, documents)})
        with cluster(2, policy, flags) as running:
            if comparison is None:
                prompts = [q.prompt for q in questions if q.document == 0]
                comparison = compare_registrations(running, documents, prompts, args.ratio)
            seconds, _ = register_all(ClusterDocuments(running.url, running.admin_key))
            row = run_workload(f"2 workers ({policy}), compacted @ {args.ratio}", running.url, questions, documents,
                               args, route)
            rows.append({**row, "registration_seconds": seconds,
                         "resident_copies": resident_copies(running.worker_urls, questions, documents)})
    payload = {**environment(), "inputs": {**vars(args), "document_tokens": [len(ids) for ids in documents]},
               "rows": rows, "registration_comparison": comparison}
    finish(payload, Path(args.output), plot)


def plot(payload: dict) -> Figure:
    rows = payload["rows"]
    names = [row["config"].replace(", ", "\n") for row in rows]
    fig = Figure(figsize=(15, 4.5))
    axes = fig.subplots(1, 3)
    for axis, key, label in [(axes[0], "request_throughput", "requests / s"), (axes[1], "ttft_p50", "TTFT p50 (s)"),
                             (axes[2], "hit_rate", "hit rate")]:
        axis.bar(names, [row[key] or 0 for row in rows], color=["tab:gray" if "stock" in n else "tab:blue" for n in names])
        axis.set_ylabel(label)
        axis.tick_params(axis="x", labelsize=6, rotation=90)
    inputs = payload["inputs"]
    fig.suptitle(f"{inputs['documents']} documents × {inputs['questions']} questions, {inputs['max_total_tokens']} slots "
                 f"per server or rank, concurrency {inputs['concurrency']} (grey: stock SGLang)")
    return fig


if __name__ == "__main__":
    main()
