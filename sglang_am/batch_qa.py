"""Many questions over a few shared documents, asked through a server's API.

Shared by ``examples/batch_qa.py`` and the benchmarks. Three workloads: ``recall`` (seeded ``Kxxx: word``
documents for the embedded recall model, the fast default), ``real-text`` (natural-language documents
whose facts have same-type distractors, ``sglang_am.quality.real_text_qa``, for a pretrained base model
such as Gemma-3-270M) and ``chat`` (the same documents as a system message and each question as the user
turn after it, for a chat model such as SmolLM2-135M-Instruct). Prompts travel as token ids, the document's
ids first, so a registered document (by the same ids) always matches: text prompts can tokenize the
document's last token differently; chat questions travel as messages through ``/v1/chat/completions``
(the ``openai`` client), which the server renders with its own template.
Answers are greedy and streamed, with time to first token and latency, and keep their tokens, so an
answer served from a compacted document can be compared token by token with the full prefix's
(``agreement``); multiple-choice questions are scored by the likelihood of each choice (``/generate``
prompt log-probs; a chat question's choices follow the start of the answer, as the fact restated).
"""

from __future__ import annotations

import dataclasses
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
from .quality import answer_mentions, choice_text, question_prompt, real_text_qa, short_answer_correct
from .quality.tasks import Document
from .recall_model import recall_task
from .server.chat import PROBES, common_prefix
from .server.entrypoints import fidelity

WORKLOADS = ("recall", "real-text", "chat")


@dataclass
class QARequest:
    document: int  # index into the documents
    prompt: list[int]  # the document's token ids, then the question's (a chat question: rendered by the template)
    answer: str
    choices: tuple[list[int], ...] = ()  # each choice's token ids, scored after the prompt and choice_prefix
    answer_index: int | None = None
    workload: str = "recall"
    messages: list[dict] | None = None  # a chat question: the document's system message, then the user turn
    choice_prefix: list[int] = dataclasses.field(default_factory=list)  # a chat answer's start, before the choice

    @property
    def question(self) -> str | None:
        """A chat question's text (what a registration takes as its question)."""
        return None if self.messages is None else self.messages[-1]["content"]

    def is_correct(self, text: str) -> bool:
        """Is the generated ``text`` the answer (recall: its first word; real text: its first words; chat: its
        words anywhere, since a chat model restates the question first)?"""
        if self.workload == "recall":
            return (text.split() or [""])[0] == self.answer
        if self.workload == "chat":
            return answer_mentions(text, self.answer)
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
    tokens: list | None = None  # the answer's tokens: ids (native API) or token strings (the OpenAI APIs)
    arrivals: list[tuple[float, int]] = dataclasses.field(default_factory=list)  # (seconds, tokens so far) per chunk

    def inter_token_latencies(self) -> list[float]:
        """Seconds between consecutive streamed tokens after the first (a chunk of k tokens counts k gaps of
        its delay / k): the decode phase as a client sees it."""
        gaps = []
        for (before, count_before), (after, count_after) in zip(self.arrivals, self.arrivals[1:]):
            if count_after > count_before:
                gaps += [(after - before) / (count_after - count_before)] * (count_after - count_before)
        return gaps


def agreement(reference: Answer, served: Answer) -> float:
    """The share of ``reference``'s answer tokens that ``served`` has too, position by position (what a user sees
    of an answer served from a compacted document, against the full prefix's)."""
    agreed = fidelity.agreement(reference.tokens or [], served.tokens or [])
    return sum(agreed) / max(1, len(agreed))


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
    elif workload in ("real-text", "chat"):
        documents = real_text_qa(num_documents, num_sentences=size or 140, num_questions=questions_per_document,
                                 seed=seed)
        suffix = question_prompt
    else:
        raise ValueError(f"workload must be one of {WORKLOADS}, got {workload!r}")
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    if workload == "chat":
        return documents, *_chat_questions(tokenizer, documents, questions_per_document, encode)
    document_ids = [tokenizer.encode(d.text) for d in documents]
    questions = [
        QARequest(d, document_ids[d] + encode(suffix(q)), q.answer,
                  tuple(encode(choice_text(c)) for c in q.choices), q.answer_index, workload)
        for j in range(questions_per_document) for d in range(num_documents) for q in [documents[d].questions[j]]
    ]
    return documents, document_ids, questions


