"""A registration's own requests, sent through the server's generation path like any client's.

Capture requests are ordinary prefills, tagged by ``hooks`` so that the forward records their queries:
context-prefill (the document itself), repeat-prefill (document + repeat instruction + document), the
questions (each after the document, with the full context's top next-token log-probabilities kept as the
fidelity reference), and self-study (the server samples answers to the self-study prompts, which are then
teacher-forced). Once the document is installed, ``next_token_kl`` asks each question again, now served
from it. With ``--dp-size N`` every request goes to the rank that compacts the document.
"""

from __future__ import annotations

import asyncio
import time
from http import HTTPStatus

from ..prompts import SELF_STUDY_PROMPTS, instruction_ids, repeat_ids
from . import fidelity
from .capture import capture_salt
from .errors import DocumentError
from .registration import RegistrationRequest

SELF_STUDY_SAMPLING = {"temperature": 0.7, "top_p": 0.8, "top_k": 20}


class CaptureRequests:
    def __init__(self, tokenizer_manager, num_ranks: int):
        self.tokenizer_manager, self.num_ranks = tokenizer_manager, num_ranks

    async def capture(self, doc_id: str, salt: str, ids: list[int], request: RegistrationRequest,
                       rank: int) -> tuple[dict, list[tuple[list[int], list]]]:
        """Run the capture requests; their stage timings, and each question with the full context's top
        next-token log-probabilities at its answer position (``fidelity``)."""
        tokenizer = self.tokenizer_manager.tokenizer
        length, sources = len(ids), request.query_source
        if tokenizer is None and {"repeat-prefill", "self-study"} & set(sources):
            raise ValueError("repeat-prefill and self-study need the server's tokenizer")
        timings = {"prefill_seconds": 0.0, "self_study_seconds": 0.0}
        start = time.perf_counter()
        captures = []
        if "context-prefill" in sources:
            captures.append(self._capture_one(doc_id, salt, "context-prefill", ids, 0, length, rank))
        if "repeat-prefill" in sources:
            between = repeat_ids(tokenizer)
            captures.append(self._capture_one(doc_id, salt, "repeat-prefill", ids + between + ids,
                                              length + len(between), 2 * length + len(between), rank))
        await asyncio.gather(*captures)
        timings["prefill_seconds"] = round(time.perf_counter() - start, 4)
        references = []
        if "questions" in sources:
            start = time.perf_counter()
            questions = [list(question) for question in request.questions]

            async def ask(question: list[int]) -> tuple[list[int], list]:
                output = await self._capture_one(doc_id, salt, "questions", ids + question, length,
                                                 length + len(question), rank, top_logprobs=fidelity.TOP_TOKENS)
                return question, fidelity.reference_tokens(output["meta_info"])

            if "repeat-prefill" not in sources:  # the first question prefills the document for the others
                references.append(await ask(questions[0]))
            references += await asyncio.gather(*(ask(question) for question in questions[len(references):]))
            timings["questions_seconds"] = round(time.perf_counter() - start, 4)
        if "self-study" in sources:
            start = time.perf_counter()
            starters = [instruction_ids(tokenizer, "\n\n" + prompt) for prompt in SELF_STUDY_PROMPTS.values()]
            answers = await asyncio.gather(*(self._sample(ids + starter, request.self_study_max_new_tokens)
                                             for starter in starters))
            sequences = [ids + starter + answer for starter, answer in zip(starters, answers)]
            await asyncio.gather(*(self._capture_one(doc_id, salt, "self-study", sequence, length, len(sequence), rank)
                                   for sequence in sequences))
            timings["self_study_seconds"] = round(time.perf_counter() - start, 4)
        return timings, references

    async def next_token_kl(self, doc_id: str, ids: list[int], references: list[tuple[list[int], list]],
                             rank: int) -> dict:
        """Each question once more, now served from the compacted document: the KL against the full context."""
        async def probe(question: list[int], reference: list) -> float:
            params = {"max_new_tokens": 1, "temperature": 0.0, "custom_params": {"am_op": "probe", "am_doc_id": doc_id}}
            output = await self._generate(ids + question, params, rank=rank, return_logprob=True,
                                          token_ids_logprob=[token for token, _ in reference])
            return fidelity.next_token_kl(reference, fidelity.probed_logprobs(output["meta_info"]))

        start = time.perf_counter()
        kls = await asyncio.gather(*(probe(question, reference) for question, reference in references))
        return {**fidelity.summary(kls), "probe_seconds": round(time.perf_counter() - start, 4)}

    async def _generate(self, input_ids: list[int], sampling_params: dict, cache_salt: str | None = None,
                        rank: int | None = None, **logprobs) -> dict:
        """One internal request (``logprobs``: SGLang's log-probability fields); its last output."""
        from sglang.srt.managers.io_struct import GenerateReqInput

        routed = rank if self.num_ranks > 1 else None
        obj = GenerateReqInput(input_ids=input_ids, sampling_params=sampling_params, cache_salt=cache_salt,
                               routed_dp_rank=routed, **logprobs)
        output = None
        async for item in self.tokenizer_manager.generate_request(obj, None):
            output = item  # the last one carries the finish reason
        reason = (output or {}).get("meta_info", {}).get("finish_reason") or {}
        if reason.get("type") == "abort":
            raise DocumentError(HTTPStatus.SERVICE_UNAVAILABLE, f"capture request failed: {reason.get('message')}")
        return output

    async def _capture_one(self, doc_id: str, salt: str, source: str, input_ids: list[int], start: int, stop: int,
                           rank: int, top_logprobs: int = 0) -> dict:
        """One capture request, on the rank that compacts the document; with ``top_logprobs``, its output
        carries that many of the most likely next tokens."""
        params = {"am_op": "capture", "am_doc_id": doc_id, "am_source": source, "am_from": start, "am_to": stop}
        logprobs = {"return_logprob": True, "top_logprobs_num": top_logprobs} if top_logprobs else {}
        return await self._generate(input_ids, {"max_new_tokens": 1, "temperature": 0.0, "custom_params": params},
                                    cache_salt=capture_salt(salt, source), rank=rank, **logprobs)

    async def _sample(self, input_ids: list[int], max_new_tokens: int) -> list[int]:
        params = {"max_new_tokens": max_new_tokens, "custom_params": {"am_op": "sample"}, **SELF_STUDY_SAMPLING}
        output = await self._generate(input_ids, params)
        return list(output["output_ids"])
