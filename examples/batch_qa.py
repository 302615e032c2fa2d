"""Batch QA over shared documents: full-prefix vs compacted serving through the OpenAI-compatible API.

With no arguments it starts the extension's server on the embedded recall model (CPU here), makes
--documents recall documents with --questions questions each, asks them all concurrently through
/v1/completions with the full documents as ordinary (radix-cached) prefixes, then registers every
document at --ratio with the batch's questions (question-aware: the node is fitted to the queries of the
questions that will follow it), asks again, drops them, registers them again without the questions,
asks again, and prints side by side each phase's accuracy, its answers' agreement with the full prefix's
(token by token: what a user sees) and its throughput (--no-questions: the last only). A question-aware
node is fitted to each question and to the first --max-tokens tokens of its answer, which the server
generates with the full prefix. `--model gemma3-270m` serves the pretrained Gemma-3-270M on the real-text
workload instead (natural sentences, facts with same-type distractors), `--model smollm2-135m` the chat
model SmolLM2-135M-Instruct on the same documents as chat (system message, then the question; registered
as ``messages`` with text ``questions``, asked through /v1/chat/completions); on both, multiple-choice
accuracy by answer likelihood is reported too. --url uses a running server instead (started with the extension, e.g.
`python -m sglang_am.serve --model gemma3-270m`); --model-path starts one on another model (GPU or CPU).
"""

from __future__ import annotations

import argparse
import json

from tqdm.auto import tqdm
from transformers import AutoTokenizer

