"""``--am-auto`` with its defaults on a stream of questions over documents nobody registers, against stock SGLang.

Documents: real text for Gemma-3-270M (the default), chat system messages for SmolLM2-135M-Instruct (questions
through ``/v1/chat/completions``), recall documents for the embedded model. Per document a stream of
--requests questions, interleaved across documents, asked --concurrency at a time as greedy streamed answers of
--max-tokens tokens. Streams (--streams):

- ``zipf``: drawn Zipf-like (weight 1/rank^--zipf) from --set questions per document, as ``adapt_stream.py``;
- ``unique``: every question asked once (2 × --set distinct questions per document);
- ``drift``: the first half drawn from one set of --set questions, the second half from another set on the
  same documents.

Each stream runs on stock SGLang (torch_native attention; its answers are the reference) and on this launcher
with ``--am-auto`` and no tuning flag unless --extension-flags adds some; with --learn, each document is
registered on it with ``"learn": true`` before the stream (served in full, pinned, until its traffic certifies
a node). The stream goes in chunks of --chunk requests; after each chunk the extension's ``/am/stats`` is
read, so the report says when documents were observed, installed, given up and reverted. Reported per run:
accuracy and agreement with stock's answers over each half, the share of the second half served from a
compacted node, TTFT p50/p99, the learned documents' counters and what each ended as, and SGLang's idle check
once every server is idle. With --workers N, each configuration is N servers behind sglang-router (--policy),
whose learned documents and counters are summed over the workers; --dp-size N gives one server N ranks.

    python benchmarks/auto_stream.py --model smollm2-135m --size 60 --set 20 --requests 100 --max-tokens 16
    python benchmarks/auto_stream.py --model recall --set 40 --max-tokens 1 --streams zipf drift
    python benchmarks/auto_stream.py --model recall --set 40 --max-tokens 1 --streams zipf --workers 2
"""

from __future__ import annotations

import argparse
import contextlib
import random
import shlex
import time
from collections.abc import Iterator
from pathlib import Path

from adapt_stream import summary, zipf_draws
from common import RESULTS_DIR, environment, finish
from matplotlib.figure import Figure
from transformers import AutoTokenizer

from sglang_am.batch_qa import ask_all, documents_and_questions
from sglang_am.client import DocumentsClient
from sglang_am.cluster import POLICIES, cluster
from sglang_am.serve import MODELS, model_path, serving
from sglang_am.server.scheduler.metrics import merge_idle_checks

STREAMS = ("zipf", "unique", "drift")


def make_stream(kind: str, questions: list, documents: int, args) -> tuple[list, int | None]:
    """The stream's requests, interleaved across documents, and where its questions change (drift) or None."""
    rng = random.Random(args.seed)
    per_document = [[q for q in questions if q.document == d] for d in range(documents)]
    half = args.requests // 2
    if kind == "zipf":
        draws = [zipf_draws(pool[: args.set], args.requests, args.zipf, rng) for pool in per_document]
    elif kind == "unique":
        draws = [rng.sample(pool, len(pool)) for pool in per_document]
    else:
        draws = [zipf_draws(pool[: args.set], half, args.zipf, rng)
                 + zipf_draws(pool[args.set : 2 * args.set], args.requests - half, args.zipf, rng) for pool in per_document]
    stream = [draws[d][i] for i in range(len(draws[0])) for d in range(documents)]
    return stream, (half * documents if kind == "drift" else None)


@contextlib.contextmanager
def servers(flags: list[str], stock: bool, args) -> Iterator[tuple[str, list[DocumentsClient]]]:
    """The URL the stream goes to, and a client for each server behind it (whose stats and documents are read)."""
    if args.workers == 1:
        with serving(flags, stock=stock) as url:
            yield url, [DocumentsClient(url)]
    else:
        with cluster(args.workers, args.policy, flags, stock=stock) as running:
            yield running.url, [DocumentsClient(url, running.admin_key) for url in running.worker_urls]


