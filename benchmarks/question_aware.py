"""Question-aware documents through the server: accuracy against full context, and whether the fidelity
guard predicts it.

One server with the extension (Gemma-3-270M in float32 by default; ``--model recall`` for the embedded
model). The full-context reference is the server's plain path. Then, at every --ratios, each document is
registered three ways, its questions asked, and the documents dropped:

- ``without questions``: repeat-prefill reference queries (the query-agnostic default);
- ``with questions``: every question of the batch given at registration (``"questions"``);
- ``half given``: the even-numbered questions given; the others are scored apart as ``not given``, against
  the same questions under ``without questions``.

With --auto, each document is also registered at ``"ratio": "auto"`` (the default bound) with its
questions. Each question is scored by answer likelihood (multiple choice, real text) and by a greedy short
answer. Every registration's fidelity guard (the relative attention error, and the next-token KL where
questions were given) is recorded per document, so the JSON and plot show how well it predicts accuracy.

    python benchmarks/question_aware.py                                   # Gemma, 3 documents x 10 questions
    python benchmarks/question_aware.py --questions 50 --documents 2 --ratios 0.1 0.05
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import RESULTS_DIR, environment, finish
from matplotlib.figure import Figure
from transformers import AutoTokenizer

from sglang_am.batch_qa import ask_all, choice_logprobs, document_questions, documents_and_questions
from sglang_am.client import DocumentsClient
from sglang_am.serve import MODELS, model_path, serving


def score(url: str, questions, args) -> list[dict]:
    """Per question: the greedy short answer judged, and (real text) the likelihood pick judged."""
    answers, _ = ask_all(url, questions, args.concurrency, args.max_tokens)
    rows = []
    for question, answer in zip(questions, answers):
        row = {"answer_correct": question.is_correct(answer.text), "error": answer.error}
        if question.choices:
            logprobs = choice_logprobs(url, question)
            row["choice_correct"] = max(range(len(logprobs)), key=logprobs.__getitem__) == question.answer_index
        rows.append(row)
    return rows


def accuracy(rows: list[dict], key: str) -> float | None:
    values = [row[key] for row in rows if key in row]
    return round(sum(values) / len(values), 4) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="gemma3-270m")
    parser.add_argument("--documents", type=int, default=3)
    parser.add_argument("--questions", type=int, default=10, help="questions per document (up to 50 on real text)")
    parser.add_argument("--size", type=int, help="sentences per real-text document (default 140) or recall pairs (300)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.05])
    parser.add_argument("--auto", action="store_true", help='also register at "ratio": "auto" with the questions')
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=6, help="tokens generated per short answer")
    parser.add_argument("--max-total-tokens", type=int, default=32768)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    args.output = args.output or RESULTS_DIR / f"question_aware_{args.model}_{args.questions}q.json"

    path = model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    workload = "recall" if args.model == "recall" else "real-text"
    documents, document_ids, questions = documents_and_questions(tokenizer, args.documents, args.questions, workload,
                                                                 args.size, args.seed)
    asked = document_questions(document_ids, questions)
    # Questions are interleaved across documents: the j-th question of every document comes in the j-th round.
    given = [q for i, q in enumerate(questions) if (i // args.documents) % 2 == 0]
    not_given = [q for i, q in enumerate(questions) if (i // args.documents) % 2 == 1]
    rows = []
    flags = ["--model-path", str(path), "--max-total-tokens", str(args.max_total_tokens)]
    flags += ["--dtype", "float32"] if args.model != "recall" else []
    with serving(flags) as url:
        client = DocumentsClient(url)

        def run(name: str, ratio: float | str | None, registration, scored: dict) -> dict:
            start = time.perf_counter()
            registered = [client.register(input_ids=ids, ratio=ratio, **registration(i)) for i, ids in enumerate(document_ids)]
            seconds = time.perf_counter() - start
            try:
                results = {part: score(url, subset, args) for part, subset in scored.items()}
            finally:
                for doc in registered:
                    client.drop(doc["doc_id"])
            row = {"config": name, "ratio": ratio, "registration_seconds": round(seconds, 2),
                   "slots": [doc["t"] for doc in registered], "fidelity": [doc["fidelity"] for doc in registered],
                   "timings": [doc["timings"] for doc in registered]}
            for part, outcome in results.items():
                row[part] = part_summary(outcome, scored[part], args.documents, questions)
            rows.append(row)
            print(f"{name} @ {ratio}: " + ", ".join(f"{part} choices {row[part]['choice_accuracy']} answers "
                                                     f"{row[part]['answer_accuracy']}" for part in results)
                  + f" ({seconds:.0f} s to register)", flush=True)
            return row

        full = score(url, questions, args)
        rows.append({"config": "full context", "ratio": None, "all": part_summary(full, questions, args.documents, questions)})
        print(f"full context: choices {rows[-1]['all']['choice_accuracy']} answers {rows[-1]['all']['answer_accuracy']}",
              flush=True)
        for ratio in args.ratios:
            run("without questions", ratio, lambda i: {}, {"all": questions, "not_given": not_given})
            run("with questions", ratio, lambda i: {"questions": asked[i]}, {"all": questions})
            run("half given", ratio, lambda i: {"questions": asked[i][::2]}, {"given": given, "not_given": not_given})
        if args.auto:
            run("auto ratio, with questions", "auto", lambda i: {"questions": asked[i]}, {"all": questions})
    payload = {**environment(), "inputs": {**vars(args), "output": str(args.output), "workload": workload,
                                           "document_tokens": [len(ids) for ids in document_ids]}, "rows": rows}
    finish(payload, args.output, plot)


def part_summary(outcome: list[dict], subset, documents: int, questions) -> dict:
    """Accuracy over the questions scored, per document (the fidelity guard is per document), and each
    question's outcome with its document and its index in ``questions``."""
    per_document = []
    for d in range(documents):
        mine = [row for row, question in zip(outcome, subset) if question.document == d]
        per_document.append({"choice_accuracy": accuracy(mine, "choice_correct"),
                             "answer_accuracy": accuracy(mine, "answer_correct")})
    return {"choice_accuracy": accuracy(outcome, "choice_correct"), "answer_accuracy": accuracy(outcome, "answer_correct"),
            "questions": len(outcome), "per_document": per_document,
            "outcomes": [{"document": q.document, "question": questions.index(q), **row} for row, q in zip(outcome, subset)]}


