"""Question-aware documents through the server: what users see against full context, and whether the
fidelity guard predicts it.

One server with the extension (Gemma-3-270M in float32 by default; ``--model smollm2-135m`` for a chat
model, whose documents are system messages and whose questions go through ``/v1/chat/completions`` with
the ``openai`` client; ``--model recall`` for the embedded model). The full-context reference is the
server's plain path. Then, at every --ratios, each document is registered several ways, its questions
asked, and the documents dropped:

- ``without questions``: repeat-prefill reference queries (the query-agnostic default);
- ``with questions``: every question of the batch given at registration, the node fitted to each question
  and its answer (``answer_tokens`` of them, generated with the full prefix), for each --answer-tokens and
  --repeat-share (the share of repeat-prefill mixed in);
- ``half given``: half of the questions given, as many of each relation; the others are scored apart as
  ``not given``: how the node serves questions like those given that it was not fitted to.

With --head-budgets FILE (a head-sensitivity file), ``with questions`` also runs with those nonuniform head
budgets at the same total slots. With --auto, each document is also registered at ``"ratio": "auto"`` with its
questions (a document the guard refuses, 422, is served with its full prefix and recorded as refused). Every question
is scored three ways: the greedy answer's agreement with the full prefix's, token by token (what a user
sees); whether it states the expected value (exact match); and, on real text, multiple choice by answer
likelihood. Every registration's fidelity guard is recorded per document (the attention error; the
agreement and next-token KL of its questions through the node; those of its held-out questions through a
candidate fitted without them), so the JSON and plot show how well the guard predicts what users see.

    python benchmarks/question_aware.py                                   # Gemma, 3 documents x 10 questions
    python benchmarks/question_aware.py --model smollm2-135m --questions 8 --max-tokens 8 --size 60
    python benchmarks/question_aware.py --questions 50 --documents 2 --ratios 0.1 0.05
"""

from __future__ import annotations

import argparse
import json
import time
from http import HTTPStatus
from pathlib import Path

from common import RESULTS_DIR, environment, finish
from matplotlib.figure import Figure
from transformers import AutoTokenizer

from sglang_am.batch_qa import agreement, ask_all, choice_logprobs, document_questions, documents_and_questions
from sglang_am.client import DocumentsClient
from sglang_am.serve import MODELS, model_path, serving
from sglang_am.server.errors import DocumentError
from sglang_am.server.registration import DEFAULT_ANSWER_TOKENS

WORKLOADS = {"recall": "recall", "gemma3-270m": "real-text", "smollm2-135m": "chat"}


def score(url: str, questions, args, reference=None) -> list[dict]:
    """Per question: the greedy answer (its agreement with ``reference``'s, the full prefix's answers), whether it
    is right, and (real text) the likelihood pick judged."""
    answers, _ = ask_all(url, questions, args.concurrency, args.max_tokens)
    rows = []
    for index, (question, answer) in enumerate(zip(questions, answers)):
        row = {"answer_correct": question.is_correct(answer.text), "error": answer.error, "text": answer.text,
               "answer": answer}
        if reference is not None:
            row["agreement"] = agreement(reference[index]["answer"], answer)
        if question.choices and not args.no_choices:
            logprobs = choice_logprobs(url, question)
            row["choice_correct"] = max(range(len(logprobs)), key=logprobs.__getitem__) == question.answer_index
        rows.append(row)
    return rows


