"""Decode over one long shared document: where compaction should pay, measured against the same serving path.

For each document length, on the extension's server: the baseline is a document registered nowhere (SGLang's
radix cache holds it whole, nothing compacted), the control is the same document registered at ratio 1.0 (t = T:
nothing compacted, every request served through a document node), and then the document registered at each
--ratios. Baseline and control are measured in turns, --repeats times each, on two documents that differ in
one token (so the registered one never serves the baseline's requests): a few percent of drift on a shared
machine would otherwise pass for the extension's cost. Each measurement answers --concurrency requests at once,
each with its own question (questions repeat when there are fewer than the requests), each generating exactly
--max-tokens tokens (greedy, ``ignore_eos``), streamed through SGLang's ``/generate``. It reports the time to
first token and the decode phase apart: inter-token latency mean and p99, decode tokens/s (tokens after each
request's first, over the time from the first request's first token to the last request's last), the KV slots
each request's decode step reads (document slots + question + half the answer, a window layer's window at most,
averaged over layers: computed, not measured), and the compacted answers' agreement with the control's (the
full document's), token by token up to the control's first end-of-answer token (``ignore_eos`` generates past
it).

Documents are real text (``real_text_qa``): for a chat model (SmolLM2-135M-Instruct) a system message with the
questions as user turns, for a base model (Gemma-3-270M) the plain text with its questions after it. Compacted
registrations are question-aware (fitted to the asked questions and ``--answer-tokens`` of each answer).
With --documents D, request i asks document i mod D, and --pool-documents sizes the KV pool to hold that many
full documents besides the requests' tokens: below D, the pool binds (the control's registrations that find no
room are refused and served by the radix cache, as a user's would be). --stock adds unmodified SGLang
(torch_native) as a reference row. Writes JSON and a PNG (ITL against document length) under
benchmarks/results/.

    python benchmarks/long_decode.py --model smollm2-135m --lengths 1024 2048 4096 8192 --concurrency 1 16
    python benchmarks/long_decode.py --model gemma3-270m --lengths 1024 2048 4096 8192 --concurrency 1 16
    python benchmarks/long_decode.py --model smollm2-135m --lengths 2048 --documents 8 --pool-documents 3 --concurrency 16
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from common import RESULTS_DIR, environment, finish, register_or_refused
from matplotlib.figure import Figure
from transformers import AutoConfig, AutoTokenizer

from sglang_am.batch_qa import Answer, agreement, complete, document_questions, documents_and_questions
from sglang_am.client import DocumentsClient
from sglang_am.serve import MODELS, model_path, serving

BASELINE = "no document"
CONTROL = "ratio 1 (control)"
STOCK = "stock SGLang"


@dataclasses.dataclass(frozen=True)
class SharedDocument:
    """A document's ids, its questions' prompts (each starts with the ids) and the questions registered with it."""

    ids: list[int]
    prompts: list[list[int]]
    asked: list

    def twin(self) -> SharedDocument:
        """The same document but for its second token: the baseline's, never registered (a different prefix)."""
        ids = [self.ids[0], self.ids[1] - 1 if self.ids[1] > 0 else 1, *self.ids[2:]]
        return SharedDocument(ids, [ids + prompt[len(ids):] for prompt in self.prompts], self.asked)


def sized_documents(tokenizer, workload: str, length: int, count: int, questions: int) -> list[SharedDocument]:
    """``count`` real-text documents of at most about ``length`` tokens each (sentences vary: two sizing rounds on
    the first) with their questions."""
    sentences = 100
    for _ in range(2):
        _, ids, _ = documents_and_questions(tokenizer, 1, 1, workload, sentences)
        sentences = max(10, int(sentences * length / len(ids[0])))
    _, ids, questions = documents_and_questions(tokenizer, count, questions, workload, sentences)
    return [SharedDocument(doc_ids, [q.prompt for q in questions if q.document == d], asked)
            for d, (doc_ids, asked) in enumerate(zip(ids, document_questions(ids, questions)))]


def run_batch(url: str, prompts: list[list[int]], max_tokens: int) -> tuple[list[Answer], float]:
    """All ``prompts`` at once; their answers and the wall-clock seconds."""
    start = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = list(pool.map(lambda prompt: complete(url, prompt, max_tokens, api="native", ignore_eos=True), prompts))
    failed = [answer.error for answer in answers if answer.error]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed: {failed[0]}")
    return answers, time.perf_counter() - start