def _chat_questions(tokenizer, documents: Sequence[Document], questions_per_document: int,
                    encode) -> tuple[list[list[int]], list[QARequest]]:
    """Chat documents (a system message each) and questions (the user turn after it), rendered with the tokenizer's
    chat template; a document's ids are what every rendered question starts with."""
    def render(messages: list[dict]) -> list[int]:
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))

    systems = [{"role": "system", "content": d.text} for d in documents]
    questions = []
    for j in range(questions_per_document):
        for d, document in enumerate(documents):
            q = document.questions[j]
            messages = [systems[d], {"role": "user", "content": q.question}]
            prefix = encode(q.answer_prefix)
            questions.append(QARequest(d, render(messages), q.answer, tuple(encode(choice_text(c)) for c in q.choices),
                                       q.answer_index, "chat", messages, prefix))
    # As the server finds a document given as messages: what their renders followed by any user turn share.
    document_ids = [common_prefix([render([system, {"role": "user", "content": probe}]) for probe in PROBES])
                    for system in systems]
    return document_ids, questions


def document_questions(document_ids: Sequence[list[int]], questions: Sequence[QARequest]) -> list[list[list[int]]]:
    """Each document's questions as the token ids that follow it: what a question-aware registration takes."""
    asked: list[list[list[int]]] = [[] for _ in document_ids]
    for question in questions:
        asked[question.document].append(question.prompt[len(document_ids[question.document]) :])
    return asked


APIS = ("openai", "native")


def complete(url: str, prompt: list[int], max_tokens: int, api_key: str | None = None, timeout: float = 600,
             headers: Mapping[str, str] | None = None, api: str = "openai", ignore_eos: bool = False) -> Answer:
    """One streaming greedy request for a prompt of token ids: ``/v1/completions`` (``api="openai"``) or
    SGLang's ``/generate`` (``"native"``: sglang-router's completions route takes text prompts only);
    ``headers`` are added (a router's routing key, for example); ``ignore_eos``: exactly ``max_tokens``."""
    if api == "openai":
        path, body = "/v1/completions", {"model": "default", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                         "stream": True, "stream_options": {"include_usage": True}, "logprobs": 0,
                                         "ignore_eos": ignore_eos}
    elif api == "native":
        path, body = "/generate", {"input_ids": prompt, "stream": True,
                                   "sampling_params": {"max_new_tokens": max_tokens, "temperature": 0, "ignore_eos": ignore_eos}}
    else:
        raise ValueError(f"api must be one of {APIS}, got {api!r}")
    headers = {"Content-Type": "application/json", **(headers or {})}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    start = time.perf_counter()
    first, text, count, meta, tokens, arrivals = None, "", 0, {}, [], []
    try:
        request = urllib.request.Request(f"{url}{path}", json.dumps(body).encode(), headers)
        with urllib.request.urlopen(request, timeout=timeout) as response:
            for line in response:
                line = line.strip()
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if api == "openai":
                    for choice in chunk.get("choices", []):
                        text += choice.get("text") or ""
                        tokens += (choice.get("logprobs") or {}).get("tokens") or []
                    count = (chunk.get("usage") or {}).get("completion_tokens", count)
                else:  # the whole text and output so far, in every chunk
                    text, meta, tokens = chunk["text"], chunk["meta_info"], chunk["output_ids"]
                    count = meta["completion_tokens"]
                    arrivals.append((time.perf_counter() - start, count))
                if text and first is None:
                    first = time.perf_counter() - start
    except (urllib.error.URLError, OSError, ValueError, KeyError) as error:
        return Answer("", 0.0, time.perf_counter() - start, 0, error=str(error))
    latency = time.perf_counter() - start
    document = (meta.get("am_document") or [{}])[0].get("doc_id")
    return Answer(text, first if first is not None else latency, latency, count, cached_tokens=meta.get("cached_tokens"),
                  document=document, tokens=tokens, arrivals=arrivals)


