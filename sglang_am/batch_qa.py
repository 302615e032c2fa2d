"""Many questions over a few shared documents, asked through a server's OpenAI-compatible API.

Shared by ``examples/batch_qa.py`` and ``benchmarks/throughput.py``: seeded recall documents (plain
``Kxxx: word`` lines any tokenizer reads), concurrent streaming ``/v1/completions`` requests with
time to first token and end-to-end latency per request, and the summary statistics.
"""

from __future__ import annotations

import json
import statistics
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tqdm.auto import tqdm

from .quality.tasks import Document
from .recall_model import recall_task


@dataclass
class QARequest:
    document: int  # index into the documents
    prompt: str
    answer: str


@dataclass
class Answer:
    text: str
    ttft: float  # seconds to the first streamed token
    latency: float  # seconds to the last one
    completion_tokens: int
    error: str | None = None


def documents_and_questions(num_documents: int, questions_per_document: int, pairs: int, seed: int = 0
                            ) -> tuple[list[Document], list[QARequest]]:
    """Recall documents and their questions, interleaved across documents (the order a mixed workload
    arrives in, which is what makes a cache hold every document at once)."""
    if num_documents < 1 or questions_per_document < 1 or pairs < 1:
        raise ValueError("num_documents, questions_per_document and pairs must be >= 1")
    documents = [recall_task(num_pairs=pairs, num_questions=questions_per_document, seed=seed + i)[0]
                 for i in range(num_documents)]
    questions = [QARequest(d, f"{documents[d].text}\n{q.question}", q.answer)
                 for j in range(questions_per_document) for d in range(num_documents)
                 for q in [documents[d].questions[j]]]
    return documents, questions


def complete(url: str, prompt: str, max_tokens: int, api_key: str | None = None, timeout: float = 600) -> Answer:
    """One streaming ``/v1/completions`` request (greedy)."""
    body = {"model": "default", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    start = time.perf_counter()
    first, pieces, tokens = None, [], 0
    try:
        request = urllib.request.Request(f"{url}/v1/completions", json.dumps(body).encode(), headers)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            for line in response:
                line = line.strip()
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                text = "".join(choice.get("text") or "" for choice in chunk.get("choices", []))
                if text:
                    first = first if first is not None else time.perf_counter() - start
                    pieces.append(text)
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except (urllib.error.URLError, OSError, ValueError) as error:
        return Answer("", 0.0, time.perf_counter() - start, 0, error=str(error))
    latency = time.perf_counter() - start
    return Answer("".join(pieces), first if first is not None else latency, latency, tokens)


def ask_all(url: str, questions: Sequence[QARequest], concurrency: int, max_tokens: int,
            api_key: str | None = None, progress: str | None = None) -> tuple[list[Answer], float]:
    """Every question, ``concurrency`` at a time; the answers in order and the wall-clock seconds."""
    if concurrency < 1 or max_tokens < 1:
        raise ValueError("concurrency and max_tokens must be >= 1")
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(complete, url, q.prompt, max_tokens, api_key) for q in questions]
        answers = [f.result() for f in tqdm(futures, desc=progress, disable=progress is None, unit="req")]
    return answers, time.perf_counter() - start


def summarize(questions: Sequence[QARequest], answers: Sequence[Answer], wall_seconds: float) -> dict:
    """Accuracy (the first word of the answer against the gold value), throughput and latency percentiles."""
    done = [a for a in answers if a.error is None]
    correct = sum(a.error is None and (a.text.split() or [""])[0] == q.answer for q, a in zip(questions, answers))

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