def mean(rows: list[dict], key: str) -> float | None:
    values = [row[key] for row in rows if row.get(key) is not None]
    return round(sum(values) / len(values), 4) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="gemma3-270m")
    parser.add_argument("--documents", type=int, default=3)
    parser.add_argument("--questions", type=int, default=10, help="questions per document (up to 50 on real text)")
    parser.add_argument("--size", type=int, help="sentences per real-text document (default 140) or recall pairs (300)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.05])
    parser.add_argument("--answer-tokens", type=int, nargs="+", default=[DEFAULT_ANSWER_TOKENS],
                        help="answer tokens each question's fit includes (one 'with questions' row each)")
    parser.add_argument("--repeat-share", type=float, nargs="+", default=[0.0],
                        help="share of repeat-prefill queries mixed into the questions' (one row each)")
    parser.add_argument("--configs", nargs="+", default=["without", "with", "half"], choices=["without", "with", "half"])
    parser.add_argument("--auto", action="store_true", help='also register at "ratio": "auto" with the questions')
    parser.add_argument("--head-budgets", type=Path, help="a head-sensitivity proportions file (python -m "
                        "sglang_am.hf.head_sensitivity): the with-questions rows are also run with these nonuniform "
                        "head budgets, at the same total slots")
    parser.add_argument("--no-choices", action="store_true", help="skip multiple choice by likelihood")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens generated per answer")
    parser.add_argument("--max-total-tokens", type=int, default=32768)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path)
    parser.add_argument("--replot", type=Path, help="only draw this result file's plot again")
    args = parser.parse_args()
    if args.replot:
        replot(args.replot)
        return
    args.output = args.output or RESULTS_DIR / f"question_aware_{args.model}_{args.questions}q.json"

    head_budgets = json.loads(args.head_budgets.read_text()) if args.head_budgets else None
    path = model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    workload = WORKLOADS[args.model]
    documents, document_ids, questions = documents_and_questions(tokenizer, args.documents, args.questions, workload,
                                                                 args.size, args.seed)
    if workload == "chat":  # registered as the system message, each question as the user turn after it
        asked = [[q.question for q in questions if q.document == d] for d in range(args.documents)]
        document = lambda i: {"messages": leading_messages(questions, i)}  # noqa: E731
    else:
        asked = document_questions(document_ids, questions)
        document = lambda i: {"input_ids": document_ids[i]}  # noqa: E731
    # Questions are interleaved across documents: the j-th question of every document comes in the j-th round.
    # Rounds 0-1, 4-5, ... are given and 2-3, 6-7, ... not: a document's questions go round-robin over its
    # relations, so both halves ask about every relation (every other round would split them by relation).
    half = [(j // 2) % 2 == 0 for j in range(args.questions)]
    given = [q for i, q in enumerate(questions) if half[i // args.documents]]
    not_given = [q for i, q in enumerate(questions) if not half[i // args.documents]]
    rows = []
    flags = ["--model-path", str(path), "--max-total-tokens", str(args.max_total_tokens)]
    flags += ["--dtype", "float32"] if args.model != "recall" else []
    with serving(flags) as url:
        client = DocumentsClient(url)
        full = score(url, questions, args)
        reference = {questions.index(q): row for q, row in zip(questions, full)}
        rows.append({"config": "full context", "ratio": None, "all": part_summary(full, questions, args.documents, questions)})
        print(f"full context: choices {rows[-1]['all']['choice_accuracy']} answers {rows[-1]['all']['answer_accuracy']}",
              flush=True)

        def register(i: int, ratio: float | str, registration) -> dict:
            """The registered document, or (422) why the guard refused it: then its prefix is served in full."""
            try:
                return client.register(**document(i), ratio=ratio, **registration(i))
            except DocumentError as error:
                if error.status != HTTPStatus.UNPROCESSABLE_ENTITY:
                    raise
                return {"refused": error.message, "t": None, "fidelity": {}, "timings": {}}

        def run(name: str, ratio: float | str, registration, scored: dict, **fields) -> dict:
            start = time.perf_counter()
            registered = [register(i, ratio, registration) for i in range(args.documents)]
            seconds = time.perf_counter() - start
            try:
                results = {part: score(url, subset, args, [reference[questions.index(q)] for q in subset])
                           for part, subset in scored.items()}
            finally:
                for doc in registered:
                    if "doc_id" in doc:
                        client.drop(doc["doc_id"])
            row = {"config": name, "ratio": ratio, **fields, "registration_seconds": round(seconds, 2),
                   "slots": [doc["t"] for doc in registered], "fidelity": [without_layers(doc["fidelity"]) for doc in registered],
                   "timings": [doc["timings"] for doc in registered], "refused": [doc.get("refused") for doc in registered]}
            for part, outcome in results.items():
                row[part] = part_summary(outcome, scored[part], args.documents, questions)
            rows.append(row)
            print(f"{name} {fields or ''} @ {ratio}: " + ", ".join(
                f"{part} agreement {row[part]['agreement']} answers {row[part]['answer_accuracy']} choices "
                f"{row[part]['choice_accuracy']}" for part in results) + f" ({seconds:.0f} s to register)", flush=True)
            return row

        for ratio in args.ratios:
            if "without" in args.configs:
                run("without questions", ratio, lambda i: {}, {"all": questions, "not_given": not_given})
            if "with" in args.configs:
                for tokens in args.answer_tokens:
                    for share in args.repeat_share:
                        for budgets in [None, head_budgets] if head_budgets else [None]:
                            fields = {"answer_tokens": tokens}
                            if share:
                                fields["query_source"] = {"questions": 1 - share, "repeat-prefill": share}
                            if budgets:
                                fields["head_budgets"] = budgets
                            run("with questions", ratio, lambda i, fields=fields: {"questions": asked[i], **fields},
                                {"all": questions}, answer_tokens=tokens, repeat_share=share,
                                head_budgets="nonuniform" if budgets else "uniform")
            if "half" in args.configs:
                run("half given", ratio, lambda i: {"questions": [q for q, kept in zip(asked[i], half) if kept]},
                    {"given": given, "not_given": not_given})
        if args.auto:
            run("auto ratio, with questions", "auto", lambda i: {"questions": asked[i]}, {"all": questions})
    payload = {**environment(), "inputs": {**vars(args), "output": str(args.output), "workload": workload,
                                           "head_budgets": args.head_budgets and str(args.head_budgets),
                                           "document_tokens": [len(ids) for ids in document_ids]}, "rows": rows}
    finish(payload, args.output, plot)


def replot(path: Path) -> None:
    """Draw a result file's plot again (``python benchmarks/question_aware.py --replot FILE``)."""
    finish(json.loads(path.read_text()), path, plot)


def leading_messages(questions, index: int) -> list[dict]:
    """A chat document's leading messages: the system message its questions start with."""
    return next(q.messages[:-1] for q in questions if q.document == index)


def without_layers(fidelity: dict) -> dict:
    return {key: value for key, value in fidelity.items() if key != "layers"}


def part_summary(outcome: list[dict], subset, documents: int, questions) -> dict:
    """Agreement and accuracy over the questions scored, per document (the fidelity guard is per document), and
    each question's outcome with its document and its index in ``questions``."""
    keys = ("agreement", "answer_correct", "choice_correct")
    per_document = []
    for d in range(documents):
        mine = [row for row, question in zip(outcome, subset) if question.document == d]
        per_document.append({"agreement": mean(mine, "agreement"), "choice_accuracy": mean(mine, "choice_correct"),
                             "answer_accuracy": mean(mine, "answer_correct")})
    return {"agreement": mean(outcome, "agreement"), "choice_accuracy": mean(outcome, "choice_correct"),
            "answer_accuracy": mean(outcome, "answer_correct"), "questions": len(outcome), "per_document": per_document,
            "outcomes": [{"document": q.document, "question": questions.index(q), "text": row["text"],
                          **{key: row[key] for key in keys if key in row}} for row, q in zip(outcome, subset)]}


def plot(payload: dict) -> Figure:
    rows = payload["rows"]
    fig = Figure(figsize=(16, 4.6))
    axes = fig.subplots(1, 3)
    names = sorted({label(row) for row in rows[1:]})
    for name in names:
        for part in ("all", "given", "not_given"):
            points = sorted((row["ratio"], row[part]["agreement"]) for row in rows[1:]
                            if label(row) == name and part in row and isinstance(row["ratio"], float))
            if points:
                axes[0].plot([p[0] for p in points], [p[1] for p in points], marker="o",
                             label=f"{name}: {part.replace('_', ' ')}")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("ratio t/T")
    axes[0].set_ylabel("answer agreement with the full prefix")
    axes[0].set_title("what users see")
    axes[0].legend(fontsize=6)
    panels = ((axes[1], "heldout", "held-out questions through the candidate"),
              (axes[2], None, "the questions given, through the node"))
    for axis, figures, title in panels:
        for name in names:
            points = []
            for row in rows[1:]:
                if label(row) != name:
                    continue
                part = "given" if "given" in row else "all"
                for fidelity, document in zip(row["fidelity"], row[part]["per_document"]):
                    source = (fidelity.get(figures) if figures else fidelity) or {}
                    measured = source.get("agreement") if figures else document["agreement"]
                    if source.get("next_token_kl") is not None and measured is not None:
                        points.append((source["next_token_kl"], measured))
            if points:
                axis.scatter([p[0] for p in points], [p[1] for p in points], label=name, alpha=0.7)
        axis.set_xscale("symlog", linthresh=1e-3)
        axis.set_xlabel("next-token KL at the answer positions (guard)")
        axis.set_ylabel("answer agreement with the full prefix")
        axis.set_title(title, fontsize=9)
        axis.legend(fontsize=6)
    inputs = payload["inputs"]
    fig.suptitle(f"{inputs['model']} served, {inputs['workload']}: {inputs['documents']} documents × {inputs['questions']} "
                 f"questions, ~{sum(inputs['document_tokens']) // len(inputs['document_tokens'])} tokens each")
    return fig


def label(row: dict) -> str:
    extras = [f"{row['answer_tokens']} answer tokens" if "answer_tokens" in row else "",
              f"repeat {row['repeat_share']}" if row.get("repeat_share") else "",
              "nonuniform heads" if row.get("head_budgets") == "nonuniform" else ""]
    return ", ".join([row["config"], *filter(None, extras)])


if __name__ == "__main__":
    main()