def counters(clients: list[DocumentsClient]) -> dict:
    """The learned documents' counters, summed over the servers (the largest live error of any)."""
    summed, errors = {}, []
    for stats in (client.stats() for client in clients):
        values, total = stats["counters"], lambda value: sum(value.values()) if isinstance(value, dict) else value
        for key, value in {"hits": total(values.get("hits", 0)), "observed": values.get("observed_requests", 0),
                           "installed": total(values.get("compactions", {})),  # auto, and explicit with --learn
                           "given_up": total(values.get("compaction_failures", {})),
                           "refits": values.get("refits", 0), "reverts": values.get("reverts", 0),
                           "answer_refusals": values.get("answer_refusals", 0),
                           "answer_audits": values.get("answer_audits", 0),
                           "observing": stats["documents"]["observing"]}.items():
            summed[key] = summed.get(key, 0) + value
        errors.append(stats["gauges"].get("adapt_live_error_max") or 0.0)
    return {**summed, "live_error_max": max(errors)}


def run_stream(url: str, clients: list[DocumentsClient] | None, stream: list, args, label: str) -> tuple[list, list, float]:
    """The answers, the counters after each chunk (with the extension's ``clients``) and the wall seconds."""
    answers, timeline, wall = [], [], 0.0
    for start in range(0, len(stream), args.chunk):
        chunk = stream[start : start + args.chunk]
        # The router's completions route takes text prompts only: behind it, token ids go to SGLang's /generate.
        got, seconds = ask_all(url, chunk, args.concurrency, args.max_tokens, api="native" if args.workers > 1 else "openai")
        answers += got
        wall += seconds
        if clients:
            timeline.append({"requests": start + len(chunk), **counters(clients)})
        print(f"\r{label}: {start + len(chunk)}/{len(stream)}", end="", flush=True)
    print(flush=True)
    return answers, timeline, wall


def learning(timeline: list, switch: int | None, total: int) -> dict:
    """What the timeline says: the share of the second half served compacted, and after a switch, the requests
    until the first revert (the live figure at each read is in the timeline)."""
    half = switch or total // 2
    before = next((point for point in reversed(timeline) if point["requests"] <= half), {"hits": 0})
    end = timeline[-1]
    row = {**{key: end[key] for key in ("observed", "installed", "given_up", "answer_refusals", "refits", "reverts",
                                        "answer_audits")},
           "served_compacted_second_half": round((end["hits"] - before["hits"]) / (total - half), 4)}
    if switch is not None:
        reverted = next((point["requests"] for point in timeline
                         if point["requests"] > switch and point["reverts"] > before.get("reverts", 0)), None)
        row["requests_after_switch_to_revert"] = None if reverted is None else reverted - switch
    return row


