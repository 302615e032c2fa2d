"""Document operations in SGLang's main process, shared by the HTTP routes and the Engine client.

Registering a document: validate the request (``RegistrationRequest``), ``prepare`` on the scheduler
(which answers with an existing document for a duplicate), run the capture requests through the
server's own generation path (context-prefill: the document itself; repeat-prefill: document + repeat
instruction + document; self-study: the server samples answers to the self-study prompts, which are
then teacher-forced), then ``advance`` until the scheduler reports the document ready (the solve runs
on a scheduler worker thread). A drop while that runs cancels it: its capture requests are aborted and
the registration answers 409. Every scheduler operation is one call on the ``channel``, and none waits
longer than the configured RPC timeout.

With ``--dp-size N`` every operation acts on every data-parallel rank. A registration is prepared (and
admitted) on all of them first, so that one rank without room refuses it with nothing left behind on
the others; then one rank, the primary (the ranks take turns by document id), captures and compacts,
and the others install its copy from a handoff file: compacted once, the same slots on every rank.
Loads read the store on every rank; a document is ready when every rank holds it.

``AutoCompactor`` is the HTTP process's side of automatic compaction: it polls the scheduler for the
prefixes its reuse tracker proposes and loads (from the store) or registers them, two at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from http import HTTPStatus

from ..prompts import SELF_STUDY_PROMPTS, instruction_ids, repeat_ids
from . import fidelity
from .auto import AutoPolicy
from .capture import capture_salt
from .channel import SchedulerChannel
from .chat import ChatRenderer
from .config import ServerConfig
from .errors import DocumentError
from .registration import MIN_DOCUMENT_TOKENS, RegistrationRequest, check_vocabulary
from .registry import DocState, document_id

logger = logging.getLogger(__name__)
SELF_STUDY_SAMPLING = {"temperature": 0.7, "top_p": 0.8, "top_k": 20}
POLL_SECONDS = 0.05
GUARD_REFUSALS_BEFORE_PAUSE = 3  # automatic prefixes in a row the fidelity guard refused, before a pause


class DocumentService:
    """Every document operation, on every data-parallel rank (one rank without ``--dp-size``)."""

    def __init__(self, tokenizer_manager, channel: SchedulerChannel, config: ServerConfig,
                 chat: ChatRenderer | None = None):
        self.tokenizer_manager, self.channel, self.config = tokenizer_manager, channel, config
        self.chat = chat  # the HTTP server's chat API, for documents given as messages (an Engine has none)
        self._registrations: dict[str, asyncio.Task] = {}  # doc_id -> its capture and compaction in progress

    # ----- calls to the ranks -----

    def _failure(self, rank: int, error: DocumentError) -> DocumentError:
        """``error``, naming its rank when there are several."""
        if self.channel.num_ranks == 1:
            return error
        return DocumentError(error.status, f"DP rank {rank}: {error.message}")

    async def _on(self, rank: int, op: str, **payload) -> dict:
        """``op`` on one rank; its error raised."""
        answer = (await self.channel.call(op, ranks=[rank], **payload))[rank]
        if isinstance(answer, DocumentError):
            raise self._failure(rank, answer)
        return answer

    async def _on_each(self, op: str, ranks: list[int] | None = None, **payload) -> list:
        """``op`` on ``ranks`` (all by default); each rank's result or error, None for the others."""
        return await self.channel.call(op, ranks=ranks, **payload)

    async def _on_all(self, op: str, ranks: list[int] | None = None, **payload) -> list:
        """``op`` on ``ranks`` (all by default); the first error raised."""
        answers = await self._on_each(op, ranks, **payload)
        for rank, answer in enumerate(answers):
            if isinstance(answer, DocumentError):
                raise self._failure(rank, answer)
        return answers

    # ----- registration -----

    async def register(self, **fields) -> dict:
        return await self._register(RegistrationRequest.from_client(self.config, **fields), auto=False)

    async def _register(self, request: RegistrationRequest, auto: bool) -> dict:
        if request.adapt and self.channel.num_ranks > 1:  # each rank would learn from its own share of the traffic
            raise DocumentError(HTTPStatus.NOT_IMPLEMENTED, "adapt with --dp-size > 1 is not supported yet")
        ids = self._document_ids(request)
        request = request.with_question_ids(self.config, self._encode_question)
        vocab_size = self.tokenizer_manager.model_config.vocab_size
        check_vocabulary("input_ids", ids, vocab_size)
        for index, question in enumerate(request.questions):
            check_vocabulary(f"questions[{index}]", question, vocab_size)
        doc_id = document_id(ids)
        while True:
            held = await self._held(doc_id)
            ready = [rank for rank, doc in enumerate(held) if doc is not None and doc["state"] == DocState.READY.value]
            # A rank that holds it already hands it to the others; else the ranks take turns compacting.
            primary = ready[0] if ready else int(doc_id, 16) % self.channel.num_ranks
            answers = await self._on_each("prepare", request=request.to_payload(), input_ids=ids, auto=auto,
                                          primary=primary)
            new = [rank for rank, answer in enumerate(answers) if isinstance(answer, dict) and not answer["existing"]]
            failed = next(((rank, answer) for rank, answer in enumerate(answers) if isinstance(answer, DocumentError)), None)
            busy = [answer for answer in answers if isinstance(answer, dict) and answer["existing"]
                    and answer["state"] != DocState.READY.value]
            if failed is not None or busy:
                await self._abandon(doc_id, new)
                if failed is not None:  # nothing is left behind on the ranks that could take it
                    raise self._failure(*failed)
                # A concurrent registration or load of the same document: wait for it, then ask again, since it may
                # have failed or been replaced meanwhile (an explicit request must find the ready one explicit).
                await self._wait_settled(doc_id)
                continue
            if not new:
                return {**self._merge(answers), "existing": True}
            break
        work = asyncio.create_task(self._capture_and_compact(doc_id, answers, primary, new, ids, request))
        self._registrations[doc_id] = work
        try:
            return {**await work, "existing": False}
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # the client went away
                raise
            raise DocumentError(HTTPStatus.CONFLICT, f"document {doc_id} was dropped while it was being registered") from None
        finally:
            self._registrations.pop(doc_id, None)

    def _document_ids(self, request: RegistrationRequest) -> list[int]:
        if request.input_ids is not None:
            return list(request.input_ids)
        if request.messages is None:
            return self._encode(request.text)
        if self.chat is None:
            raise ValueError("messages need the HTTP server's chat API; an Engine registers text or input_ids")
        ids = self.chat.document_ids(request.messages)
        if not MIN_DOCUMENT_TOKENS <= len(ids) <= self.config.max_document_tokens:
            raise ValueError(f"messages render to a document of {len(ids)} tokens; this server takes "
                             f"{MIN_DOCUMENT_TOKENS} to {self.config.max_document_tokens}")
        return ids

    def _encode(self, text: str) -> list[int]:
        tokenizer = self.tokenizer_manager.tokenizer
        if tokenizer is None:
            raise ValueError("this server runs without a tokenizer: register input_ids instead of text")
        ids = tokenizer.encode(text)
        if len(ids) > self.config.max_document_tokens:
            raise ValueError(f"text has {len(ids)} tokens; this server takes at most {self.config.max_document_tokens}")
        return ids

    def _encode_question(self, text: str) -> list[int]:
        tokenizer = self.tokenizer_manager.tokenizer
        if tokenizer is None:
            raise ValueError("this server runs without a tokenizer: give questions as token ids")
        return tokenizer.encode(text, add_special_tokens=False)

    async def _held(self, doc_id: str) -> list[dict | None]:
        """Each rank's description of ``doc_id``, None where it has none."""
        answers = await self._on_each("get", doc_id=doc_id)
        for rank, answer in enumerate(answers):
            if isinstance(answer, DocumentError) and answer.status != HTTPStatus.NOT_FOUND:
                raise self._failure(rank, answer)
        return [answer if isinstance(answer, dict) else None for answer in answers]

    async def _abandon(self, doc_id: str, ranks: list[int], ready_too: bool = False) -> None:
        if ranks:
            with contextlib.suppress(DocumentError):  # whatever was left of it on those ranks
                await self._on_each("abandon", ranks, doc_id=doc_id, ready_too=ready_too)

    async def _capture_and_compact(self, doc_id: str, prepared: list, primary: int, new: list[int], ids: list[int],
                                   request: RegistrationRequest) -> dict:
        try:
            references = []
            if primary in new:
                timings, references = await self._capture(doc_id, prepared[primary]["salt"], ids, request, primary)
                await self._until_ready(primary, await self._on(primary, "advance", doc_id=doc_id, timings=timings))
            waiting = [rank for rank in new if rank != primary]
            handoff_seconds = await self._hand_off(doc_id, primary, waiting) if waiting else None
            if references:  # every rank holds the same copy: one measures it, each records it
                figures = await self._next_token_kl(doc_id, ids, references, primary)
                await self._on_all("note_fidelity", new, doc_id=doc_id, figures=figures)
            merged = await self._described_after(doc_id, "registered")
            if handoff_seconds is not None:
                merged["timings"] = {**merged["timings"], "handoff_seconds": handoff_seconds}
            return merged
        except BaseException as error:
            await self._abandon(doc_id, new, ready_too=True)
            if isinstance(error, DocumentError) and error.status == HTTPStatus.NOT_FOUND:
                # A registering document disappears only when it is dropped.
                raise DocumentError(HTTPStatus.CONFLICT, f"document {doc_id} was dropped while it was being registered") from None
            raise

    async def _hand_off(self, doc_id: str, source: int, ranks: list[int]) -> float:
        """Install the ready copy of rank ``source`` on the waiting ``ranks``: written once, read by each;
        the seconds it took."""
        start = time.perf_counter()
        handoff = (await self._until_done(source, await self._on(source, "export", doc_id=doc_id)))["handoff"]
        try:
            answers = await self._on_all("advance", ranks, doc_id=doc_id, handoff=handoff)
            for rank in ranks:
                await self._until_ready(rank, answers[rank])
        finally:
            with contextlib.suppress(DocumentError):
                await self._on(source, "release_handoff", handoff=handoff)
        seconds = round(time.perf_counter() - start, 4)
        logger.info("sglang-am: document %s handed from DP rank %d to %s in %.3f s", doc_id, source, ranks, seconds)
        return seconds

    async def _wait_settled(self, doc_id: str) -> None:
        """Until no rank is registering or loading ``doc_id``."""
        while any(doc is not None and doc["state"] != DocState.READY.value for doc in await self._held(doc_id)):
            await asyncio.sleep(POLL_SECONDS * 4)

    async def _capture(self, doc_id: str, salt: str, ids: list[int], request: RegistrationRequest,
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

    async def _next_token_kl(self, doc_id: str, ids: list[int], references: list[tuple[list[int], list]],
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

        routed = rank if self.channel.num_ranks > 1 else None
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

    async def _until_ready(self, rank: int, described: dict) -> dict:
        """Poll ``advance`` on ``rank`` until the document is ready there (a failure raises its error)."""
        while described["state"] != DocState.READY.value:
            await asyncio.sleep(POLL_SECONDS)
            described = await self._on(rank, "advance", doc_id=described["doc_id"])
        return described

    async def _until_done(self, rank: int, started: dict) -> dict:
        """Poll a job of ``rank`` until it is done; its result, or its error raised."""
        result = {"done": False}
        while not result["done"]:
            await asyncio.sleep(POLL_SECONDS)
            result = await self._on(rank, "job", job=started["job"])
        del result["done"]
        return result

    # ----- the other operations -----

    def _merge(self, described: list[dict | None]) -> dict:
        """One document as the ranks describe it (None where a rank has none): ready when every rank has it
        ready, "partial" when only some have; requests counted over the ranks, and each rank's state."""
        held = {rank: doc for rank, doc in enumerate(described) if doc is not None}
        states = {str(rank): doc["state"] for rank, doc in held.items()}
        ready = [doc for doc in held.values() if doc["state"] == DocState.READY.value]
        merged = {**(ready[0] if ready else next(iter(held.values()))), "ranks": states}
        if len(ready) != len(held):
            merged["state"] = next(doc["state"] for doc in held.values() if doc["state"] != DocState.READY.value)
        elif len(held) < self.channel.num_ranks:
            merged["state"] = "partial"
        merged["requests_served"] = sum(doc["requests_served"] for doc in held.values())
        merged["requests_active"] = sum(doc["requests_active"] for doc in held.values())
        return merged

    async def _described_after(self, doc_id: str, operation: str) -> dict:
        """The document as the ranks hold it once ``operation`` finished; 409 if a drop took it meanwhile."""
        held = await self._held(doc_id)
        if not any(held):
            raise DocumentError(HTTPStatus.CONFLICT, f"document {doc_id} was dropped while it was being {operation}")
        return self._merge(held)

    async def list(self) -> dict:
        per_rank: dict[str, list[dict | None]] = {}
        for rank, answer in enumerate(await self._on_all("list")):
            for doc in answer["documents"]:
                per_rank.setdefault(doc["doc_id"], [None] * self.channel.num_ranks)[rank] = doc
        return {"documents": [self._merge(described) for described in per_rank.values()]}

    async def get(self, doc_id: str) -> dict:
        held = await self._held(doc_id)
        if not any(held):
            raise DocumentError(HTTPStatus.NOT_FOUND, f"no document {doc_id}")
        return self._merge(held)

    async def drop(self, doc_id: str) -> dict:
        """Drop a document in any state, on every rank; a registration in progress is cancelled. Ranks where
        requests use it keep it (409, naming them); the others drop it."""
        answers = await self._on_each("drop", doc_id=doc_id)
        registration = self._registrations.get(doc_id)
        if registration is not None:
            registration.cancel()
        dropped = [answer for answer in answers if isinstance(answer, dict)]
        errors = [(rank, answer) for rank, answer in enumerate(answers)
                  if isinstance(answer, DocumentError) and answer.status != HTTPStatus.NOT_FOUND]
        if errors:
            if not dropped:
                raise self._failure(*errors[0])
            ranks = ", ".join(str(rank) for rank, _ in errors)
            raise DocumentError(errors[0][1].status, f"document {doc_id} was dropped on {len(dropped)} DP rank(s) but not "
                                f"on rank {ranks}: {errors[0][1].message}")
        if not dropped:
            raise DocumentError(HTTPStatus.NOT_FOUND, f"no document {doc_id}")
        result = {**dropped[0], "freed_slots": sum(answer["freed_slots"] for answer in dropped)}
        return result

    async def save(self, doc_id: str) -> dict:
        """Write the document to the store, from a rank that holds it ready (every rank holds the same copy)."""
        held = await self._held(doc_id)
        source = next((rank for rank, doc in enumerate(held) if doc is not None and doc["state"] == DocState.READY.value),
                      next((rank for rank, doc in enumerate(held) if doc is not None), 0))  # that rank says what is wrong
        return await self._until_done(source, await self._on(source, "save", doc_id=doc_id))

    async def load(self, doc_id: str, auto: bool = False) -> dict:
        """Install a stored document on every rank that lacks it (each reads the store); if one cannot, none keeps it."""
        answers = await self._on_each("load", doc_id=doc_id, auto=auto)
        started = [rank for rank, answer in enumerate(answers) if isinstance(answer, dict) and not answer["existing"]]
        try:
            for rank, answer in enumerate(answers):
                if isinstance(answer, DocumentError):
                    raise self._failure(rank, answer)
            for rank in started:
                await self._until_ready(rank, answers[rank])
        except BaseException:
            await self._abandon(doc_id, started, ready_too=True)
            raise
        return {**await self._described_after(doc_id, "loaded"), "existing": not started}

    async def load_store(self) -> dict:
        """Install every stored document this server does not hold yet; each document's outcome."""
        outcomes = []
        for entry in (await self.stored())["documents"]:
            try:
                loaded = await self.load(entry["doc_id"])
                outcomes.append({"doc_id": entry["doc_id"], "loaded": not loaded["existing"], "error": None})
            except DocumentError as error:
                outcomes.append({"doc_id": entry["doc_id"], "loaded": False, "error": error.message})
        return {"documents": outcomes}

    async def stored(self) -> dict:
        """The store is shared by the ranks: rank 0 lists it."""
        return await self._until_done(0, await self._on(0, "store_list"))

    async def delete_stored(self, doc_id: str) -> dict:
        return await self._until_done(0, await self._on(0, "store_delete", doc_id=doc_id))

    async def stats(self) -> dict:
        """Totals over the ranks (a document every rank holds counts once per rank) and each rank's figures."""
        ranks = await self._on_all("stats")
        first = ranks[0]
        totals = {key: _sum_figures([rank[key] for rank in ranks])
                  for key in ("counters", "gauges", "kv_bytes", "documents", "pool")}
        idle = [rank["idle_check"] for rank in ranks]
        check = {"idle": all(c["idle"] for c in idle), "leak": None if any(c["leak"] is None for c in idle)
                 else any(c["leak"] for c in idle), "detail": [line for c in idle for line in c["detail"]]}
        shared = {key: value for key, value in first.items() if key != "dp_rank"}
        return {**shared, **totals, "idle_check": check, "dp_size": len(ranks), "ranks": ranks}

    async def auto_candidates(self) -> list[dict]:
        """Prefixes the ranks' reuse trackers propose, each once."""
        candidates: dict[str, dict] = {}
        for answer in await self._on_all("auto_poll"):
            for candidate in answer["candidates"]:
                candidates.setdefault(candidate["doc_id"], candidate)
        return list(candidates.values())


def _sum_figures(values: list):
    """Numbers summed, dicts of them summed key by key."""
    if isinstance(values[0], dict):
        return {key: _sum_figures([value[key] for value in values if key in value]) for key in values[0]}
    return sum(values)


class AutoCompactor:
    """Registers the reuse tracker's candidates, two at a time: their captures share prefill batches, and
    half of ``--am-max-registrations`` stays free for clients' own registrations. After
    ``GUARD_REFUSALS_BEFORE_PAUSE`` prefixes in a row that the fidelity guard refused, it takes no candidate
    for a window: this model's query-agnostic fits miss the bound, and each try costs a capture."""

    def __init__(self, service: DocumentService, policy: AutoPolicy):
        self.service, self.policy = service, policy
        self.slots = asyncio.Semaphore(max(1, service.config.max_registrations // 2))
        self.running: set[asyncio.Task] = set()
        self.refusals_in_a_row = 0
        self.paused_until = 0.0

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self.policy.poll_seconds)
                try:
                    candidates = await self.service.auto_candidates()
                except Exception:  # keep polling: a failed poll must not stop automatic compaction
                    logger.exception("sglang-am: polling for automatic compaction failed")
                    continue
                for candidate in candidates:
                    task = asyncio.create_task(self.compact(candidate["doc_id"], candidate["input_ids"]))
                    self.running.add(task)
                    task.add_done_callback(self.running.discard)
        finally:
            for task in self.running:
                task.cancel()

    async def compact(self, doc_id: str, input_ids: list[int]) -> None:
        async with self.slots:
            if time.monotonic() < self.paused_until:
                return  # dropped: the tracker proposes it again after a window
            try:
                await self._compact(doc_id, input_ids)
            except Exception:  # one bad candidate must not stop the others
                logger.exception("sglang-am: automatic compaction failed")

    async def _compact(self, doc_id: str, input_ids: list[int]) -> None:
        policy = self.policy
        try:
            try:  # evicted earlier and saved: load it back
                result = await self.service.load(doc_id, auto=True)
            except DocumentError as error:
                if error.status != HTTPStatus.NOT_FOUND:
                    raise
                bound = {"fidelity_bound": policy.fidelity_bound} if policy.ratio == "auto" else {}
                request = RegistrationRequest.from_client(
                    self.service.config, input_ids=input_ids, ratio=policy.ratio, method=policy.method,
                    query_source=policy.query_source, keep_first=policy.keep_first, adapt=policy.adapt, **bound)
                result = await self.service._register(request, auto=True)
        except DocumentError as error:
            logger.warning("sglang-am: automatic compaction of a %d-token prefix refused: %s", len(input_ids), error.message)
            if error.status == HTTPStatus.UNPROCESSABLE_ENTITY:  # the fidelity guard's refusal
                self._note_refusal()
            return
        self.refusals_in_a_row = 0
        logger.info("sglang-am: automatic document %s: T=%d -> t=%d slots", result["doc_id"], result["T"], result["t"])

    def _note_refusal(self) -> None:
        self.refusals_in_a_row += 1
        if self.refusals_in_a_row >= GUARD_REFUSALS_BEFORE_PAUSE:
            self.refusals_in_a_row = 0
            self.paused_until = time.monotonic() + self.policy.window_seconds
            logger.warning("sglang-am: %d reused prefixes in a row missed the fidelity bound %s: no automatic "
                           "compaction for %.0f s. For capacity, give --am-auto-ratio (0.1); to fit the questions "
                           "asked, --am-auto-adapt", GUARD_REFUSALS_BEFORE_PAUSE, self.policy.fidelity_bound,
                           self.policy.window_seconds)


async def load_store_at_start(service: DocumentService) -> None:
    """The start-up load of ``--am-load-store``: a worker joining a cluster serves the stored documents."""
    start = time.perf_counter()
    try:
        outcomes = (await service.load_store())["documents"]
    except DocumentError as error:
        logger.warning("sglang-am: the start-up load of the store failed: %s", error.message)
        return
    for outcome in outcomes:
        if outcome["error"] is not None:
            logger.warning("sglang-am: stored document %s not loaded: %s", outcome["doc_id"], outcome["error"])
    logger.info("sglang-am: loaded %d of %d stored documents in %.2f s", sum(o["loaded"] for o in outcomes), len(outcomes),
                time.perf_counter() - start)


def run_during_lifespan(app, task) -> None:
    """Run the coroutine function ``task`` while ``app`` serves (started after SGLang's own start-up)."""
    original = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(running_app):
        async with original(running_app) as state:
            background = asyncio.create_task(task())
            try:
                yield state
            finally:
                background.cancel()

    app.router.lifespan_context = lifespan