def figures(runs: list[tuple[list[Answer], float]], slots_read: float, reference: list[Answer] | None,
            stops: list[int] = ()) -> dict:
    """One configuration at one concurrency over its runs: latencies pooled, time to first token from the first
    run (later runs find their questions cached), decode tokens/s the median run's."""
    gaps = sorted(gap for answers, _ in runs for answer in answers for gap in answer.inter_token_latencies())
    rates = []
    for answers, _ in runs:
        firsts, lasts = [a.arrivals[0][0] for a in answers], [a.arrivals[-1][0] for a in answers]
        rates.append(sum(a.completion_tokens - 1 for a in answers) / (max(lasts) - min(firsts)))
    answers = runs[0][0]
    firsts = [answer.arrivals[0][0] for answer in answers]
    row = {"requests": len(answers), "runs": len(runs), "wall_seconds": round(runs[0][1], 3),
           "ttft_mean": round(statistics.fmean(firsts), 4), "ttft_max": round(max(firsts), 4),
           "itl_mean": round(statistics.fmean(gaps), 5), "itl_p50": round(gaps[len(gaps) // 2], 5),
           "itl_p99": round(gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))], 5),
           "decode_tokens_per_second": round(statistics.median(rates), 2),
           "kv_slots_read_per_step": round(slots_read, 1),
           "served_by_document": sum(answer.document is not None for answer in answers) / len(answers)}
    if reference is not None:
        answered = [agreement(answer_of(ref, stops), answer) for ref, answer in zip(reference, answers)]
        row["agreement"] = round(statistics.fmean(answered), 4)
    row["outputs"] = [answer.tokens for answer in answers]
    return row


def answer_of(reference: Answer, stops: list[int]) -> Answer:
    """``reference`` up to its first stop token: ``ignore_eos`` generates past it, and what follows is no answer."""
    tokens = reference.tokens
    end = next((index + 1 for index, token in enumerate(tokens) if token in stops), len(tokens))
    return dataclasses.replace(reference, tokens=tokens[:end])


def report(row: dict) -> dict:
    print(f"  {row['config']}, {row['concurrency']} at once: TTFT {row['ttft_mean']:.2f} s, ITL mean "
          f"{row['itl_mean'] * 1e3:.1f} ms p99 {row['itl_p99'] * 1e3:.1f} ms, decode {row['decode_tokens_per_second']:.1f} "
          "tok/s" + (f", agreement {row['agreement']:.2f}" if "agreement" in row else ""), flush=True)
    return row