from sglang_am.batch_qa import WORKLOADS, ask_all, choice_accuracy, document_questions, documents_and_questions, summarize
from sglang_am.client import DocumentsClient
from sglang_am.serve import MODELS, model_path, serving


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--url", help="a running server with the extension (default: start one)")
    parser.add_argument("--model", choices=MODELS, default="recall", help="a model served by name")
    parser.add_argument("--model-path", help="another model (a transformers directory) instead of --model")
    parser.add_argument("--workload", choices=WORKLOADS, help="default: recall for the recall model, chat for "
                        "smollm2-135m, real-text otherwise")
    parser.add_argument("--api-key", help="the server's --api-key, if it has one")
    parser.add_argument("--documents", type=int, default=4, help="number of shared documents")
    parser.add_argument("--questions", type=int, default=16, help="questions per document")
    parser.add_argument("--size", type=int, help="key-value pairs per recall document (default 300, 2 tokens each) "
                        "or sentences per real-text document (default 140, about 2k Gemma tokens)")
    parser.add_argument("--ratio", type=float, default=0.1, help="compaction ratio t/T")
    parser.add_argument("--method", default="AM-HighestAttnKeys", help="compaction method (see the README's Methods)")
    parser.add_argument("--query-source", default="repeat-prefill", help="reference queries for the solver without "
                        "questions (with them, the questions' own queries)")
    parser.add_argument("--no-questions", action="store_true", help="register without the batch's questions only")
    parser.add_argument("--compact-windows", action="store_true", help="compact sliding-window layers' windows too "
                        "(Gemma: a document takes t slots per layer instead of max(t, 511); torch_native only)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    parser.add_argument("--max-tokens", type=int, default=4, help="tokens generated per answer")
    parser.add_argument("--seed", type=int, default=0, help="seed of the documents")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return parser.parse_args()


def run(url: str, args: argparse.Namespace) -> dict:
    client = DocumentsClient(url, api_key=args.api_key)
    tokenizer = AutoTokenizer.from_pretrained(args.model_path or model_path(args.model))
    named = None if args.model_path else {"recall": "recall", "smollm2-135m": "chat"}.get(args.model)
    workload = args.workload or named or "real-text"
    documents, document_ids, questions = documents_and_questions(tokenizer, args.documents, args.questions, workload,
                                                                 args.size, args.seed)
    scored = workload != "recall"  # the recall model answers its questions only by completion
    reference = None  # the full prefix's answers

    def ask(phase: str) -> dict:
        nonlocal reference
        answers, wall = ask_all(url, questions, args.concurrency, args.max_tokens, args.api_key,
                                None if args.json else phase)
        row = summarize(questions, answers, wall, reference)
        reference = reference or answers
        if scored:
            row["choice_accuracy"] = choice_accuracy(url, questions, api_key=args.api_key,
                                                     progress=None if args.json else f"{phase}: choices")
        return row

    def document(i: int) -> dict:
        if workload == "chat":  # the system message the questions start with
            return {"messages": next(q.messages[:-1] for q in questions if q.document == i)}
        return {"input_ids": document_ids[i]}

    def compacted(name: str, asked: list | None) -> dict:
        def fitted_to(i: int) -> dict:
            if asked is None:
                return {"query_source": args.query_source}
            return {"questions": asked[i], "answer_tokens": args.max_tokens}  # as many answer tokens as are asked for

        registered = [client.register(**document(i), ratio=args.ratio, method=args.method, compact_windows=args.compact_windows,
                                      **fitted_to(i))
                      for i in tqdm(range(len(document_ids)), desc=f"registering ({name})", disable=args.json)]
        try:
            row = ask(f"{name} @ {args.ratio}")
            served = [client.get(doc["doc_id"])["requests_served"] for doc in registered]
        finally:
            for doc in registered:
                if not doc["existing"]:  # leave documents someone else registered
                    client.drop(doc["doc_id"])
        return {**row, "kv_slots_per_document": [doc["t"] for doc in registered],
                "kv_bytes_per_document": [doc["kv_bytes"] for doc in registered], "requests_served_compacted": sum(served),
                "registration_timings": [doc["timings"] for doc in registered],
                "fidelity": [doc["fidelity"] for doc in registered]}

    # Each document's first prefill, untimed: the compacted phases find theirs made by the registration.
    ask_all(url, [next(q for q in questions if q.document == i) for i in range(len(document_ids))], args.concurrency, 1,
            args.api_key, None)
    full = ask("full prefix")
    result = {"workload": workload,
              "full_prefix": {**full, "kv_slots_per_document": [len(ids) for ids in document_ids]}}
    if not args.no_questions:
        asked = ([[q.question for q in questions if q.document == i] for i in range(len(document_ids))]
                 if workload == "chat" else document_questions(document_ids, questions))
        result["question_aware"] = compacted("with questions", asked)
    result["compacted"] = compacted("without questions", None)
    return {**result, "arguments": vars(args)}


def print_table(result: dict) -> None:
    ratio = result["arguments"]["ratio"]
    rows = [("full prefix", result["full_prefix"])]
    if "question_aware" in result:
        rows.append((f"questions @ {ratio}", result["question_aware"]))
    rows.append((f"compacted @ {ratio}", result["compacted"]))
    print(f"\n{'serving':<18}{'KV slots/doc':>13}{'answers':>9}{'agree':>7}{'choices':>9}{'req/s':>8}{'tok/s':>8}"
          f"{'TTFT p50':>10}{'lat p50':>9}{'lat p99':>9}")
    for name, row in rows:
        slots = sum(row["kv_slots_per_document"]) / len(row["kv_slots_per_document"])
        choices = f"{row['choice_accuracy']:.2f}" if "choice_accuracy" in row else "-"
        agreed = f"{row['agreement']:.2f}" if "agreement" in row else "1"
        print(f"{name:<18}{slots:>13.0f}{row['accuracy']:>9.2f}{agreed:>7}{choices:>9}{row['request_throughput']:>8.2f}"
              f"{row['output_tokens_per_second']:>8.1f}{row['ttft_p50']:>9.3f}s{row['latency_p50']:>8.3f}s{row['latency_p99']:>8.3f}s")
    for name, row in rows[1:]:
        print(f"{name}: {row['requests_served_compacted']} of {row['requests']} requests served from compacted documents, "
              f"{row['errors']} errors")
    print("questions @: registered with the batch's questions; compacted @: without them (repeat-prefill queries); "
          "agree: the share of answer tokens equal to the full prefix's")


def main() -> None:
    args = parse_args()
    if args.url:
        result = run(args.url.rstrip("/"), args)
    else:
        flags = ["--model-path", args.model_path] if args.model_path else ["--model", args.model]
        if not args.json:
            print("starting the server (python -m sglang_am.serve) ...", flush=True)
        with serving(flags) as url:
            result = run(url, args)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)


if __name__ == "__main__":
    main()
