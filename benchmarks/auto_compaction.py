"""How automatic compaction's trigger threshold trades speed for answers, on a skewed batch-QA workload.

Popularity is skewed like real traffic: of --documents recall documents, a few get most questions and
many are asked once or twice (question counts follow 1/rank, at least one each), all interleaved at
random and sent at --concurrency through streaming /v1/completions, into a --max-total-tokens pool
that cannot hold every document. One extension server per configuration: automatic compaction off
(the radix cache holds full documents), then on with each --min-requests (N) at --ratio. Per
configuration: throughput, TTFT and latency percentiles, accuracy, and from /am/stats the automatic
compactions, their seconds, the requests served compacted and the fallbacks.

    python benchmarks/auto_compaction.py          # the run behind the defaults, ~10 minutes on 2 CPU cores

Writes benchmarks/results/auto_compaction.{json,png}.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from common import RESULTS_DIR, environment, finish
from matplotlib.figure import Figure
from transformers import AutoTokenizer

from sglang_am.batch_qa import QARequest, ask_all, summarize
from sglang_am.client import http_json
from sglang_am.recall_model import default_model_path, recall_task
from sglang_am.serve import serving


def workload(args) -> list[QARequest]:
    counts = [max(1, round(args.top_questions / (rank + 1))) for rank in range(args.documents)]
    documents = [recall_task(num_pairs=args.pairs, num_questions=n, seed=500 + i)[0] for i, n in enumerate(counts)]
    tokenizer = AutoTokenizer.from_pretrained(args.model_path)
    questions = [QARequest(d, tokenizer.encode(f"{doc.text}\n{q.question}"), q.answer)
                 for d, doc in enumerate(documents) for q in doc.questions]
    random.Random(args.seed).shuffle(questions)
    return questions


def run_configuration(name: str, flags: list[str], questions: list[QARequest], args) -> dict:
    with serving(["--model-path", args.model_path, "--max-total-tokens", str(args.max_total_tokens), *flags]) as url:
        answers, wall = ask_all(url, questions, args.concurrency, args.max_tokens, progress=name)
        status, stats = http_json("GET", f"{url}/am/stats")
    counters = stats["counters"]
    row = {"config": name, **summarize(questions, answers, wall),
           "auto_compactions": counters["compactions"].get("auto", 0),
           "compaction_seconds": round(counters["compaction_seconds"], 3),
           "requests_served_compacted": counters["hits"], "fallbacks": counters["fallbacks"],
           "auto_triggers": counters["auto_triggers"], "compaction_failures": counters["compaction_failures"],
           "auto_evictions": counters["auto_evictions"]}
    print(f"{name}: {row['request_throughput']:.2f} req/s, accuracy {row['accuracy']:.2f}, "
          f"{row['auto_compactions']} compactions, {row['requests_served_compacted']} served compacted", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model-path", default=str(default_model_path()))
    parser.add_argument("--max-total-tokens", type=int, default=4096)
    parser.add_argument("--documents", type=int, default=16)
    parser.add_argument("--top-questions", type=int, default=96, help="questions on the most popular document")
    parser.add_argument("--pairs", type=int, default=300, help="key-value pairs per document (2 tokens each)")
    parser.add_argument("--min-requests", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(RESULTS_DIR / "auto_compaction.json"))
    args = parser.parse_args()

    questions = workload(args)
    rows = [run_configuration("off", [], questions, args)]
    for n in args.min_requests:
        flags = ["--am-auto", "--am-auto-min-requests", str(n), "--am-auto-ratio", str(args.ratio)]
        rows.append({**run_configuration(f"N = {n}", flags, questions, args), "min_requests": n})
    payload = {**environment(), "inputs": {**vars(args), "requests": len(questions)}, "rows": rows}
    finish(payload, Path(args.output), plot)


def plot(payload: dict) -> Figure:
    rows = payload["rows"]
    names = [row["config"] for row in rows]
    fig = Figure(figsize=(13, 4))
    axes = fig.subplots(1, 3)
    for axis, key, label in [(axes[0], "request_throughput", "requests / s"), (axes[1], "accuracy", "accuracy"),
                             (axes[2], "auto_compactions", "automatic compactions")]:
        axis.bar(names, [row[key] for row in rows], color="tab:blue")
        axis.set_ylabel(label)
        axis.set_xlabel("automatic compaction (N = requests that trigger it)")
    inputs = payload["inputs"]
    fig.suptitle(f"Skewed batch QA: {inputs['documents']} documents, {inputs['requests']} questions, "
                 f"pool {inputs['max_total_tokens']} slots, ratio {inputs['ratio']}")
    return fig


if __name__ == "__main__":
    main()
