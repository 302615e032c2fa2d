"""Throughput of batch QA over shared documents, at one KV pool size, with and without compaction.

Drives live servers over HTTP (streaming /v1/completions, like SGLang's serving benchmark) with the
same workload: --documents documents, --questions each, interleaved across documents, at
--concurrency, after one untimed warm-up request per document. --model recall (the default, fast)
uses the recall documents; --model gemma3-270m the real-text documents (natural sentences whose facts
have same-type distractors), scored by greedy short answer (--choices: by answer likelihood too), and every
configuration's answers by their agreement with the full prefix's (the baseline's, (c) below), token by token.
Configurations, all with --max-total-tokens slots and the torch_native backend:
(a) SGLang with the radix cache disabled and (b) stock SGLang (its own radix cache holds full documents),
both references only: stock torch_native pads every extend's queries to the whole prefix, a cost no GPU
backend has; (c) the baseline: the extension's server with no document (its radix cache holds full
documents, the same attention path as every compacted row, and the answers every row is compared with);
(d) the control: every document registered at ratio 1.0 (t = T, nothing compacted; those that do not fit
the pool pinned are refused and served by the radix cache), against which any gain is credited to compaction;
(e) the extension with every document registered at each --ratios with the batch's questions
(question-aware: fitted to the queries of the questions that follow it; --question-shares mixes
repeat-prefill in; --no-questions skips it), and
(f) registered without them (repeat-prefill queries) (--compact-windows: sliding-window layers' windows
compacted too, so a Gemma document is t slots wide, not max(t, 511)). Per configuration: request
throughput, output tokens/s, TTFT and latency p50/p99, accuracy, KV slots and bytes per document, how
many documents are still resident (a probe per document after the run: is its whole prefix a cache hit?),
and for registrations what they cost: seconds and the tokens their capture requests prefilled.
--capacity N then loads N documents into (b) and into the extension at --capacity-ratio and counts the resident
ones, to show how many documents the pool holds.

    python benchmarks/throughput.py              # defaults run in a few minutes on a 2-core CPU
    python benchmarks/throughput.py --model gemma3-270m --documents 6 --questions 8 --max-total-tokens 8192
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import RESULTS_DIR, environment, finish, register_or_refused
from matplotlib.figure import Figure
from transformers import AutoTokenizer

from sglang_am.batch_qa import ask_all, choice_accuracy, document_questions, documents_and_questions, summarize
from sglang_am.client import DocumentsClient, http_json
from sglang_am.serve import MODELS, model_path, serving

BASELINE = "extension, no document"
CONTROL = "registered, nothing compacted"


def stock_server(path: str, pool: int, dtype: str, extra: list[str]):
    """SGLang itself, without the plugin."""
    flags = ["--model-path", path, "--max-total-tokens", str(pool), "--attention-backend", "torch_native",
             "--dtype", dtype, *extra]
    return serving(flags, stock=True)


def extension_server(path: str, pool: int, dtype: str):
    return serving(["--model-path", path, "--max-total-tokens", str(pool), "--dtype", dtype])


def resident(url: str, probes: list[list[int]], slots_per_document: list[int]) -> int:
    """Documents whose whole prefix is still cached: one 1-token probe each (cached_tokens >= slots).
    Probes go from the most recently used document back, so a miss's prefill, which evicts the least
    recently used prefix, cannot evict a document not yet probed that was resident."""
    count = 0
    for probe, slots in reversed(list(zip(probes, slots_per_document))):
        greedy = {"max_new_tokens": 1, "temperature": 0}
        status, body = http_json("POST", f"{url}/generate", {"input_ids": probe, "sampling_params": greedy})
        count += status == 200 and body["meta_info"]["cached_tokens"] >= slots
    return count


def capture_tokens(ids, fields: dict, registered: dict) -> int:
    """What a registration's capture computed: the document, again for repeat-prefill, then the questions and
    their answers (generated, then teacher-forced: twice)."""
    repeated = "repeat-prefill" in fields.get("query_source", {}) or "questions" not in fields
    answers = (registered["fidelity"] or {}).get("answer_tokens", 0)
    return len(ids) * (2 if repeated else 1) + sum(map(len, fields.get("questions", []))) + 2 * answers


def question_variant(asked, share: float, answer_tokens: int):
    """A question-aware registration's name and fields, fitted to the questions and ``answer_tokens`` of each answer
    at ``share`` (the rest repeat-prefill)."""
    if share == 1:
        return "with questions", lambda i: {"questions": asked[i], "answer_tokens": answer_tokens}
    mixture = {"questions": share, "repeat-prefill": round(1 - share, 6)}
    return f"with questions {share:g} + repeat-prefill", lambda i: {"questions": asked[i], "query_source": mixture,
                                                                    "answer_tokens": answer_tokens}


def workload_row(name: str, url: str, questions, probes, slots, args, scored: bool, reference=None) -> tuple[dict, list]:
    """The configuration's figures (with the full prefix's answers as ``reference``, their agreement) and its answers."""
    for probe in probes:  # warm up: each document seen once, as registration does for compacted ones
        http_json("POST", f"{url}/generate", {"input_ids": probe, "sampling_params": {"max_new_tokens": 1}})
    answers, wall = ask_all(url, questions, args.concurrency, args.max_tokens, progress=name)
    row = {"config": name, **summarize(questions, answers, wall, reference), "kv_slots_per_document": sum(slots) / len(slots)}
    if scored:
        row["choice_accuracy"] = choice_accuracy(url, questions, progress=f"{name}: choices")
    row["resident_documents"] = resident(url, probes, slots) if name != "no radix cache" else 0
    print(f"{name}: {row['request_throughput']:.2f} req/s, accuracy {row['accuracy']:.2f}"
          + (f", agreement {row['agreement']:.2f}" if "agreement" in row else "")
          + (f", choices {row['choice_accuracy']:.2f}" if scored else "")
          + f", resident {row['resident_documents']}/{len(probes)}", flush=True)
    return row, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="recall", help="a model served by name")
    parser.add_argument("--max-total-tokens", type=int, default=4096, help="KV pool slots, the same for every configuration")
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--questions", type=int, default=8, help="questions per document")
    parser.add_argument("--size", type=int, help="key-value pairs per recall document (default 300) or sentences per "
                        "real-text document (default 140, about 2k Gemma tokens)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    parser.add_argument("--method", default="AM-HighestAttnKeys")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=4, help="tokens generated per answer")
    parser.add_argument("--capacity", type=int, default=128, help="documents loaded in the capacity mode (0: skip it)")
    parser.add_argument("--capacity-ratio", type=float, help="the compacted documents' ratio there (default: the "
                        "smallest --ratios)")
    parser.add_argument("--compact-windows", action="store_true", help="compact sliding-window layers' windows too")
    parser.add_argument("--no-questions", action="store_true", help="skip the question-aware registrations")
    parser.add_argument("--question-shares", type=float, nargs="+", default=[1.0], help="the questions' share of "
                        "each question-aware fit, the rest repeat-prefill (1: questions alone, the server's default)")
    parser.add_argument("--dtype", help="server dtype (default: auto for the recall model, float32 for Gemma: this "
                        "CPU has no fast bfloat16)")
    parser.add_argument("--choices", action="store_true", help="real-text: score multiple choice by likelihood too "
                        "(slow where SGLang's CPU attention prefills whole documents)")
    parser.add_argument("--output", default=str(RESULTS_DIR / "throughput.json"))
    args = parser.parse_args()
    if not all(0 < share <= 1 for share in args.question_shares):
        parser.error(f"--question-shares must be in (0, 1], got {args.question_shares}")

    path = str(model_path(args.model))
    args.dtype = args.dtype or ("auto" if args.model == "recall" else "float32")
    tokenizer = AutoTokenizer.from_pretrained(path)
    workload = "recall" if args.model == "recall" else "real-text"
    scored = workload == "real-text" and args.choices
    documents, document_ids, questions = documents_and_questions(tokenizer, args.documents, args.questions, workload,
                                                                 args.size)
    probes = [q.prompt for q in questions[: len(documents)]]  # one question per document, in the order of use
    lengths = [len(ids) for ids in document_ids]
    pool = args.max_total_tokens
    rows = []
    with stock_server(path, pool, args.dtype, ["--disable-radix-cache"]) as url:
        rows.append(workload_row("no radix cache", url, questions, probes, lengths, args, scored)[0])
    with stock_server(path, pool, args.dtype, []) as url:
        rows.append(workload_row("stock SGLang, radix cache", url, questions, probes, lengths, args, scored)[0])
    asked = document_questions(document_ids, questions)
    # The node is fitted to as many answer tokens as the questions are asked for.
    variants = [] if args.no_questions else [question_variant(asked, share, args.max_tokens) for share in args.question_shares]
    variants.append(("compacted", lambda i: {}))
    with extension_server(path, pool, args.dtype) as url:
        row, reference = workload_row(BASELINE, url, questions, probes, lengths, args, scored)
        rows.append(row)
        client = DocumentsClient(url)
        for ratio, (name, fields) in [(1.0, (CONTROL, lambda i: {})), *((r, v) for r in args.ratios for v in variants)]:
            start = time.perf_counter()
            registered, refused = [], 0
            for i, ids in enumerate(document_ids):
                doc = register_or_refused(client, ratio, input_ids=ids, method=args.method,
                                          compact_windows=args.compact_windows, **fields(i))
                if doc is None:
                    refused += 1
                else:
                    registered.append((ids, i, doc))
            seconds = time.perf_counter() - start
            captured = sum(capture_tokens(ids, fields(i), doc) for ids, i, doc in registered)
            slots = [len(ids) for ids in document_ids]  # per document, in the probes' order
            for _, i, doc in registered:
                slots[i] = doc["slots"]
            row, _ = workload_row(f"{name} @ {ratio}", url, questions, probes, slots, args, scored, reference)
            rows.append({**row, "ratio": ratio, "registration_seconds": round(seconds, 3), "capture_tokens": captured,
                         "kv_bytes_per_document": registered[0][2]["kv_bytes"] if registered else None,
                         "refused_registrations": refused})
            for _, _, doc in registered:
                client.drop(doc["doc_id"])
    capacity = measure_capacity(args, tokenizer, path, workload) if args.capacity else None
    payload = {**environment(), "inputs": {**vars(args), "workload": workload, "document_tokens": lengths},
               "rows": rows, "capacity": capacity}
    finish(payload, Path(args.output), plot)


def measure_capacity(args, tokenizer, path: str, workload: str) -> dict:
    """Load --capacity documents one request (or one registration) each, then count the resident ones."""
    _, document_ids, questions = documents_and_questions(tokenizer, args.capacity, 1, workload, args.size, seed=1000)
    probes = [q.prompt for q in questions]
    lengths = [len(ids) for ids in document_ids]
    result = {"documents": args.capacity, "max_total_tokens": args.max_total_tokens}
    with stock_server(path, args.max_total_tokens, args.dtype, []) as url:
        for probe in probes:
            http_json("POST", f"{url}/generate", {"input_ids": probe, "sampling_params": {"max_new_tokens": 1}})
        result["radix cache, full documents"] = {"kv_slots_per_document": sum(lengths) / len(lengths),
                                                 "resident": resident(url, probes, lengths)}
    ratio = args.capacity_ratio or min(args.ratios)
    with extension_server(path, args.max_total_tokens, args.dtype) as url:
        client = DocumentsClient(url)
        slots, refused = [], 0
        for ids in document_ids:
            status, body = http_json("POST", f"{url}/am/documents", {"input_ids": ids, "ratio": ratio, "method": args.method,
                                                                     "compact_windows": args.compact_windows})
            if status == 200:
                slots.append(body["slots"])
            else:
                refused += 1
        registered_probes = probes[: len(slots)]
        result[f"compacted @ {ratio}"] = {"kv_slots_per_document": sum(slots) / max(1, len(slots)),
                                          "resident": resident(url, registered_probes, slots), "refused": refused}
        for doc in client.list():
            client.drop(doc["doc_id"])
    print(f"capacity at {args.max_total_tokens} slots: {result}", flush=True)
    return result


def plot(payload: dict) -> Figure:
    rows = payload["rows"]
    names = [row["config"].replace(", ", "\n").replace(" @ ", "\n@ ") for row in rows]
    fig = Figure(figsize=(14, 4.2))
    axes = fig.subplots(1, 3)
    for axis, key, label in [(axes[0], "request_throughput", "requests / s"), (axes[1], "ttft_p50", "TTFT p50 (s)"),
                             (axes[2], "resident_documents",
                              f"resident documents of {len(payload['inputs']['document_tokens'])}")]:
        bars = axis.bar(names, [row[key] or 0 for row in rows], color="tab:blue")
        axis.set_ylabel(label)
        axis.tick_params(axis="x", labelsize=7)
        if key == "request_throughput":
            for bar, row in zip(bars, rows):
                agreed = f"\nagree {row['agreement']:.2f}" if "agreement" in row else ""
                axis.annotate(f"acc {row['accuracy']:.2f}{agreed}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                              ha="center", va="bottom", fontsize=7)
    inputs = payload["inputs"]
    fig.suptitle(f"Batch QA, {len(inputs['document_tokens'])} documents × {inputs['questions']} questions, "
                 f"pool {inputs['max_total_tokens']} slots, concurrency {inputs['concurrency']}")
    return fig


if __name__ == "__main__":
    main()
