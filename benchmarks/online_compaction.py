"""Online re-compaction on the embedded recall model: one long sequence under a bounded physical cache.

The sequence is a recall document followed by --questions questions, each answered in turn, run token
by token after the document's prefill (teacher-forced, like a long generation whose answers are known).
The full cache is compared with online compaction (method.md §13: when the cache reaches --max-cache
slots, everything but the last --keep-recent tokens is compacted to --ratio, earlier compacted slots
included) by each --methods. Per configuration: answer accuracy (greedy argmax at each answer), the
compactions, the largest physical cache, and seconds.

    python benchmarks/online_compaction.py          # about a minute on 2 CPU cores

Writes benchmarks/results/online_compaction.{json,png}.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import RESULTS_DIR, environment, finish
from matplotlib.figure import Figure

from sglang_am.hf.online import OnlineCompaction, OnlineSession
from sglang_am.recall_model import load_recall_model, recall_task


def run(model, tokenizer, doc, policy: OnlineCompaction) -> dict:
    session = OnlineSession(model, policy)
    start = time.perf_counter()
    session.forward(tokenizer.encode(doc.text))
    lengths, correct = [session.physical_length], []
    for q in doc.questions:
        for token in tokenizer.encode("\n" + q.question, add_special_tokens=False):
            logits = session.forward([token])
            lengths.append(session.physical_length)
        correct.append(tokenizer.decode([int(logits[-1].argmax())]).strip() == q.answer)
        for token in tokenizer.encode(" " + q.answer, add_special_tokens=False):
            session.forward([token])
            lengths.append(session.physical_length)
    return {"accuracy": sum(correct) / len(correct), "correct": correct, "compactions": session.compactions,
            "max_physical_cache": max(lengths), "logical_length": session.position,
            "seconds": round(time.perf_counter() - start, 3), "physical_cache_by_step": lengths}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--pairs", type=int, default=200, help="key-value pairs in the document (2 tokens each)")
    parser.add_argument("--questions", type=int, default=60)
    parser.add_argument("--max-cache", type=int, default=320, help="physical slots that trigger a compaction")
    parser.add_argument("--keep-recent", type=int, default=20)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--methods", nargs="+", default=["AM-HighestAttnKeys", "H2O+", "random"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(RESULTS_DIR / "online_compaction.json"))
    args = parser.parse_args()

    model, tokenizer = load_recall_model(dtype=torch.float32)
    (doc,) = recall_task(num_pairs=args.pairs, num_questions=args.questions, seed=args.seed)
    rows = []
    for name, policy in [("full cache", OnlineCompaction(max_cache=10**9)), *(
        (method, OnlineCompaction(max_cache=args.max_cache, keep_recent=args.keep_recent, ratio=args.ratio, method=method))
        for method in args.methods
    )]:
        row = {"config": name, **run(model, tokenizer, doc, policy)}
        print(f"{name}: accuracy {row['accuracy']:.2f}, {row['compactions']} compactions, "
              f"physical cache <= {row['max_physical_cache']} of {row['logical_length']} tokens, {row['seconds']} s", flush=True)
        rows.append(row)
    payload = {**environment(), "inputs": {**vars(args), "document_tokens": len(tokenizer.encode(doc.text))}, "rows": rows}
    finish(payload, Path(args.output), plot)


def plot(payload: dict) -> Figure:
    rows = payload["rows"]
    fig = Figure(figsize=(12, 4))
    left, right = fig.subplots(1, 2)
    left.bar([row["config"] for row in rows], [row["accuracy"] for row in rows], color="tab:blue")
    left.set_ylabel("answer accuracy")
    for row in rows:
        right.plot(row["physical_cache_by_step"], label=row["config"])
    right.set_xlabel("tokens run after the document's prefill")
    right.set_ylabel("physical cache slots")
    right.legend(fontsize=8)
    inputs = payload["inputs"]
    fig.suptitle(f"Online re-compaction: {inputs['document_tokens']}-token document + {inputs['questions']} questions, "
                 f"compact to {inputs['ratio']} at {inputs['max_cache']} slots, last {inputs['keep_recent']} kept")
    return fig


if __name__ == "__main__":
    main()
