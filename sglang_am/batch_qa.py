"""Many questions over a few shared documents, asked through a server's API.

Shared by ``examples/batch_qa.py`` and the benchmarks. Two workloads: ``recall`` (seeded ``Kxxx: word``
documents for the embedded recall model, the fast default) and ``real-text`` (natural-language documents
whose facts have same-type distractors, ``sglang_am.quality.real_text_qa``, for a pretrained model such
as Gemma-3-270M). Prompts travel as token ids, the document's ids first, so a registered document (by
the same ids) always matches: text prompts can tokenize the document's last token differently.
Short answers are greedy streaming ``/v1/completions`` requests, with time to first token and latency;
multiple-choice questions are scored by the likelihood of each choice (``/generate`` prompt log-probs).
"""

from __future__ import annotations

import json
import statistics
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tqdm.auto import tqdm

from .client import http_json
from .quality.real_text import choice_text, question_prompt, real_text_qa, short_answer_correct
from .quality.tasks import Document
from .recall_model import recall_task

WORKLOADS = ("recall", "real-text")


@dataclass
class QARequest:
    document: int  # index into the documents
    prompt: list[int]  # the document's token ids, then the question's
    answer: str
    choices: tuple[list[int], ...] = ()  # each choice's token ids, scored after the prompt
    answer_index: int | None = None
    workload: str = "recall"

    def is_correct(self, text: str) -> bool:
        """Is the generated ``text`` the answer (recall: its first word; real text: its first words)?"""
        if self.workload == "recall":
            return (text.split() or [""])[0] == self.answer
        return short_answer_correct(text, self.answer)


@dataclass
class Answer:
    text: str
    ttft: float  # seconds to the first streamed token
    latency: float  # seconds to the last one
    completion_tokens: int
    error: str | None = None
    # From SGLang's own meta_info (the native API only): prompt tokens served from the cache, and the compacted
    # document that served the request, if one did.
    cached_tokens: int | None = None
    document: str | None = None


def documents_and_questions(tokenizer, num_documents: int, questions_per_document: int, workload: str = "recall",
                            size: int | None = None, seed: int = 0) -> tuple[list[Document], list[list[int]], list[QARequest]]:
    """Documents, their token ids and their questions, interleaved across documents (the order a mixed
    workload arrives in, which is what makes a cache hold every document at once). ``size``: key-value
    pairs per recall document (default 300), or sentences per real-text document (default 140, ~2k tokens)."""
    if num_documents < 1 or questions_per_document < 1 or (size is not None and size < 1):
        raise ValueError("num_documents, questions_per_document and size must be >= 1")
    if workload == "recall":
        documents = [recall_task(num_pairs=size or 300, num_questions=questions_per_document, seed=seed + i)[0]
                     for i in range(num_documents)]
        suffix = lambda question: "\n" + question.question  # noqa: E731
    elif workload == "real-text":
        documents = real_text_qa(num_documents, num_sentences=size or 140, num_questions=questions_per_document,
                                 seed=seed)
        suffix = question_prompt
    else:
        raise ValueError(f"workload must be one of {WORKLOADS}, got {workload!r}")
    document_ids = [tokenizer.encode(d.text) for d in documents]
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    questions = [
        QARequest(d, document_ids[d] + encode(suffix(q)), q.answer,
                  tuple(encode(choice_text(c)) for c in q.choices), q.answer_index, workload)
        for j in range(questions_per_document) for d in range(num_documents) for q in [documents[d].questions[j]]
    ]
    return documents, document_ids, questions


def document_questions(document_ids: Sequence[list[int]], questions: Sequence[QARequest]) -> list[list[list[int]]]:
    """Each document's questions as the token ids that follow it: what a question-aware registration takes."""
    asked: list[list[list[int]]] = [[] for _ in document_ids]
    for question in questions:
        asked[question.document].append(question.prompt[len(document_ids[question.document]) :])
    return asked


APIS = ("openai", "native")