def idle_check(clients: list[DocumentsClient], seconds: float = 60) -> dict:
    """SGLang's idle leak check of every server, once all are idle (a solve, or a certification's probes, may
    still run after the stream), or as they stand after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        check = merge_idle_checks([client.stats()["idle_check"] for client in clients])
        if check["idle"] or time.monotonic() > deadline:
            return check
        time.sleep(0.5)


def learned(doc: dict) -> dict:
    """What a learned document ended as: its state, origin, ratio, certified figures (attention, held-out answers), live
    figure and observation."""
    fidelity = doc.get("fidelity") or {}
    return {"state": doc["state"], "origin": doc.get("origin"), "T": doc["T"], "t": doc["t"], "ratio": doc["ratio"],
            "certified_relative_l2": fidelity.get("relative_l2"), "heldout_answers": fidelity.get("heldout_answers"),
            "requests_served": doc["requests_served"],
            "live_fidelity": (doc.get("adapt") or {}).get("live_fidelity"), "observe": doc.get("observe")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="gemma3-270m")
    parser.add_argument("--documents", type=int, default=2)
    parser.add_argument("--set", type=int, default=20, help="questions per document a Zipf stream draws from")
    parser.add_argument("--requests", type=int, default=100, help="stream requests per document")
    parser.add_argument("--streams", nargs="+", choices=STREAMS, default=list(STREAMS))
    parser.add_argument("--zipf", type=float, default=1.1, help="exponent of the questions' popularity")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=16, help="requests between two reads of /am/stats")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens generated per answer")
    parser.add_argument("--size", type=int, help="sentences per real-text document (default 140) or recall pairs (300)")
    parser.add_argument("--max-total-tokens", type=int, default=32768)
    parser.add_argument("--workers", type=int, default=1, help="servers behind sglang-router (1: no router)")
    parser.add_argument("--policy", choices=POLICIES, default="cache_aware", help="the router's policy with --workers")
    parser.add_argument("--dp-size", type=int, default=1, help="SGLang's data-parallel ranks per server")
    parser.add_argument("--extension-flags", default="", help="more flags for the --am-auto server, one string "
                        "(--extension-flags='--am-auto-agreement-bound 0.9'); the defaults are what is measured without")
    parser.add_argument("--learn", action="store_true", help="register each document with learn on the --am-auto server")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    if args.set < 1 or args.requests < 2 or args.chunk < 1 or args.workers < 1 or args.dp_size < 1:
        parser.error("--set, --workers and --dp-size must be >= 1, --requests >= 2 and --chunk >= 1")
    args.output = args.output or RESULTS_DIR / f"auto_stream_{args.model}.json"

    path = model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    workload = {"recall": "recall", "smollm2-135m": "chat"}.get(args.model, "real-text")
    _, document_ids, questions = documents_and_questions(tokenizer, args.documents, 2 * args.set, workload, args.size,
                                                         seed=args.seed)
    flags = ["--model-path", str(path), "--max-total-tokens", str(args.max_total_tokens),
             "--dp-size", str(args.dp_size), *(["--dtype", "float32"] if args.model != "recall" else [])]
    rows = []
    for kind in args.streams:
        stream, switch = make_stream(kind, questions, args.documents, args)
        with servers([*flags, "--attention-backend", "torch_native"], True, args) as (url, _):
            reference, _, wall = run_stream(url, None, stream, args, f"{kind}, stock")
        rows.append({"stream": kind, "config": "stock", **summary(stream, reference, wall, half=switch)})
        config = "--am-auto, learn" if args.learn else "--am-auto"
        with servers([*flags, "--am-auto", *shlex.split(args.extension_flags)], False, args) as (url, clients):
            if args.learn:
                for client in clients:
                    for ids in document_ids:
                        client.register(input_ids=ids, learn=True)
            answers, timeline, wall = run_stream(url, clients, stream, args, f"{kind}, {config}")
            idle = idle_check(clients)
            documents = [{**learned(doc), "server": index} for index, client in enumerate(clients) for doc in client.list()]
        rows.append({"stream": kind, "config": config, **summary(stream, answers, wall, reference, switch),
                     **learning(timeline, switch, len(stream)), "idle_check": idle, "documents": documents,
                     "timeline": timeline})
        print({key: value for key, value in rows[-1].items() if key != "timeline"}, flush=True)
    payload = {**environment(), "inputs": {**vars(args), "output": str(args.output), "workload": workload,
                                           "document_tokens": [len(ids) for ids in document_ids]}, "rows": rows}
    finish(payload, args.output, plot)


def plot(payload: dict) -> Figure:
    learned = [row for row in payload["rows"] if row["config"] != "stock"]
    fig = Figure(figsize=(6 * len(learned), 4.2))
    axes = fig.subplots(1, len(learned), squeeze=False)[0]
    for axis, row in zip(axes, learned):
        timeline = row["timeline"]
        requests = [point["requests"] for point in timeline]
        for key in ("hits", "observed", "installed", "given_up", "reverts"):
            axis.plot(requests, [point[key] for point in timeline], label=key)
        axis.set_yscale("symlog")
        axis.set_xlabel("requests of the stream")
        axis.set_ylabel("count so far")
        axis.set_title(f"{row['stream']}: agreement with stock {row['agreement']}, accuracy {row['accuracy']}", fontsize=9)
        axis.legend(fontsize=8)
    inputs = payload["inputs"]
    fig.suptitle(f"{inputs['model']}: --am-auto on {inputs['documents']} unregistered documents, "
                 f"{inputs['requests']} requests each, {inputs['max_tokens']}-token answers")
    return fig


if __name__ == "__main__":
    main()