def batches(documents: list[SharedDocument], concurrencies: list[int]) -> dict[int, list[list[int]]]:
    """Request i asks document i mod D its question i // D (questions repeat when there are fewer)."""
    def prompt(i: int) -> list[int]:
        prompts = documents[i % len(documents)].prompts
        return prompts[(i // len(documents)) % len(prompts)]

    return {c: [prompt(i) for i in range(c)] for c in concurrencies}


def layer_windows(config) -> tuple[int | None, ...]:
    """Per layer, the keys a sliding-window layer's query sees, or None on a global layer."""
    kinds = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return tuple(config.sliding_window if kind == "sliding_attention" else None for kind in kinds)


def slots_read(documents: list[SharedDocument], slots: list[int], batch: list[list[int]], max_tokens: int,
               windows: tuple[int | None, ...]) -> float:
    """KV slots a request's decode step reads (its document's ``slots``, its question, half its answer), averaged
    over the batch and over layers (a window layer reads its window at most)."""
    spans = [slots[i % len(documents)] + len(prompt) - len(documents[i % len(documents)].ids) + (max_tokens - 1) / 2
             for i, prompt in enumerate(batch)]
    return statistics.fmean(span if window is None else min(span, window) for span in spans for window in windows)


def register_all(client, documents: list[SharedDocument], ratio: float, args) -> tuple[list[dict | None], float]:
    """Each document registered at ``ratio`` (the control's refused where the pool has no room: None), and the
    seconds it took."""
    start = time.perf_counter()
    registered = [register_or_refused(client, ratio, input_ids=document.ids, questions=document.asked,
                                      answer_tokens=args.answer_tokens) for document in documents]
    return registered, time.perf_counter() - start


def measure_length(url: str, documents: list[SharedDocument], args) -> list[dict]:
    """Baseline and control in turns, then each compacted ratio: this length's rows."""
    twins = [document.twin() for document in documents]
    doc_batches, twin_batches = batches(documents, args.concurrency), batches(twins, args.concurrency)
    client = DocumentsClient(url)
    for twin in twins:  # the baseline's documents are cached (as many as the pool holds)
        complete(url, twin.prompts[0], 1, api="native")
    rows, references = [], {}
    lengths = [len(document.ids) for document in documents]
    registered, _ = register_all(client, documents, 1.0, args)
    control_slots = [length if doc is None else doc["slots"] for doc, length in zip(registered, lengths)]
    for concurrency in args.concurrency:
        runs = {BASELINE: [], CONTROL: []}
        for _ in range(args.repeats):
            runs[BASELINE].append(run_batch(url, twin_batches[concurrency], args.max_tokens))
            runs[CONTROL].append(run_batch(url, doc_batches[concurrency], args.max_tokens))
        references[concurrency] = runs[CONTROL][0][0]
        rows.append(report({"config": BASELINE, "concurrency": concurrency, **figures(
            runs[BASELINE], slots_read(twins, lengths, twin_batches[concurrency], args.max_tokens, args.windows), None)}))
        rows.append(report({"config": CONTROL, "concurrency": concurrency, "ratio": 1.0,
                            "refused_registrations": registered.count(None), **figures(
            runs[CONTROL], slots_read(documents, control_slots, doc_batches[concurrency], args.max_tokens, args.windows),
            None)}))
    drop_all(client, registered)
    for ratio in args.ratios:
        registered, seconds = register_all(client, documents, ratio, args)
        for concurrency in args.concurrency:
            batch = doc_batches[concurrency]
            row = figures([run_batch(url, batch, args.max_tokens)],
                          slots_read(documents, [doc["slots"] for doc in registered], batch, args.max_tokens, args.windows),
                          references[concurrency], args.stop_tokens)
            rows.append(report({"config": f"ratio {ratio:g}", "concurrency": concurrency, **row, "ratio": ratio,
                                "registration_seconds": round(seconds, 2)}))
        drop_all(client, registered)
    return rows


def drop_all(client, registered: list[dict | None]) -> None:
    for doc in registered:
        if doc is not None:
            client.drop(doc["doc_id"])


def measure_stock(url: str, documents: list[SharedDocument], args) -> list[dict]:
    doc_batches = batches(documents, args.concurrency)
    for document in documents:
        complete(url, document.prompts[0], 1, api="native")
    lengths = [len(document.ids) for document in documents]
    return [report({"config": STOCK, "concurrency": concurrency, **figures(
        [run_batch(url, doc_batches[concurrency], args.max_tokens)],
        # SGLang's torch_native gathers a window layer's whole sequence: every layer reads every slot.
        slots_read(documents, lengths, doc_batches[concurrency], args.max_tokens, (None,)), None)})
        for concurrency in args.concurrency]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=MODELS[1:], default="smollm2-135m", help="a pretrained model served by name")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192], help="document tokens")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="requests at once")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens each request generates (ignore_eos)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.05], help="compacted ratios (1.0, the "
                        "control, is always measured)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of the baseline and the control, in turns")
    parser.add_argument("--questions", type=int, default=16, help="distinct questions per document (at most 16)")
    parser.add_argument("--answer-tokens", type=int, default=32, help="answer tokens each registration is fitted to")
    parser.add_argument("--documents", type=int, default=1, help="documents asked at once (request i asks "
                        "document i mod D)")
    parser.add_argument("--pool-documents", type=float, help="size the KV pool to hold this many full documents "
                        "besides the requests' own tokens, so that it binds (default: room for every document, "
                        "its capture and its twin)")
    parser.add_argument("--stock", action="store_true", help="add unmodified SGLang as a reference row")
    parser.add_argument("--output", help="JSON path (default: benchmarks/results/long_decode_MODEL.json)")
    args = parser.parse_args()
    if not 1 <= args.questions <= 16 or min(args.concurrency) < 1 or args.max_tokens < 2 or args.documents < 1:
        parser.error("--questions must be in [1, 16], --concurrency and --documents >= 1 and --max-tokens >= 2")
    if args.pool_documents is not None and args.pool_documents <= 0:
        parser.error(f"--pool-documents must be positive, got {args.pool_documents}")
    if not all(0 < ratio < 1 for ratio in args.ratios) or args.repeats < 1:
        parser.error(f"--ratios must be in (0, 1) and --repeats >= 1, got {args.ratios} and {args.repeats}")

    path = str(model_path(args.model))
    tokenizer, config = AutoTokenizer.from_pretrained(path), AutoConfig.from_pretrained(path)
    workload = "chat" if tokenizer.chat_template else "real-text"
    args.windows = layer_windows(config)
    # Where an answer ends: the end of the turn, or for a base model the end of its line.
    args.stop_tokens = sorted({tokenizer.eos_token_id, *torch.tensor(config.eos_token_id or []).view(-1).tolist(),
                               *([] if workload == "chat" else tokenizer.encode("\n", add_special_tokens=False))} - {None})
    # Every request's tokens and, by default, the documents' cached full prefixes and twins and a registration's
    # capture (the document again, its questions and their answers).
    pool = max(args.concurrency) * (args.max_tokens + 256) + (
        4 * args.documents * max(args.lengths) + 4096 if args.pool_documents is None
        else int(args.pool_documents * max(args.lengths)))
    flags = ["--model-path", path, "--max-total-tokens", str(pool), "--dtype", "float32"]
    # A document, a question and the answer fit the model's context (SmolLM2: 8,192 positions).
    longest = config.max_position_embeddings - args.max_tokens - 256
    output = Path(args.output or RESULTS_DIR / f"long_decode_{args.model}.json")
    rows = []
    for length in args.lengths:
        documents = sized_documents(tokenizer, workload, min(length, longest), args.documents, args.questions)
        tokens = round(statistics.fmean(len(document.ids) for document in documents))
        print(f"{args.documents} document(s) of {tokens} tokens, {args.questions} questions each", flush=True)
        per_length = []
        if args.stock:
            with serving([*flags, "--attention-backend", "torch_native"], stock=True) as url:
                per_length += measure_stock(url, documents, args)
        with serving(flags) as url:
            per_length += measure_length(url, documents, args)
        rows += [{"document_tokens": tokens, "documents": args.documents, **row} for row in per_length]
        payload = {**environment(), "inputs": {**vars(args), "workload": workload, "max_total_tokens": pool}, "rows": rows}
        finish(payload, output, plot)  # after every length: a long run keeps what it measured


