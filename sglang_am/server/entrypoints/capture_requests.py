"""A registration's own requests, sent through the server's generation path like any client's.

Capture requests are ordinary prefills, tagged by ``hooks`` so that the forward records their queries:
context-prefill (the document itself), repeat-prefill (document + repeat instruction + document), the
questions, and self-study (the server samples answers to the self-study prompts, which are then
teacher-forced). A question's answer is generated first with the full prefix (``answer_tokens``, greedy
unless ``answer_temperature``) unless the client gave it; the capture then teacher-forces question and
answer after the document, so the node is fitted to the positions a request computes while it answers
(decode steps included), and keeps the full context's top next-token log-probabilities at the answer
positions as the fidelity reference (``fidelity.AnswerReference``). ``answer_figures`` asks questions of
an installed node, or of a certifying registration's candidate; ``full_context_references`` makes the
references of requests a learned document observed, for its candidate. With ``--dp-size N`` every request goes
to the rank that compacts the document.
"""

from __future__ import annotations

import asyncio
import time
from http import HTTPStatus

from ...prompts import SELF_STUDY_PROMPTS, instruction_ids, repeat_ids
from ..errors import DocumentError
from ..registration import DEFAULT_ANSWER_TOKENS, RegistrationRequest
from ..scheduler.capture import capture_salt
from . import fidelity

SELF_STUDY_SAMPLING = {"temperature": 0.7, "top_p": 0.8, "top_k": 20}


