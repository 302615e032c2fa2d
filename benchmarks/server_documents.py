"""Compacted documents served end to end by SGLang: KV slots, answer accuracy and compaction time.

Launches the extension's server (embedded recall model, float32 on CPU), answers every question with
the full document as an ordinary prefix (a ``cache_salt`` keeps those requests off the compacted
node), then for each method and ratio registers the document, answers again from the compacted node and
drops it. Reports slots used, exact-match accuracy against the gold answers and agreement with the
full-prefix answers, and the registration time split by stage. Methods get the query source the paper
pairs with them; the recall model cannot answer free-form prompts, so self-study becomes repeat-prefill.

    python benchmarks/server_documents.py [--ratios 0.05 0.1] [--methods AM-HighestAttnKeys SnapKV]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import RESULTS_DIR, environment, finish
from matplotlib.figure import Figure
from transformers import AutoTokenizer

from sglang_am.client import DocumentsClient
from sglang_am.core import get_method
from sglang_am.recall_model import default_model_path, recall_task
from sglang_am.serve import serving


def answer(client: DocumentsClient, prompts: list[list[int]], **extra) -> tuple[list[str], list[dict]]:
    outputs = client.generate(input_ids=prompts, sampling_params={"max_new_tokens": 1, "temperature": 0}, **extra)
    return [out["text"].strip() for out in outputs], [out["meta_info"] for out in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.05, 0.1, 0.25, 0.5])
    parser.add_argument("--methods", nargs="+",
                        default=["AM-HighestAttnKeys", "AM-OMP-fast", "AM-OMP", "H2O+", "SnapKV", "KVzip"])
    parser.add_argument("--pairs", type=int, default=500, help="key-value pairs in the document")
    parser.add_argument("--questions", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(RESULTS_DIR / "server_documents.json"))
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    (document,) = recall_task(num_pairs=args.pairs, num_questions=args.questions, seed=args.seed)
    ids = tokenizer.encode(document.text)
    prompts = [tokenizer.encode(f"{document.text}\n{q.question}") for q in document.questions]
    gold = [q.answer for q in document.questions]
    rows = []
    with serving(["--max-total-tokens", "16384", "--dtype", "float32"]) as url:
        client = DocumentsClient(url)
        full, _ = answer(client, prompts, cache_salt="full-prefix")
        full_accuracy = sum(a == g for a, g in zip(full, gold)) / len(gold)
        print(f"full prefix: T={len(ids)} accuracy {full_accuracy:.2f}", flush=True)
        for method in args.methods:
            source = get_method(method).query_source
            source = "context-prefill" if source == "context-prefill" else "repeat-prefill"
            for ratio in args.ratios:
                start = time.perf_counter()
                registered = client.register(input_ids=ids, ratio=ratio, method=method, query_source=source)
                wall = time.perf_counter() - start
                served, meta = answer(client, prompts)
                assert all(m["am_document"][0]["doc_id"] == registered["doc_id"] for m in meta)
                client.drop(registered["doc_id"])
                row = {
                    "method": method, "ratio": ratio, "query_source": source,
                    "T": registered["T"], "slots": registered["slots"], "wasted_slots": registered["wasted_slots"],
                    "accuracy": sum(a == g for a, g in zip(served, gold)) / len(gold),
                    "agreement_with_full_prefix": sum(a == f for a, f in zip(served, full)) / len(full),
                    "registration_wall_seconds": round(wall, 4),
                    "timings": registered["timings"],
                }
                rows.append(row)
                print(f"{method} ratio {ratio}: {row['slots']} slots, accuracy {row['accuracy']:.2f}, "
                      f"agreement {row['agreement_with_full_prefix']:.2f}, registration {wall:.2f} s", flush=True)
    payload = {
        **environment(),
        "inputs": {**vars(args), "document_tokens": len(ids), "model": "embedded recall model (float32)"},
        "full_prefix": {"T": len(ids), "accuracy": full_accuracy},
        "rows": rows,
    }
    finish(payload, Path(args.output), plot)


def plot(payload: dict) -> Figure:
    """Accuracy and registration time against the KV slots each document holds, one line per method."""
    fig = Figure(figsize=(11, 4.2))
    left, right = fig.subplots(1, 2)
    for method in dict.fromkeys(row["method"] for row in payload["rows"]):
        rows = [row for row in payload["rows"] if row["method"] == method]
        slots = [row["slots"] for row in rows]
        left.plot(slots, [row["accuracy"] for row in rows], marker="o", label=method)
        right.plot(slots, [row["registration_wall_seconds"] for row in rows], marker="o", label=method)
    full = payload["full_prefix"]
    left.axhline(full["accuracy"], color="black", linestyle="--", label=f"full prefix ({full['T']} slots)")
    left.set(xlabel="KV slots held by the document", ylabel="exact-match accuracy", xscale="log", ylim=(0, 1.05))
    right.set(xlabel="KV slots held by the document", ylabel="registration seconds (capture + solve)",
              xscale="log", yscale="log")
    left.legend(fontsize=7)
    fig.suptitle(f"Compacted documents served by SGLang: recall model, T = {full['T']}, CPU")
    return fig


if __name__ == "__main__":
    main()
