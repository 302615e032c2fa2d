"""Document operations in SGLang's main process, shared by the HTTP routes, the Engine client and
automatic compaction.

Registering a document (``register``, or ``register_request`` for a request already validated): validate
it (``RegistrationRequest``), ``Prepare`` it on the scheduler (which answers with an existing document for a
duplicate), run the capture requests (``capture_requests``), then ``Advance`` until the scheduler reports
the document ready (the solve runs on a scheduler worker thread). A drop while that runs cancels it: its
capture requests are aborted and the registration answers 409. Every scheduler operation is one
``protocol`` record sent through the ``channel`` (``fanout``), and none waits longer than the configured
RPC timeout.

With ``--dp-size N`` every operation acts on every data-parallel rank. A registration is prepared (and
admitted) on all of them first, so that one rank without room refuses it with nothing left behind on
the others; then one rank, the primary (the ranks take turns by document id), captures and compacts,
and the others install its copy from a handoff file: compacted once, the same slots on every rank.
Loads read the store on every rank; a document is ready when every rank holds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from http import HTTPStatus

from ..channel import SchedulerChannel
from ..chat import ChatRenderer
from ..config import ServerConfig
from ..errors import DocumentError
from ..protocol import (
    Abandon,
    Advance,
    AuditLearned,
    Certify,
    CertifyLearned,
    CollectStats,
    DeleteStored,
    Drop,
    Export,
    GetDocument,
    ListDocuments,
    ListStored,
    Load,
    NoteFidelity,
    Observe,
    PollAutoCandidates,
    Prepare,
    ReleaseHandoff,
    Save,
)
from ..registration import MIN_DOCUMENT_TOKENS, RegistrationRequest, check_vocabulary
from ..scheduler.metrics import merge_idle_checks
from ..scheduler.registry import DocState, document_id
from .capture_requests import CaptureRequests
from .fanout import POLL_SECONDS, RankFanout, sum_figures

logger = logging.getLogger(__name__)


class DocumentService:
    """Every document operation, on every data-parallel rank (one rank without ``--dp-size``)."""

    def __init__(self, tokenizer_manager, channel: SchedulerChannel, config: ServerConfig,
                 chat: ChatRenderer | None = None):
        self.tokenizer_manager, self.config = tokenizer_manager, config
        self.ranks = RankFanout(channel)
        self.requests = CaptureRequests(tokenizer_manager, channel.num_ranks)
        self.chat = chat  # the HTTP server's chat API, for documents given as messages (an Engine has none)
        self._registrations: dict[str, asyncio.Task] = {}  # doc_id -> its capture and compaction in progress

    # ----- registration -----

    async def register(self, **fields) -> dict:
        """A client's registration (its fields as the HTTP API takes them)."""
        return await self.register_request(RegistrationRequest.from_client(self.config, **fields), auto=False)

    async def register_request(self, request: RegistrationRequest, auto: bool) -> dict:
        """Register a validated request: a client's, or (``auto``) a prefix the reuse tracker proposed."""
        if request.adapt and self.ranks.num_ranks > 1:  # each rank would learn from its own share of the traffic
            raise DocumentError(HTTPStatus.NOT_IMPLEMENTED, "adapt with --dp-size > 1 is not supported yet")
        # On the event loop, as SGLang renders each chat request: at most --am-max-questions renders.
        ids, request = self._tokenized(request)
        vocab_size = self.tokenizer_manager.model_config.vocab_size
        check_vocabulary("input_ids", ids, vocab_size)
        for index, (question, answer) in enumerate(zip(request.questions, request.answers)):
            check_vocabulary(f"questions[{index}]", question, vocab_size)
            check_vocabulary(f"questions[{index}].answer", answer or (), vocab_size)
        if request.learn:
            return await self._learn(ids, request.questions)
        doc_id = document_id(ids)
        while True:
            held = await self._held(doc_id)
            ready = [rank for rank, doc in enumerate(held) if doc is not None and doc["state"] == DocState.READY.value]
            # A rank that holds it already hands it to the others; else the ranks take turns compacting.
            primary = ready[0] if ready else int(doc_id, 16) % self.ranks.num_ranks
            answers = await self.ranks.each(Prepare(request.to_payload(), ids, auto, primary))
            new = [rank for rank, answer in enumerate(answers) if isinstance(answer, dict) and not answer["existing"]]
            failed = next(((rank, answer) for rank, answer in enumerate(answers) if isinstance(answer, DocumentError)), None)
            busy = [answer for answer in answers if isinstance(answer, dict) and answer["existing"]
                    and answer["state"] != DocState.READY.value]
            if failed is not None or busy:
                await self._abandon(doc_id, answers, new)
                if failed is not None:  # nothing is left behind on the ranks that could take it
                    raise self.ranks.failure(*failed)
                # A concurrent registration or load of the same document: wait for it, then ask again, since it may
                # have failed or been replaced meanwhile (an explicit request must find the ready one explicit).
                await self._wait_settled(doc_id)
                continue
            if not new:
                return {**self.ranks.merge(answers), "existing": True}
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

    async def _learn(self, ids: list[int], questions) -> dict:
        """A client's document that learns from the requests reusing it (``refits.Refits.observe``) on every rank,
        or on none; its ``questions`` are then asked on each rank as a client asks them, so its first fit has them."""
        doc_id = document_id(ids)
        answers = await self.ranks.each(Observe(ids, explicit=True))
        new = [rank for rank, answer in enumerate(answers) if isinstance(answer, dict) and not answer["existing"]]
        failed = next(((rank, answer) for rank, answer in enumerate(answers) if isinstance(answer, DocumentError)), None)
        if failed is not None:
            await self._abandon(doc_id, answers, new)
            raise self.ranks.failure(*failed)
        try:
            for rank in range(self.ranks.num_ranks):
                await self.requests.ask_as_traffic(ids, questions, rank)
        except BaseException:  # a failed question, or the client went away: no rank keeps what this call added
            await self._abandon(doc_id, answers, new)
            raise
        return {**await self._described_after(doc_id, "registered"), "existing": not new}

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

    def _tokenized(self, request: RegistrationRequest) -> tuple[list[int], RegistrationRequest]:
        """The document's ids, and ``request`` with every question as ids (after ``messages``: chat turns)."""
        ids = self._document_ids(request)
        render_turn = None
        if request.messages is not None:
            render_turn = lambda turn: self.chat.turn_ids(request.messages, turn, ids, "questions")
        return ids, request.with_question_ids(self.config, self._encode_question, render_turn)

    def _encode_question(self, text: str) -> list[int]:
        tokenizer = self.tokenizer_manager.tokenizer
        if tokenizer is None:
            raise ValueError("this server runs without a tokenizer: give questions as token ids")
        return tokenizer.encode(text, add_special_tokens=False)

    async def _held(self, doc_id: str) -> list[dict | None]:
        """Each rank's description of ``doc_id``, None where it has none."""
        answers = await self.ranks.each(GetDocument(doc_id))
        for rank, answer in enumerate(answers):
            if isinstance(answer, DocumentError) and answer.status != HTTPStatus.NOT_FOUND:
                raise self.ranks.failure(rank, answer)
        return [answer if isinstance(answer, dict) else None for answer in answers]

    async def _abandon(self, doc_id: str, started: list, ranks: list[int], ready_too: bool = False) -> None:
        """Forget what is left on ``ranks`` of the registrations or loads whose answers are ``started``."""
        with contextlib.suppress(DocumentError):
            await asyncio.gather(*(self.ranks.each(Abandon(doc_id, started[rank]["registration"], ready_too), [rank])
                                   for rank in ranks))

    async def _capture_and_compact(self, doc_id: str, prepared: list, primary: int, new: list[int], ids: list[int],
                                   request: RegistrationRequest) -> dict:
        try:
            references, figures = [], {}
            if primary in new:
                timings, references = await self.requests.capture(doc_id, prepared[primary]["salt"], ids, request, primary)
                certification = prepared[primary].get("certification")
                if certification is None:
                    await self.ranks.until_ready(primary, await self.ranks.one(primary, Advance(doc_id, timings)))
                else:
                    figures = await self._certify(doc_id, prepared[primary]["salt"], ids, references, certification,
                                                  timings, primary)
            waiting = [rank for rank in new if rank != primary]
            handoff_seconds = await self._hand_off(doc_id, primary, waiting) if waiting else None
            if references:  # every rank holds the same copy: one measures it, each records it
                answers = await self.requests.answer_figures(doc_id, prepared[primary]["salt"], ids, references, primary)
                figures.update(answers, answer_tokens=sum(len(reference.answer) for reference in references))
                await self.ranks.all(NoteFidelity(doc_id, figures), new)
            merged = await self._described_after(doc_id, "registered")
            if handoff_seconds is not None:
                merged["timings"] = {**merged["timings"], "handoff_seconds": handoff_seconds}
            return merged
        except BaseException as error:
            await self._abandon(doc_id, prepared, new, ready_too=True)
            if isinstance(error, DocumentError) and error.status == HTTPStatus.NOT_FOUND:
                # A registering document disappears only when it is dropped.
                raise DocumentError(HTTPStatus.CONFLICT, f"document {doc_id} was dropped while it was being registered") from None
            raise

    async def _certify(self, doc_id: str, salt: str, ids: list[int], references: list, certification: dict,
                       timings: dict, rank: int) -> dict:
        """Walk the certification's rungs, smallest first: each one's candidate (fitted without the held-out
        questions) is asked them, and the first whose greedy answers agree with the full prefix's on at least
        the bound's share of tokens is installed (with no bound, the first rung); if none does, the document
        is refused (422) and its prefix stays uncompacted. The held-out figures of each rung tried."""
        heldout = [references[index] for index in certification["heldout"]]
        budgets, bound = certification["budgets"], certification["bound"]
        tried = []
        described = await self.ranks.one(rank, Advance(doc_id, timings, budget=budgets[0]))
        for step, budget in enumerate(budgets):
            await self.ranks.until_ready(rank, described)
            figures = await self.requests.answer_figures(doc_id, salt, ids, heldout, rank, candidate=True)
            tried.append({"budget": budget, **figures})
            accept = bound is None or figures["agreement"] >= bound
            last = step == len(budgets) - 1
            try:
                described = await self.ranks.one(rank, Certify(doc_id, accept, None if accept or last else budgets[step + 1]))
            except DocumentError as error:
                if error.status == HTTPStatus.UNPROCESSABLE_ENTITY:
                    missed = f"(at {budget}: {figures['agreement']} < {bound})"
                    raise DocumentError(error.status, f"{error.message} {missed}") from None
                raise
            if accept:
                break
        await self.ranks.until_ready(rank, described)
        return {"heldout": {**tried[-1], "heldout_questions": certification["heldout"]},
                **({"certification": tried, "agreement_bound": bound} if len(budgets) > 1 else {})}

    async def _hand_off(self, doc_id: str, source: int, ranks: list[int]) -> float:
        """Install the ready copy of rank ``source`` on the waiting ``ranks``: written once, read by each;
        the seconds it took."""
        start = time.perf_counter()
        handoff = (await self.ranks.until_done(source, await self.ranks.one(source, Export(doc_id))))["handoff"]
        try:
            answers = await self.ranks.all(Advance(doc_id, handoff=handoff), ranks)
            for rank in ranks:
                await self.ranks.until_ready(rank, answers[rank])
        finally:
            with contextlib.suppress(DocumentError):
                await self.ranks.one(source, ReleaseHandoff(handoff))
        seconds = round(time.perf_counter() - start, 4)
        logger.info("sglang-am: document %s handed from DP rank %d to %s in %.3f s", doc_id, source, ranks, seconds)
        return seconds

    async def _wait_settled(self, doc_id: str) -> None:
        """Until no rank is registering or loading ``doc_id``."""
        while any(doc is not None and doc["state"] != DocState.READY.value for doc in await self._held(doc_id)):
            await asyncio.sleep(POLL_SECONDS * 4)


    async def _described_after(self, doc_id: str, operation: str) -> dict:
        """The document as the ranks hold it once ``operation`` finished; 409 if a drop took it meanwhile."""
        held = await self._held(doc_id)
        if not any(held):
            raise DocumentError(HTTPStatus.CONFLICT, f"document {doc_id} was dropped while it was being {operation}")
        return self.ranks.merge(held)

    async def list(self) -> dict:
        per_rank: dict[str, list[dict | None]] = {}
        for rank, answer in enumerate(await self.ranks.all(ListDocuments())):
            for doc in answer["documents"]:
                per_rank.setdefault(doc["doc_id"], [None] * self.ranks.num_ranks)[rank] = doc
        return {"documents": [self.ranks.merge(described) for described in per_rank.values()]}

    async def get(self, doc_id: str) -> dict:
        held = await self._held(doc_id)
        if not any(held):
            raise DocumentError(HTTPStatus.NOT_FOUND, f"no document {doc_id}")
        return self.ranks.merge(held)

    async def drop(self, doc_id: str) -> dict:
        """Drop a document in any state, on every rank; a registration in progress is cancelled. Ranks where
        requests use it keep it (409, naming them); the others drop it."""
        answers = await self.ranks.each(Drop(doc_id))
        registration = self._registrations.get(doc_id)
        if registration is not None:
            registration.cancel()
        dropped = [answer for answer in answers if isinstance(answer, dict)]
        errors = [(rank, answer) for rank, answer in enumerate(answers)
                  if isinstance(answer, DocumentError) and answer.status != HTTPStatus.NOT_FOUND]
        if errors:
            if not dropped:
                raise self.ranks.failure(*errors[0])
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
        return await self.ranks.until_done(source, await self.ranks.one(source, Save(doc_id)))

    async def load(self, doc_id: str, auto: bool = False) -> dict:
        """Install a stored document on every rank that lacks it (each reads the store); if one cannot, none keeps it."""
        answers = await self.ranks.each(Load(doc_id, auto))
        started = [rank for rank, answer in enumerate(answers) if isinstance(answer, dict) and not answer["existing"]]
        try:
            for rank, answer in enumerate(answers):
                if isinstance(answer, DocumentError):
                    raise self.ranks.failure(rank, answer)
            for rank in started:
                await self.ranks.until_ready(rank, answers[rank])
        except BaseException:
            await self._abandon(doc_id, answers, started, ready_too=True)
            raise
        return {**await self._described_after(doc_id, "loaded"), "existing": not started}

    async def observe(self, input_ids: list[int]) -> None:
        """Every rank learns an automatic document from the traffic it serves (``refits.Refits.observe``); a rank
        without room for it serves the prefix in full (its error raised once the others have started)."""
        for rank, answer in enumerate(await self.ranks.each(Observe(input_ids))):
            if isinstance(answer, DocumentError):
                raise self.ranks.failure(rank, answer)

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
        return await self.ranks.until_done(0, await self.ranks.one(0, ListStored()))

    async def delete_stored(self, doc_id: str) -> dict:
        return await self.ranks.until_done(0, await self.ranks.one(0, DeleteStored(doc_id)))

    async def stats(self) -> dict:
        """Totals over the ranks (a document every rank holds counts once per rank) and each rank's figures."""
        ranks = await self.ranks.all(CollectStats())
        first = ranks[0]
        totals = {key: sum_figures([rank[key] for rank in ranks])
                  for key in ("counters", "gauges", "kv_bytes", "documents", "pool")}
        check = merge_idle_checks([rank["idle_check"] for rank in ranks])
        shared = {key: value for key, value in first.items() if key != "dp_rank"}
        return {**shared, **totals, "idle_check": check, "dp_size": len(ranks), "ranks": ranks}

    async def auto_candidates(self) -> tuple[list[dict], list[tuple[int, dict]], list[tuple[int, dict]]]:
        """Prefixes the ranks' reuse trackers propose, each once; each rank's learned candidates waiting for their
        held-out questions, and its installed learned nodes due an answer audit, with the rank."""
        candidates: dict[str, dict] = {}
        certify, audit = [], []
        for rank, answer in enumerate(await self.ranks.all(PollAutoCandidates())):
            for candidate in answer["candidates"]:
                candidates.setdefault(candidate["doc_id"], candidate)
            certify.extend((rank, learned) for learned in answer["certify"])
            audit.extend((rank, learned) for learned in answer["audit"])
        return list(candidates.values()), certify, audit

    async def certify_learned(self, rank: int, learned: dict) -> None:
        """Ask a learned document's candidate on ``rank`` its held-out requests' questions and tell the rank what
        its greedy answers were (``refits.Refits.certify_learned`` decides); a failure is told too, so that the
        candidate never waits for an answer that does not come."""
        doc_id = learned["doc_id"]
        try:
            ids = learned["input_ids"]
            references = await self.requests.full_context_references(ids, learned["heldout"], rank)
            figures = await self.requests.answer_figures(doc_id, learned["salt"], ids, references, rank, candidate=True)
            outcome = CertifyLearned(doc_id, figures=figures)
        except Exception as error:  # noqa: BLE001  (told to the rank, which gives the document up)
            logger.warning("sglang-am: asking learned document %s its held-out questions failed: %r", doc_id, error)
            outcome = CertifyLearned(doc_id, error=repr(error))
        await self._tell_learned(rank, doc_id, outcome)

    async def audit_learned(self, rank: int, audit: dict) -> None:
        """Ask the full prefix the prompts an installed learned node on ``rank`` served last, and tell the rank how
        often its answers agree (``refits.Refits.audit_learned`` decides); a failure is told too, so that the next
        audit is not held back."""
        doc_id = audit["doc_id"]
        try:
            figures = await self.requests.full_context_agreement(audit["input_ids"], audit["served"], rank)
            outcome = AuditLearned(doc_id, audit["version"], figures=figures)
        except Exception as error:  # noqa: BLE001  (told to the rank, which keeps the node and audits it again)
            logger.warning("sglang-am: auditing learned document %s failed: %r", doc_id, error)
            outcome = AuditLearned(doc_id, audit["version"], error=repr(error))
        await self._tell_learned(rank, doc_id, outcome)

    async def _tell_learned(self, rank: int, doc_id: str, outcome: CertifyLearned | AuditLearned) -> None:
        """Hand ``outcome`` to the rank, which decides and logs; a refusal (the document was dropped, given up or
        reverted meanwhile) is logged here."""
        try:
            await self.ranks.one(rank, outcome)
        except DocumentError as error:
            logger.warning("sglang-am: learned document %s: %s", doc_id, error.message)