def complete(url: str, prompt: list[int], max_tokens: int, api_key: str | None = None, timeout: float = 600,
             headers: Mapping[str, str] | None = None, api: str = "openai") -> Answer:
    """One streaming greedy request for a prompt of token ids: ``/v1/completions`` (``api="openai"``) or
    SGLang's ``/generate`` (``"native"``: sglang-router's completions route takes text prompts only);
    ``headers`` are added (a router's routing key, for example)."""
    if api == "openai":
        path, body = "/v1/completions", {"model": "default", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                         "stream": True, "stream_options": {"include_usage": True}}
    elif api == "native":
        path, body = "/generate", {"input_ids": prompt, "sampling_params": {"max_new_tokens": max_tokens, "temperature": 0},
                                   "stream": True}
    else:
        raise ValueError(f"api must be one of {APIS}, got {api!r}")
    headers = {"Content-Type": "application/json", **(headers or {})}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    start = time.perf_counter()
    first, text, tokens, meta = None, "", 0, {}
    try:
        request = urllib.request.Request(f"{url}{path}", json.dumps(body).encode(), headers)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            for line in response:
                line = line.strip()
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if api == "openai":
                    text += "".join(choice.get("text") or "" for choice in chunk.get("choices", []))
                    tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
                else:  # the whole text so far, in every chunk
                    text, meta = chunk["text"], chunk["meta_info"]
                    tokens = meta["completion_tokens"]
                if text and first is None:
                    first = time.perf_counter() - start
    except (urllib.error.URLError, OSError, ValueError, KeyError) as error:
        return Answer("", 0.0, time.perf_counter() - start, 0, error=str(error))
    latency = time.perf_counter() - start
    document = (meta.get("am_document") or [{}])[0].get("doc_id")
    return Answer(text, first if first is not None else latency, latency, tokens, cached_tokens=meta.get("cached_tokens"),
                  document=document)


def ask_all(url: str, questions: Sequence[QARequest], concurrency: int, max_tokens: int,
            api_key: str | None = None, progress: str | None = None,
            route: Callable[[QARequest], Mapping[str, str]] | None = None, api: str = "openai",
            ) -> tuple[list[Answer], float]:
    """Every question, ``concurrency`` at a time (``complete``); the answers in order and the wall-clock seconds.
    ``route`` gives each question's extra headers (a router's routing key)."""
    if concurrency < 1 or max_tokens < 1:
        raise ValueError("concurrency and max_tokens must be >= 1")
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(complete, url, q.prompt, max_tokens, api_key, headers=route(q) if route else None, api=api)
                   for q in questions]
        answers = [f.result() for f in tqdm(futures, desc=progress, disable=progress is None, unit="req")]
    return answers, time.perf_counter() - start


def choice_logprobs(url: str, question: QARequest, api_key: str | None = None) -> list[float]:
    """The summed log-probability of each choice's tokens after the question's prompt (one batch request)."""
    sampling = {"max_new_tokens": 1, "temperature": 0}
    # SGLang gives no log-prob for the token at logprob_start_len itself: start one before the choice.
    status, body = http_json("POST", f"{url}/generate", {
        "input_ids": [question.prompt + choice for choice in question.choices], "sampling_params": sampling,
        "return_logprob": True, "logprob_start_len": len(question.prompt) - 1,
    }, api_key)
    if status != 200:
        raise RuntimeError(f"scoring the choices failed ({status}): {body}")
    return [sum(value for value, _, _ in output["meta_info"]["input_token_logprobs"][1:]) for output in body]


def choice_accuracy(url: str, questions: Sequence[QARequest], concurrency: int = 4, api_key: str | None = None,
                    progress: str | None = None) -> float:
    """Multiple-choice accuracy by answer likelihood (the choice with the highest summed log-prob)."""
    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(choice_logprobs, url, q, api_key) for q in questions]
        scores = [f.result() for f in tqdm(futures, desc=progress, disable=progress is None, unit="question")]
    picks = [max(range(len(s)), key=s.__getitem__) for s in scores]
    return sum(pick == q.answer_index for pick, q in zip(picks, questions)) / len(questions)


def summarize(questions: Sequence[QARequest], answers: Sequence[Answer], wall_seconds: float) -> dict:
    """Short-answer accuracy (``QARequest.is_correct``), throughput and latency percentiles."""
    done = [a for a in answers if a.error is None]
    correct = sum(a.error is None and q.is_correct(a.text) for q, a in zip(questions, answers))

    def percentile(values: list[float], p: float) -> float | None:
        if not values:
            return None
        return statistics.quantiles(values, n=100, method="inclusive")[p - 1] if len(values) > 1 else values[0]

    ttft, latency = [a.ttft for a in done], [a.latency for a in done]
    return {
        "requests": len(answers),
        "errors": len(answers) - len(done),
        "accuracy": correct / len(answers),
        "wall_seconds": round(wall_seconds, 3),
        "request_throughput": round(len(done) / wall_seconds, 3),
        "output_tokens_per_second": round(sum(a.completion_tokens for a in done) / wall_seconds, 3),
        "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
        "latency_p50": percentile(latency, 50), "latency_p99": percentile(latency, 99),
    }