def chat(url: str, messages: list[dict], max_tokens: int, api_key: str | None = None, timeout: float = 600) -> Answer:
    """One streaming greedy ``/v1/chat/completions`` request through the ``openai`` client."""
    from openai import OpenAI, OpenAIError

    client = OpenAI(base_url=f"{url}/v1", api_key=api_key or "none", timeout=timeout, max_retries=0)
    start = time.perf_counter()
    first, text, count, tokens = None, "", 0, []
    try:
        stream = client.chat.completions.create(model="default", messages=messages, max_tokens=max_tokens, temperature=0,
                                                logprobs=True, stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            for choice in chunk.choices:
                text += choice.delta.content or ""
                tokens += [entry.token for entry in (choice.logprobs.content or [])] if choice.logprobs else []
            if chunk.usage is not None:
                count = chunk.usage.completion_tokens
            if text and first is None:
                first = time.perf_counter() - start
    except OpenAIError as error:
        return Answer("", 0.0, time.perf_counter() - start, 0, error=str(error))
    latency = time.perf_counter() - start
    return Answer(text, first if first is not None else latency, latency, count, tokens=tokens)


def ask_all(url: str, questions: Sequence[QARequest], concurrency: int, max_tokens: int,
            api_key: str | None = None, progress: str | None = None,
            route: Callable[[QARequest], Mapping[str, str]] | None = None, api: str = "openai",
            ) -> tuple[list[Answer], float]:
    """Every question, ``concurrency`` at a time (``complete``; a chat question through the OpenAI API: ``chat``);
    the answers in order and the wall-clock seconds. ``route`` gives each question's extra headers (a router's
    routing key)."""
    if concurrency < 1 or max_tokens < 1:
        raise ValueError("concurrency and max_tokens must be >= 1")
    start = time.perf_counter()

    def ask(question: QARequest) -> Answer:
        if question.messages is not None and api == "openai":
            return chat(url, question.messages, max_tokens, api_key)
        return complete(url, question.prompt, max_tokens, api_key, headers=route(question) if route else None, api=api)

    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(ask, q) for q in questions]
        answers = [f.result() for f in tqdm(futures, desc=progress, disable=progress is None, unit="req")]
    return answers, time.perf_counter() - start


def choice_logprobs(url: str, question: QARequest, api_key: str | None = None) -> list[float]:
    """The summed log-probability of each choice's tokens after the question's prompt (one batch request)."""
    sampling = {"max_new_tokens": 1, "temperature": 0}
    # SGLang gives no log-prob for the token at logprob_start_len itself: start one before the choice.
    prompt = question.prompt + question.choice_prefix
    status, body = http_json("POST", f"{url}/generate", {
        "input_ids": [prompt + choice for choice in question.choices], "sampling_params": sampling,
        "return_logprob": True, "logprob_start_len": len(prompt) - 1,
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


def summarize(questions: Sequence[QARequest], answers: Sequence[Answer], wall_seconds: float,
              reference: Sequence[Answer] | None = None) -> dict:
    """Short-answer accuracy (``QARequest.is_correct``), throughput and latency percentiles, and with the full
    prefix's answers (``reference``) the answers' agreement with them."""
    done = [a for a in answers if a.error is None]
    correct = sum(a.error is None and q.is_correct(a.text) for q, a in zip(questions, answers))
    agreed = None if reference is None else sum(agreement(r, a) for r, a in zip(reference, answers)) / len(answers)

    def percentile(values: list[float], p: float) -> float | None:
        if not values:
            return None
        return statistics.quantiles(values, n=100, method="inclusive")[p - 1] if len(values) > 1 else values[0]

    ttft, latency = [a.ttft for a in done], [a.latency for a in done]
    return {
        "requests": len(answers),
        "errors": len(answers) - len(done),
        "accuracy": correct / len(answers),
        **({} if agreed is None else {"agreement": round(agreed, 4)}),
        "wall_seconds": round(wall_seconds, 3),
        "request_throughput": round(len(done) / wall_seconds, 3),
        "output_tokens_per_second": round(sum(a.completion_tokens for a in done) / wall_seconds, 3),
        "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
        "latency_p50": percentile(latency, 50), "latency_p99": percentile(latency, 99),
    }
