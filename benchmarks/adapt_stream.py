"""Refits from live traffic: a stream of questions over documents registered without them.

One server with the extension (Gemma-3-270M in float32 by default; ``--model recall`` for the embedded
model; ``--model smollm2-135m`` for a chat model, its documents system messages and its questions asked
through ``/v1/chat/completions``). Each document has a set of --set questions; a stream of --requests
requests per document draws from its set Zipf-like (weight 1/rank^--zipf), interleaved across documents,
--concurrency at a time, as greedy streamed answers of --max-tokens tokens (time to first token, short
answer judged, and agreement with the full prefix's answer token by token). The same stream runs four
times: with the full documents (SGLang's radix cache, the reference), with the documents registered at
--ratio, registered at --ratio with ``"adapt": true`` (refits from the stream's own queries, prompt and
decode positions), and registered with the whole set of questions up front (the node adapting should
approach). Reported per run: accuracy and agreement over each half of the stream, TTFT p50/p99, and for
the adapting run the refits, the live queries seen and the fidelity, then SGLang's idle leak check.
Writes JSON and a plot.

    python benchmarks/adapt_stream.py                      # Gemma: 2 documents, 30 questions each, 150 requests each
    python benchmarks/adapt_stream.py --model recall --set 40 --max-tokens 1
    python benchmarks/adapt_stream.py --model smollm2-135m --set 20 --max-tokens 8 --size 60
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

from common import RESULTS_DIR, environment, finish
from matplotlib.figure import Figure
from transformers import AutoTokenizer

from sglang_am.batch_qa import agreement, ask_all, document_questions, documents_and_questions
from sglang_am.client import DocumentsClient
from sglang_am.serve import MODELS, model_path, serving


def zipf_draws(pool: list, count: int, exponent: float, rng: random.Random) -> list:
    """``count`` draws from ``pool`` (weight 1/rank^exponent; which question is the most asked is random too)."""
    order = rng.sample(pool, len(pool))
    return rng.choices(order, [1 / (rank + 1) ** exponent for rank in range(len(order))], k=count)


def zipf_stream(questions, documents: int, requests: int, exponent: float, seed: int) -> list:
    """``requests`` draws per document from its questions (``zipf_draws``), interleaved across documents."""
    rng = random.Random(seed)
    draws = [zipf_draws([q for q in questions if q.document == d], requests, exponent, rng) for d in range(documents)]
    return [draws[d][i] for i in range(requests) for d in range(documents)]


def summary(stream, answers, wall: float, reference=None, half: int | None = None) -> dict:
    """Accuracy (and with the reference answers, agreement) over the stream, each half (split at ``half``, by
    default the middle) and each tenth; TTFT."""
    series = {"accuracy": [a.error is None and q.is_correct(a.text) for q, a in zip(stream, answers)]}
    if reference is not None:
        series["agreement"] = [agreement(full, served) for full, served in zip(reference, answers)]
    ttft = [a.ttft for a in answers if a.error is None]
    quantile = lambda p: statistics.quantiles(ttft, n=100, method="inclusive")[p - 1]  # noqa: E731
    row = {"requests": len(answers), "errors": sum(a.error is not None for a in answers),
           "ttft_p50": round(quantile(50), 4), "ttft_p99": round(quantile(99), 4),
           "request_throughput": round(len(answers) / wall, 3)}
    half = half or len(answers) // 2
    for name, values in series.items():
        row[name] = round(sum(values) / len(values), 4)
        row[f"{name}_first_half"] = round(sum(values[:half]) / half, 4)
        row[f"{name}_second_half"] = round(sum(values[half:]) / (len(values) - half), 4)
        row[f"{name}_by_tenth"] = [round(sum(part) / len(part), 4) for part in _tenths(values)]
    return row


def _tenths(values: list) -> list[list]:
    size = max(1, len(values) // 10)
    return [values[i : i + size] for i in range(0, len(values), size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="gemma3-270m")
    parser.add_argument("--documents", type=int, default=2)
    parser.add_argument("--set", type=int, default=30, help="questions per document the stream draws from (20-50)")
    parser.add_argument("--requests", type=int, default=150, help="stream requests per document")
    parser.add_argument("--zipf", type=float, default=1.1, help="exponent of the questions' popularity")
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--refit-every", type=int, default=32, help="--am-adapt-refit-every of the server")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=4, help="tokens generated per answer (and fitted up front)")
    parser.add_argument("--size", type=int, help="sentences per real-text document (default 140) or recall pairs (300)")
    parser.add_argument("--max-total-tokens", type=int, default=32768)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    args.output = args.output or RESULTS_DIR / f"adapt_stream_{args.model}.json"

    path = model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    workload = {"recall": "recall", "smollm2-135m": "chat"}.get(args.model, "real-text")
    documents, document_ids, questions = documents_and_questions(tokenizer, args.documents, args.set, workload,
                                                                 args.size, seed=args.seed)
    stream = zipf_stream(questions, args.documents, args.requests, args.zipf, args.seed)
    if workload == "chat":  # a document is the system message its questions start with; a question, the user's text
        document = lambda d: {"messages": next(q.messages[:-1] for q in questions if q.document == d)}  # noqa: E731
        asked = [[q.question for q in questions if q.document == d] for d in range(args.documents)]
    else:
        document = lambda d: {"input_ids": document_ids[d]}  # noqa: E731
        asked = document_questions(document_ids, questions)
    configurations = (("full context", None), ("compacted", {}), ("compacted, adapt", {"adapt": True}),
                      ("compacted, questions up front", {"questions": None, "answer_tokens": args.max_tokens}))
    flags = ["--model-path", str(path), "--max-total-tokens", str(args.max_total_tokens),
             "--am-adapt-refit-every", str(args.refit_every)] + (["--dtype", "float32"] if args.model != "recall" else [])
    rows, reference = [], None
    with serving(flags) as url:
        client = DocumentsClient(url)
        for name, registration in configurations:
            registered = [] if registration is None else [
                client.register(**document(d), ratio=args.ratio,
                                **{**registration, **({"questions": asked[d]} if "questions" in registration else {})})
                for d in range(args.documents)]
            answers, wall = ask_all(url, stream, args.concurrency, args.max_tokens, progress=name)
            row = {"config": name, **summary(stream, answers, wall, reference)}
            reference = reference or answers
            if registration is not None:
                described = [client.get(doc["doc_id"]) for doc in registered]
                row["documents"] = [{key: doc.get(key) for key in ("t", "adapt", "fidelity", "requests_served")}
                                    for doc in described]
                for doc in registered:
                    client.drop(doc["doc_id"])
                time.sleep(1)
                row["idle_check"] = client.stats()["idle_check"]
            rows.append(row)
            agreed = (f", agreement {row['agreement_first_half']} -> {row['agreement_second_half']}"
                      if "agreement_first_half" in row else "")
            print(f"{name}: accuracy {row['accuracy_first_half']} -> {row['accuracy_second_half']}{agreed}, "
                  f"TTFT p50 {row['ttft_p50']} s, p99 {row['ttft_p99']} s", flush=True)
    payload = {**environment(), "inputs": {**vars(args), "output": str(args.output), "workload": workload,
                                           "document_tokens": [len(ids) for ids in document_ids]}, "rows": rows}
    finish(payload, args.output, plot)


def plot(payload: dict) -> Figure:
    fig = Figure(figsize=(17, 4.2))
    axes = fig.subplots(1, 3)
    for axis, key in ((axes[0], "accuracy"), (axes[1], "agreement")):
        for row in payload["rows"]:
            tenths = row.get(f"{key}_by_tenth")
            if tenths:
                axis.plot([(i + 1) / len(tenths) for i in range(len(tenths))], tenths, marker="o", label=row["config"])
        axis.set_xlabel("fraction of the stream")
        axis.set_ylabel(f"{key} (each tenth of the stream)" + (" with the full prefix" if key == "agreement" else ""))
        axis.set_ylim(0, 1.02)
        axis.legend(fontsize=8)
    names = [row["config"].replace(", ", ",\n") for row in payload["rows"]]
    for offset, key in ((-0.2, "ttft_p50"), (0.2, "ttft_p99")):
        axes[2].bar([i + offset for i in range(len(names))], [row[key] for row in payload["rows"]], width=0.4, label=key)
    axes[2].set_xticks(range(len(names)), names, fontsize=7)
    axes[2].set_ylabel("seconds")
    axes[2].legend()
    inputs = payload["inputs"]
    fig.suptitle(f"{inputs['model']}: {inputs['documents']} documents, Zipf({inputs['zipf']}) over {inputs['set']} questions "
                 f"each, {inputs['requests']} requests each, ratio {inputs['ratio']}")
    return fig


if __name__ == "__main__":
    main()