class CaptureRequests:
    def __init__(self, tokenizer_manager, num_ranks: int):
        self.tokenizer_manager, self.num_ranks = tokenizer_manager, num_ranks

    async def capture(self, doc_id: str, salt: str, ids: list[int], request: RegistrationRequest,
                      rank: int) -> tuple[dict, list[fidelity.AnswerReference]]:
        """Run the capture requests; their stage timings, and each question's reference (``fidelity``)."""
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
            references = await self._capture_questions(doc_id, salt, ids, request, rank,
                                                       prefilled="repeat-prefill" in sources)
            timings["questions_seconds"] = round(time.perf_counter() - start, 4)
        if "self-study" in sources:
            start = time.perf_counter()
            starters = [instruction_ids(tokenizer, "\n\n" + prompt) for prompt in SELF_STUDY_PROMPTS.values()]
            answers = await asyncio.gather(*(self._sample(ids + starter, request.self_study_max_new_tokens)
                                             for starter in starters))
            sequences = [ids + starter + answer for starter, answer in zip(starters, answers)]
            await asyncio.gather(*(self._capture_one(doc_id, salt, "self-study", sequence, length, len(sequence), rank,
                                                     part=index) for index, sequence in enumerate(sequences)))
            timings["self_study_seconds"] = round(time.perf_counter() - start, 4)
        return timings, references

    async def _capture_questions(self, doc_id: str, salt: str, ids: list[int], request: RegistrationRequest, rank: int,
                                 prefilled: bool) -> list[fidelity.AnswerReference]:
        """Each question's answer (given, or generated with the full prefix), then the question and its answer
        teacher-forced after the document; each question's reference, in the order given."""
        length = len(ids)
        params = {"max_new_tokens": request.answer_tokens, "temperature": request.answer_temperature,
                  "custom_params": {"am_op": "sample"}}

        async def answer(index: int) -> list[int]:
            output = await self._generate(ids + list(request.questions[index]), params, cache_salt=salt, rank=rank)
            return list(output["output_ids"])

        async def capture(index: int, answer: list[int]) -> fidelity.AnswerReference:
            prompt = list(request.questions[index])
            stop = length + len(prompt) + len(answer)
            output = await self._capture_one(doc_id, salt, "questions", ids + prompt + answer, length, stop, rank,
                                             top_logprobs=fidelity.TOP_TOKENS, part=index, answer_from=length + len(prompt))
            return fidelity.AnswerReference(prompt, answer, fidelity.reference_top(output["meta_info"], len(prompt)))

        count = len(request.questions)
        generated = [index for index in range(count) if request.answers[index] is None and request.answer_tokens]
        answers = {index: list(request.answers[index] or ()) for index in range(count) if index not in generated}
        answers.update(await self._first_then_rest(answer, generated, prefilled))
        prefilled = prefilled or bool(generated)
        captured = await self._first_then_rest(lambda index: capture(index, answers[index]), list(range(count)), prefilled)
        return [captured[index] for index in range(count)]

    @staticmethod
    async def _first_then_rest(run, indexes: list[int], prefilled: bool) -> dict:
        """``{index: await run(index)}``, side by side; unless the document is ``prefilled`` already, the first runs
        alone and prefills it for the others, which then share its KV."""
        done = {}
        if indexes and not prefilled:
            done[indexes[0]] = await run(indexes[0])
            indexes = indexes[1:]
        return {**done, **dict(zip(indexes, await asyncio.gather(*(run(index) for index in indexes))))}

    async def ask_as_traffic(self, ids: list[int], questions, rank: int) -> None:
        """A learned document's ``questions`` after its prefix ``ids``, each asked on ``rank`` as a client's greedy
        request (``DEFAULT_ANSWER_TOKENS`` of answer): served in full, the document observes them as it observes
        any request that reuses it."""
        params = {"max_new_tokens": DEFAULT_ANSWER_TOKENS, "temperature": 0.0}
        await asyncio.gather(*(self._generate(ids + list(question), params, rank=rank) for question in questions))

    async def full_context_references(self, ids: list[int], served: list[dict], rank: int) -> list[fidelity.AnswerReference]:
        """References for requests that were served with the full prefix ``ids`` (each ``prompt`` after it and the
        ``answer`` it got): each teacher-forced once more with the full prefix (which the tree still holds),
        asking the top tokens at its answer positions; counted nowhere and observed by no document."""
        async def reference(request: dict) -> fidelity.AnswerReference:
            prompt, answer = request["prompt"], request["answer"]
            output = await self._generate(ids + prompt + answer, {"max_new_tokens": 1, "temperature": 0.0,
                                                                  "custom_params": {"am_op": "sample"}},
                                          rank=rank, return_logprob=True, logprob_start_len=len(ids),
                                          top_logprobs_num=fidelity.TOP_TOKENS)
            return fidelity.AnswerReference(prompt, answer, fidelity.reference_top(output["meta_info"], len(prompt)))

        return list(await asyncio.gather(*(reference(request) for request in served)))

    async def full_context_agreement(self, ids: list[int], served: list[dict], rank: int) -> dict:
        """What requests served by a node (each ``prompt`` after the prefix ``ids`` and the ``answer`` the node gave)
        would have been answered with the full prefix, greedily: the share of their answer tokens the node's answers
        got right. Served in full (the radix cache's copy of the prefix, or one prefill that the rest share),
        counted nowhere and observed by no document."""
        async def agreed(request: dict) -> list[bool]:
            answer = request["answer"]
            output = await self._generate(ids + request["prompt"], {"max_new_tokens": len(answer), "temperature": 0.0,
                                                                    "custom_params": {"am_op": "sample"}}, rank=rank)
            return fidelity.agreement(output["output_ids"], answer)

        start = time.perf_counter()
        agreements = await self._first_then_rest(lambda index: agreed(served[index]), list(range(len(served))), False)
        tokens = [token for index in range(len(served)) for token in agreements[index]]
        return {"agreement": round(sum(tokens) / max(1, len(tokens)), 4), "requests": len(served),
                "seconds": round(time.perf_counter() - start, 4)}

    async def answer_figures(self, doc_id: str, salt: str, ids: list[int], references: list[fidelity.AnswerReference],
                             rank: int, candidate: bool = False) -> dict:
        """``references``' questions asked of the installed document (or of its ``candidate``), by probes that
        carry the registration's ``salt``: ``fidelity.summary``."""
        custom = {"am_op": "probe", "am_doc_id": doc_id, "am_salt": salt, **({"am_version": "candidate"} if candidate else {})}

        async def probe(reference: fidelity.AnswerReference) -> fidelity.AnswerFigures:
            prompt, expected = reference.prompt, reference.greedy
            greedy = self._generate(ids + prompt, {"max_new_tokens": len(expected), "temperature": 0.0,
                                                   "custom_params": custom}, rank=rank)
            forced = self._generate(ids + prompt + reference.answer, {"max_new_tokens": 1, "temperature": 0.0,
                                                                       "custom_params": custom},
                                    rank=rank, return_logprob=True, logprob_start_len=len(ids),
                                    token_ids_logprob=reference.tokens)
            greedy, forced = await asyncio.gather(greedy, forced)
            probed = fidelity.probed_logprobs(forced["meta_info"], len(prompt))
            return fidelity.AnswerFigures(fidelity.agreement(expected, greedy["output_ids"]),
                                          [fidelity.next_token_kl(top, logprobs) for top, logprobs in zip(reference.top, probed)])

        start = time.perf_counter()
        figures = await asyncio.gather(*(probe(reference) for reference in references))
        return {**fidelity.summary(figures), "probe_seconds": round(time.perf_counter() - start, 4)}

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
                           rank: int, top_logprobs: int = 0, part: int = 0, answer_from: int | None = None) -> dict:
        """One capture request, on the rank that compacts the document; with ``top_logprobs``, its output carries
        that many of the most likely next tokens at every position from ``start`` on. SGLang then matches no
        more of the prompt than ``start`` in the radix tree (``logprob_start_len``), so the capture computes
        every position it records even where another request cached them."""
        params = {"am_op": "capture", "am_doc_id": doc_id, "am_source": source, "am_from": start, "am_to": stop,
                  "am_part": part, **({"am_answer": answer_from} if answer_from is not None else {})}
        logprobs = {"return_logprob": True, "top_logprobs_num": top_logprobs, "logprob_start_len": start} if top_logprobs else {}
        return await self._generate(input_ids, {"max_new_tokens": 1, "temperature": 0.0, "custom_params": params},
                                    cache_salt=capture_salt(salt, source), rank=rank, **logprobs)

    async def _sample(self, input_ids: list[int], max_new_tokens: int) -> list[int]:
        params = {"max_new_tokens": max_new_tokens, "custom_params": {"am_op": "sample"}, **SELF_STUDY_SAMPLING}
        output = await self._generate(input_ids, params)
        return list(output["output_ids"])
