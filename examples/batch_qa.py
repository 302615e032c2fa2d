"""Batch QA over shared documents: full-prefix vs compacted serving through the OpenAI-compatible API.

With no arguments it starts the extension's server on the embedded recall model (CPU here), makes
--documents recall documents with --questions questions each, asks them all concurrently through
/v1/completions with the full documents as ordinary (radix-cached) prefixes, then registers every
document at --ratio, asks again, drops the documents and prints accuracy and throughput side by side.
--url uses a running server instead (started with the extension, e.g. `python -m sglang_am.serve`);
--model-path starts one on another model (GPU or CPU).
"""

from __future__ import annotations

import argparse
import json

from tqdm.auto import tqdm

from sglang_am.batch_qa import ask_all, documents_and_questions, summarize
from sglang_am.client import DocumentsClient
from sglang_am.serve import serving


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--url", help="a running server with the extension (default: start one)")
    parser.add_argument("--model-path", help="model for the server this script starts (default: the embedded recall model)")
    parser.add_argument("--api-key", help="the server's --api-key, if it has one")
    parser.add_argument("--documents", type=int, default=4, help="number of shared documents")
    parser.add_argument("--questions", type=int, default=16, help="questions per document")
    parser.add_argument("--pairs", type=int, default=300, help="key-value pairs per document (2 tokens each)")
    parser.add_argument("--ratio", type=float, default=0.1, help="compaction ratio t/T")
    parser.add_argument("--method", default="AM-HighestAttnKeys", help="compaction method (see the README's Methods)")
    parser.add_argument("--query-source", default="repeat-prefill", help="reference queries for the solver")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    parser.add_argument("--max-tokens", type=int, default=4, help="tokens generated per answer")
    parser.add_argument("--seed", type=int, default=0, help="seed of the documents")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return parser.parse_args()


def run(url: str, args: argparse.Namespace) -> dict:
    client = DocumentsClient(url, api_key=args.api_key)
    documents, questions = documents_and_questions(args.documents, args.questions, args.pairs, args.seed)
    progress = None if args.json else "full prefix"
    answers, wall = ask_all(url, questions, args.concurrency, args.max_tokens, args.api_key, progress)
    full = summarize(questions, answers, wall)
    registered = [client.register(text=d.text, ratio=args.ratio, method=args.method, query_source=args.query_source)
                  for d in tqdm(documents, desc="registering", disable=args.json)]
    try:
        answers, wall = ask_all(url, questions, args.concurrency, args.max_tokens, args.api_key,
                                None if args.json else f"compacted @ {args.ratio}")
        compacted = summarize(questions, answers, wall)
        served = [client.get(doc["doc_id"])["requests_served"] for doc in registered]
    finally:
        for doc in registered:
            if not doc["existing"]:  # leave documents someone else registered
                client.drop(doc["doc_id"])
    return {
        "full_prefix": {**full, "kv_slots_per_document": [doc["T"] for doc in registered]},
        "compacted": {**compacted, "kv_slots_per_document": [doc["t"] for doc in registered],
                      "requests_served_compacted": sum(served),
                      "registration_timings": [doc["timings"] for doc in registered]},
        "arguments": vars(args),
    }


def print_table(result: dict) -> None:
    rows = [("full prefix", result["full_prefix"]), (f"compacted @ {result['arguments']['ratio']}", result["compacted"])]
    print(f"\n{'serving':<18}{'KV slots/doc':>13}{'accuracy':>10}{'req/s':>8}{'tok/s':>8}"
          f"{'TTFT p50':>10}{'lat p50':>9}{'lat p99':>9}")
    for name, row in rows:
        slots = sum(row["kv_slots_per_document"]) / len(row["kv_slots_per_document"])
        print(f"{name:<18}{slots:>13.0f}{row['accuracy']:>10.2f}{row['request_throughput']:>8.2f}"
              f"{row['output_tokens_per_second']:>8.1f}{row['ttft_p50']:>9.3f}s{row['latency_p50']:>8.3f}s{row['latency_p99']:>8.3f}s")
    compacted = result["compacted"]
    print(f"{compacted['requests_served_compacted']} of {compacted['requests']} compacted-phase requests were served "
          f"from compacted documents; errors: {result['full_prefix']['errors']} / {compacted['errors']}")


def main() -> None:
    args = parse_args()
    if args.url:
        result = run(args.url.rstrip("/"), args)
    else:
        flags = ["--model-path", args.model_path] if args.model_path else []
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