def plot(payload: dict) -> Figure:
    rows = payload["rows"]
    full = rows[0]["all"]
    key = "choice_accuracy" if full["choice_accuracy"] is not None else "answer_accuracy"
    fig = Figure(figsize=(16, 4.4))
    axes = fig.subplots(1, 3)
    axes[0].axhline(full[key], color="black", linestyle="--", label="full context")
    for name, part in (("without questions", "all"), ("with questions", "all"), ("half given", "given"),
                       ("half given", "not_given"), ("without questions", "not_given")):
        points = sorted((row["ratio"], row[part][key]) for row in rows if row["config"] == name and part in row)
        label = f"{name}: {part.replace('_', ' ')}"
        axes[0].plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("ratio t/T")
    axes[0].set_ylabel(key.replace("_", " "))
    axes[0].set_title("accuracy")
    axes[0].legend(fontsize=7)
    reference = {o["question"]: o for o in rows[0]["all"]["outcomes"]}

    def full_on(outcomes: list[dict], document: int) -> float:
        """Full context's accuracy on the same questions of one document."""
        mine = [reference[o["question"]] for o in outcomes if o["document"] == document]
        return sum(o[key.replace("_accuracy", "_correct")] for o in mine) / len(mine)

    for axis, figure, label in ((axes[1], "relative_l2", "guard: relative attention error"),
                                (axes[2], "next_token_kl", "next-token KL at the answer positions")):
        for name, marker in (("without questions", "o"), ("with questions", "s"), ("half given", "^"),
                             ("auto ratio, with questions", "*")):
            part = "given" if name == "half given" else "all"
            points = [(fidelity.get(figure), document[key] - full_on(row[part]["outcomes"], d))
                      for row in rows if row["config"] == name
                      for d, (fidelity, document) in enumerate(zip(row["fidelity"], row[part]["per_document"]))
                      if fidelity and fidelity.get(figure) is not None]
            if points:
                axis.scatter([p[0] for p in points], [p[1] for p in points], marker=marker, label=name, alpha=0.7)
        axis.set_xscale("symlog", linthresh=1e-3)  # the recall model's KL is often exactly 0
        axis.set_xlabel(label)
        axis.set_ylabel(f"{key.replace('_', ' ')} minus full context's (per document)")
        axis.axhline(0, color="black", linestyle="--", linewidth=0.8)
        axis.legend(fontsize=7)
    axes[1].set_title("does the guard predict accuracy?")
    inputs = payload["inputs"]
    fig.suptitle(f"{inputs['model']} served, {inputs['workload']}: {inputs['documents']} documents × {inputs['questions']} "
                 f"questions, ~{sum(inputs['document_tokens']) // len(inputs['document_tokens'])} tokens each")
    return fig


if __name__ == "__main__":
    main()
