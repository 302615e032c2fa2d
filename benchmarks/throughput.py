"""Throughput of batch QA over shared documents, at one KV pool size, with and without compaction.

Drives live servers over HTTP (streaming /v1/completions, like SGLang's serving benchmark) with the
same workload: --documents recall documents, --questions each, interleaved across documents, at
--concurrency, after one untimed warm-up request per document. Configurations, all with --max-total-tokens slots
and the torch_native backend:
(a) SGLang with the radix cache disabled, (b) stock SGLang (its own radix cache holds full documents),
(c) the extension with every document registered at each --ratios. Per configuration: request
throughput, output tokens/s, TTFT and latency p50/p99, accuracy, KV slots per document and how many
documents are still resident (a probe per document after the run: is its whole prefix a cache hit?).
--capacity N then loads N documents into (b) and into (c) at the smallest ratio and counts the
resident ones, to show how many documents the pool holds.

    python benchmarks/throughput.py              # defaults run in a few minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import RESULTS_DIR, environment, write_json
from transformers import AutoTokenizer

from sglang_am.batch_qa import ask_all, documents_and_questions, summarize
from sglang_am.client import DocumentsClient, http_json
from sglang_am.recall_model import default_model_path, recall_task
from sglang_am.serve import serving


def stock_server(model_path: str, pool: int, extra: list[str]):
    """SGLang itself, without the plugin."""
    flags = ["--model-path", model_path, "--max-total-tokens", str(pool), "--attention-backend", "torch_native", *extra]
    return serving(flags, stock=True)


def extension_server(model_path: str, pool: int):
    return serving(["--model-path", model_path, "--max-total-tokens", str(pool)])


def resident(url: str, prompts: list[str], slots_per_document: list[int]) -> int:
    """Documents whose whole prefix is still cached: one 1-token probe each (cached_tokens >= slots).
    Probes go from the most recently used document back, so a miss's prefill, which evicts the least
    recently used prefix, cannot evict a document not yet probed that was resident."""
    count = 0
    for prompt, slots in reversed(list(zip(prompts, slots_per_document))):
        greedy = {"max_new_tokens": 1, "temperature": 0}
        status, body = http_json("POST", f"{url}/generate", {"text": prompt, "sampling_params": greedy})
        count += status == 200 and body["meta_info"]["cached_tokens"] >= slots
    return count


def workload_row(name: str, url: str, questions, probes, slots, args) -> dict:
    for prompt in probes:  # warm up: each document seen once, as registration does for compacted ones
        http_json("POST", f"{url}/generate", {"text": prompt, "sampling_params": {"max_new_tokens": 1}})
    answers, wall = ask_all(url, questions, args.concurrency, args.max_tokens, progress=name)
    row = {"config": name, **summarize(questions, answers, wall), "kv_slots_per_document": sum(slots) / len(slots)}
    row["resident_documents"] = resident(url, probes, slots) if name != "no radix cache" else 0
    print(f"{name}: {row['request_throughput']:.2f} req/s, accuracy {row['accuracy']:.2f}, "
          f"resident {row['resident_documents']}/{len(probes)}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model-path", default=str(default_model_path()))
    parser.add_argument("--max-total-tokens", type=int, default=4096, help="KV pool slots, the same for every configuration")
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--questions", type=int, default=8, help="questions per document")
    parser.add_argument("--pairs", type=int, default=300, help="key-value pairs per document (2 tokens each)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--method", default="AM-HighestAttnKeys")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=4, help="tokens generated per answer")
    parser.add_argument("--capacity", type=int, default=128, help="documents loaded in the capacity mode (0: skip it)")
    parser.add_argument("--output", default=str(RESULTS_DIR / "throughput.json"))
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    documents, questions = documents_and_questions(args.documents, args.questions, args.pairs)
    probes = [f"{d.text}\n{d.questions[0].question}" for d in documents]  # in the order of their last use
    lengths = [len(tokenizer.encode(d.text)) for d in documents]
    pool = args.max_total_tokens
    rows = []
    with stock_server(args.model_path, pool, ["--disable-radix-cache"]) as url:
        rows.append(workload_row("no radix cache", url, questions, probes, lengths, args))
    with stock_server(args.model_path, pool, []) as url:
        rows.append(workload_row("radix cache, full documents", url, questions, probes, lengths, args))
    with extension_server(args.model_path, pool) as url:
        client = DocumentsClient(url)
        for ratio in args.ratios:
            start = time.perf_counter()
            registered = [client.register(text=d.text, ratio=ratio, method=args.method) for d in documents]
            seconds = time.perf_counter() - start
            row = workload_row(f"compacted @ {ratio}", url, questions, probes, [d["t"] for d in registered], args)
            rows.append({**row, "ratio": ratio, "registration_seconds": round(seconds, 3)})
            for doc in registered:
                client.drop(doc["doc_id"])
    capacity = measure_capacity(args, tokenizer) if args.capacity else None
    payload = {**environment(), "inputs": {**vars(args), "document_tokens": lengths}, "rows": rows, "capacity": capacity}
    path = write_json(Path(args.output), payload)
    plot(payload, path.with_suffix(".png"))
    print(f"wrote {path}")


def measure_capacity(args, tokenizer) -> dict:
    """Load --capacity documents one request (or one registration) each, then count the resident ones."""
    extra = [recall_task(num_pairs=args.pairs, num_questions=1, seed=1000 + i)[0] for i in range(args.capacity)]
    probes = [f"{d.text}\n{d.questions[0].question}" for d in extra]
    lengths = [len(tokenizer.encode(d.text)) for d in extra]
    result = {"documents": args.capacity, "max_total_tokens": args.max_total_tokens}
    with stock_server(args.model_path, args.max_total_tokens, []) as url:
        for prompt in probes:
            http_json("POST", f"{url}/generate", {"text": prompt, "sampling_params": {"max_new_tokens": 1}})
        result["radix cache, full documents"] = {"kv_slots_per_document": sum(lengths) / len(lengths),
                                                 "resident": resident(url, probes, lengths)}
    ratio = min(args.ratios)
    with extension_server(args.model_path, args.max_total_tokens) as url:
        client = DocumentsClient(url)
        slots, refused = [], 0
        for document in extra:
            status, body = http_json("POST", f"{url}/am/documents",
                                     {"text": document.text, "ratio": ratio, "method": args.method})
            if status == 200:
                slots.append(body["t"])
            else:
                refused += 1
        registered_probes = probes[: len(slots)]
        result[f"compacted @ {ratio}"] = {"kv_slots_per_document": sum(slots) / max(1, len(slots)),
                                          "resident": resident(url, registered_probes, slots), "refused": refused}
        for doc in client.list():
            client.drop(doc["doc_id"])
    print(f"capacity at {args.max_total_tokens} slots: {result}", flush=True)
    return result


def plot(payload: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["rows"]
    names = [row["config"].replace(", ", "\n").replace(" @ ", "\n@ ") for row in rows]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for axis, key, label in [(axes[0], "request_throughput", "requests / s"), (axes[1], "latency_p50", "latency p50 (s)"),
                             (axes[2], "resident_documents",
                              f"resident documents of {len(payload['inputs']['document_tokens'])}")]:
        bars = axis.bar(names, [row[key] or 0 for row in rows], color="tab:blue")
        axis.set_ylabel(label)
        axis.tick_params(axis="x", labelsize=7)
        if key == "request_throughput":
            for bar, row in zip(bars, rows):
                axis.annotate(f"acc {row['accuracy']:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                              ha="center", va="bottom", fontsize=7)
    inputs = payload["inputs"]
    fig.suptitle(f"Batch QA, {len(inputs['document_tokens'])} documents × {inputs['questions']} questions, "
                 f"pool {inputs['max_total_tokens']} slots, concurrency {inputs['concurrency']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