def plot(payload: dict) -> Figure:
    rows, inputs = payload["rows"], payload["inputs"]
    concurrencies = sorted({row["concurrency"] for row in rows})
    fig = Figure(figsize=(5 * len(concurrencies), 7.5))
    axes = fig.subplots(2, len(concurrencies), squeeze=False)
    for column, concurrency in enumerate(concurrencies):
        for config in dict.fromkeys(row["config"] for row in rows):
            points = sorted((row["document_tokens"], row) for row in rows
                            if row["config"] == config and row["concurrency"] == concurrency)
            lengths = [length for length, _ in points]
            style = {"linestyle": "--", "color": "gray"} if config == STOCK else {"marker": "o"}
            axes[0][column].plot(lengths, [row["itl_mean"] * 1e3 for _, row in points], label=config, **style)
            axes[1][column].plot(lengths, [row["decode_tokens_per_second"] for _, row in points], label=config, **style)
        axes[0][column].set_title(f"{concurrency} request{'s' if concurrency > 1 else ''} at once")
        axes[0][column].set_ylabel("decode ITL mean (ms)")
        axes[1][column].set_ylabel("decode tokens / s")
        for axis in axes[:, column]:
            axis.set_xlabel("document tokens")
            axis.set_xscale("log", base=2)
            axis.grid(alpha=0.3)
        axes[0][column].legend(fontsize=8)
    fig.suptitle(f"{inputs['model']}: {inputs['max_tokens']} generated tokens per request, greedy, ignore_eos")
    return fig


if __name__ == "__main__":
    main()
