"""Answer quality of compacted documents served by the server: Gemma-3-270M on the real-text workload.

One server with the extension (float32). The full-context reference is the same server's plain path
(each document's prefix cached by SGLang's own radix tree); then, for every --methods entry at every
--ratios, every document is registered, all questions are asked, and the documents are dropped. Each
question is scored twice: multiple choice by answer likelihood (the summed prompt log-probs of each
choice's tokens) and short answer by greedy exact match. Methods use the query source the paper pairs
with them (the server's own self-study generation for the AM methods); ``METHOD:SOURCE`` overrides it,
e.g. ``AM-HighestAttnKeys:repeat-prefill``, and a ``+windows`` suffix compacts the sliding-window layers'
windows too (``compact_windows``), e.g. ``AM-HighestAttnKeys+windows``. Per question the JSON records
where its fact sits in the document (the fraction of the text before it), so failures can be located.
Writes JSON and a plot.

    python benchmarks/served_quality.py               # about 30 min on a 2-core CPU
    python benchmarks/served_quality.py --documents 2 --questions 5 --ratios 0.1 --methods AM-HighestAttnKeys H2O+
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from common import RESULTS_DIR, environment, finish
from matplotlib.figure import Figure
from transformers import AutoTokenizer

from sglang_am.batch_qa import ask_all, choice_logprobs, documents_and_questions
from sglang_am.client import DocumentsClient
from sglang_am.core import get_method
from sglang_am.quality.real_text import NAMES
from sglang_am.serve import MODELS, model_path, serving

METHODS = ["AM-HighestAttnKeys", "AM-OMP-fast", "H2O+", "SnapKV", "KVzip"]
RATIOS = [0.1, 0.05]


def score(url: str, questions, args) -> list[dict]:
    """Per question: the likelihood pick and the greedy answer, both judged."""
    answers, _ = ask_all(url, questions, args.concurrency, args.max_tokens)
    rows = []
    for question, answer in zip(questions, answers):
        logprobs = choice_logprobs(url, question)
        pick = max(range(len(logprobs)), key=logprobs.__getitem__)
        rows.append({"choice_correct": pick == question.answer_index, "answer_correct": question.is_correct(answer.text),
                     "answer": answer.text, "error": answer.error})
    return rows


def fact_position(document, question) -> float:
    """Where the fact a question asks about sits (its person is named once), as a fraction of the text."""
    name = next(name for name in NAMES if re.search(rf"\b{name}\b", question.question))
    return round(re.search(rf"\b{name}\b", document.text).start() / len(document.text), 3)


def summary(name: str, method: str, source: str, ratio: float | None, rows: list[dict], extra: dict) -> dict:
    return {"config": name, "method": method, "query_source": source, "ratio": ratio,
            "choice_accuracy": sum(r["choice_correct"] for r in rows) / len(rows),
            "answer_accuracy": sum(r["answer_correct"] for r in rows) / len(rows),
            "questions": rows, **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=MODELS[1:], default="gemma3-270m")
    parser.add_argument("--documents", type=int, default=5)
    parser.add_argument("--questions", type=int, default=10, help="questions per document")
    parser.add_argument("--size", type=int, default=140, help="sentences per document (about 14 tokens each)")
    parser.add_argument("--methods", nargs="+", default=METHODS, help="METHOD[:QUERY_SOURCE][+windows]")
    parser.add_argument("--ratios", type=float, nargs="+", default=RATIOS)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=6, help="tokens generated per short answer")
    parser.add_argument("--max-total-tokens", type=int, default=32768)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "served_quality.json")
    args = parser.parse_args()

    path = model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    documents, document_ids, questions = documents_and_questions(tokenizer, args.documents, args.questions, "real-text",
                                                                 args.size, args.seed)
    positions = [fact_position(documents[q.document], documents[q.document].questions[i // args.documents])
                 for i, q in enumerate(questions)]
    results = []
    flags = ["--model-path", str(path), "--dtype", "float32", "--max-total-tokens", str(args.max_total_tokens)]
    with serving(flags) as url:
        client = DocumentsClient(url)
        rows = score(url, questions, args)
        results.append(summary("full context", "full", "-", None, rows, {}))
        print(f"full context: choices {results[-1]['choice_accuracy']:.2f}, answers {results[-1]['answer_accuracy']:.2f}",
              flush=True)
        for entry in args.methods:
            spec, windows, _ = entry.partition("+windows")
            method, _, source = spec.partition(":")
            source = source or get_method(method).query_source
            for ratio in args.ratios:
                start = time.perf_counter()
                registered = [client.register(input_ids=ids, ratio=ratio, method=method, compact_windows=bool(windows),
                                              **({"query_source": source} if source != "none" else {}))
                              for ids in document_ids]
                seconds = time.perf_counter() - start
                rows = score(url, questions, args)
                for doc in registered:
                    client.drop(doc["doc_id"])
                results.append(summary(f"{entry} @ {ratio}", method, source, ratio, rows, {
                    "compact_windows": bool(windows), "registration_seconds": round(seconds, 2),
                    "slots": [d["slots"] for d in registered],
                    "timings": [d["timings"] for d in registered]}))
                print(f"{entry} @ {ratio}: choices {results[-1]['choice_accuracy']:.2f}, "
                      f"answers {results[-1]['answer_accuracy']:.2f} ({seconds:.0f} s to register)", flush=True)
    payload = {**environment(), "inputs": {**vars(args), "output": str(args.output),
                                           "document_tokens": [len(ids) for ids in document_ids],
                                           "fact_positions": positions}, "rows": results}
    finish(payload, args.output, plot)


def plot(payload: dict) -> Figure:
    rows = payload["rows"]
    full = rows[0]
    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    for axis, key, label in [(axes[0], "choice_accuracy", "multiple choice (likelihood)"),
                             (axes[1], "answer_accuracy", "short answer (greedy exact match)")]:
        axis.axhline(full[key], color="black", linestyle="--", label="full context")
        for config in dict.fromkeys(row["config"].rsplit(" @ ", 1)[0] for row in rows[1:]):
            points = sorted((row["ratio"], row[key]) for row in rows[1:] if row["config"].rsplit(" @ ", 1)[0] == config)
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=config)
        axis.set_xscale("log")
        axis.set_xlabel("compacted fraction t/T (global layers)")
        axis.set_ylabel("accuracy")
        axis.set_title(label)
        axis.set_ylim(0, 1)
    axes[1].legend(fontsize=7)
    inputs = payload["inputs"]
    fig.suptitle(f"Gemma-3-270M served, real-text QA: {inputs['documents']} documents × {inputs['questions']} questions, "
                 f"~{sum(inputs['document_tokens']) // len(inputs['document_tokens'])} tokens each")
    return fig


if __name__ == "__main__":
    main()
