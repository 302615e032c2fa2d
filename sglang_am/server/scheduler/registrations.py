"""The registrations of one scheduler process: prepare, advance, abandon, install, discard, drop.

The HTTP process (``service``) drives a registration: ``prepare`` (validate, admit, reserve the id),
the capture requests (ordinary prefills through the server, tagged by ``hooks``), then ``advance``
until the document is ready: the first call hands the solve to the solver thread, a later one installs
its result. A registration with held-out questions is certified first: its solve also fits a candidate
without them, which is installed for the HTTP process to ask them (``certify`` then installs the node,
or drops the rung and solves the next one). With ``--dp-size N`` every rank runs ``prepare``; only the
``primary`` rank captures and solves, the others wait (``DocState.WAITING``) until the primary's copy is
written as a handoff, which ``advance`` then reads and installs on them as a load; a stored document's
load (``store_operations``) is installed the same way. ``drop`` removes a document in any state, cancelling its solve. Each step
releases what the previous one took when it fails, and ``reap`` releases what a cancelled solve still
held once it has stopped. Automatic documents fit a budget: installing one evicts the least recently
used idle ones (saved to the store first, if the policy says so).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import uuid
from array import array
from http import HTTPStatus

from ...core.cancel import CompactionCancelled
from ...core.plan import LayerPlan
from ...prompts import SELF_STUDY_PROMPTS
from .. import faults
from ..auto import AUTO_LADDER_TOP, eviction_order
from ..compat import check_compacted_windows, check_model, single_rank
from ..config import MiB, ServerConfig
from ..errors import DocumentError
from ..protocol import (
    Abandon,
    Advance,
    AutoCandidate,
    Certification,
    Certify,
    Description,
    Drop,
    Dropped,
    NoteFidelity,
    Prepare,
    Prepared,
)
from ..registration import RegistrationRequest
from . import adapt
from .admission import ServerRoom, admit
from .cache import AMRadixCache, SourceHold
from .capture import QueryCapture
from .jobs import Job, QueueFull, Worker
from .layout import compacts_windows, node_floor
from .registry import IN_PROGRESS, DocState, Document, Installed, document_id
from .solve import NonFiniteInput, Solved, SolvePlan, heldout_questions, pool_inputs, solve
from .store import check_document_id
from .store_operations import StoreOperations

logger = logging.getLogger(__name__)
# How long a drop waits for a cancelled solve to stop (one loop step) before leaving its KV lock to ``reap``.
CANCEL_WAIT_SECONDS = 0.5


class Registrations:
    def __init__(self, cache: AMRadixCache, config: ServerConfig, dp_rank: int, solver: Worker, store: StoreOperations):
        self.cache, self.registry, self.config, self.dp_rank = cache, cache.registry, config, dp_rank
        self.solver, self.store = solver, store
        self._abandoned: list[tuple[Job, SourceHold]] = []  # cancelled solves that had not stopped yet
        self._orphans: list[Installed] = []  # candidates done with, removed once no probe uses them

    def reap(self, scheduler) -> None:
        """Release the KV that cancelled solves held, once they have stopped, and the retired versions of
        refitted documents and the candidates of certified or failed registrations once no request holds them."""
        if self._abandoned:
            stopped = [(job, hold) for job, hold in self._abandoned if job.done()]
            for _, hold in stopped:
                self.cache.unlock(hold.lock)
            self._abandoned = [entry for entry in self._abandoned if not entry[0].done()]
        for version in [version for version in self._orphans if version.users == 0]:
            self.remove_version(scheduler, version)
            self._orphans.remove(version)
        for doc in self.registry.documents.values():
            if any(version.users == 0 for version in doc.retired):
                for version in [version for version in doc.retired if version.users == 0]:
                    self.remove_version(scheduler, version)
                    doc.retired.remove(version)
                self.registry.update_gauges()

    # ----- registration -----

    def prepare(self, scheduler, operation: Prepare) -> Prepared:
        """Validate and admit a registration and reserve its id; an existing document is returned as it is.
        Ranks other than ``primary`` wait for its compaction instead of capturing."""
        input_ids, auto, primary = operation.input_ids, operation.auto, operation.primary
        registration = RegistrationRequest.from_payload(operation.request)
        doc_id = document_id(input_ids)
        existing = self.registry.get(doc_id)
        if existing is not None and existing.state is DocState.OBSERVING and not auto:
            self.discard(existing, failed=False)  # a client registers what traffic was teaching: its registration wins
            existing = None
        if existing is not None:
            if existing.auto and not auto:  # a client registered it explicitly: no longer evictable
                existing.auto = False
                self.registry.update_gauges()
            return {**existing.describe(), "existing": True}
        check_model(scheduler)
        runner = scheduler.tp_worker.model_runner
        if registration.compact_windows:
            check_compacted_windows(runner)
        pool = runner.token_to_kv_pool
        proportions = registration.head_proportions
        global_layers = [layer for layer, window in enumerate(self.cache.windows) if window is None]
        heads = {(layer, head) for layer in global_layers for head in range(pool.head_num)}
        if proportions is not None and set(proportions) != heads:
            raise DocumentError(HTTPStatus.BAD_REQUEST, "head_budgets must give one proportion per (global layer, KV "
                                f"head) of this model: layers {global_layers}, heads 0 .. {pool.head_num - 1}")
        if registration.adapt:
            single_rank(scheduler, "adapt")
        config = runner.model_config
        q_heads = config.num_attention_heads // scheduler.tp_size
        sources, questions = registration.query_source, registration.questions
        parts = {s: len(SELF_STUDY_PROMPTS) if s == "self-study" else len(questions) if s == "questions" else 1
                 for s in sources}
        # Self-study captures an instruction (64 positions allowed for it) and its answer; a question, itself and its answer.
        asked = max((len(question) + registration.answer_length(index) for index, question in enumerate(questions)), default=0)
        longest = {s: registration.self_study_max_new_tokens + 64 if s == "self-study" else
                   asked if s == "questions" else len(input_ids) for s in sources}
        if self.dp_rank == 1:
            faults.inject("prepare_rank_1")
        captures = self.dp_rank == primary
        capture = QueryCapture(dict(sources), registration.max_queries_per_head, parts, longest,
                               max(1, q_heads // pool.head_num), self.compacted_layers(registration.compact_windows),
                               q_heads * pool.head_dim * pool.store_dtype.itemsize) if captures else None
        heldout = heldout_questions(len(questions)) if captures else frozenset()
        room = self._room(scheduler, self.registry.in_state(*IN_PROGRESS), auto)
        slots = admit(registration, len(input_ids), room, self.config, capture.nbytes if captures else 0,
                      len(SELF_STUDY_PROMPTS), captures, candidate=bool(heldout),
                      floor=node_floor(self.cache.windows, len(input_ids), registration.compact_windows))
        adapt_bytes = 0
        if captures and registration.adapt:
            adapt_bytes = self.admit_adaptation(pool, len(input_ids), q_heads, capture.nbytes, registration.compact_windows,
                                                slots)
        elif captures and self.config.watch_documents:
            try:
                adapt_bytes = self.admit_adaptation(pool, len(input_ids), q_heads, 0, registration.compact_windows, slots,
                                                    watch=True)
            except DocumentError as error:  # the document is compacted all the same, unwatched
                logger.info("sglang-am: document %s is not watched: %s", doc_id, error.message)
        config = _describe_config(registration)
        if not captures:
            single_rank(scheduler, "installing another data-parallel rank's compaction")
            doc = Document(doc_id, self.registry.new_index(), array("q", input_ids), registration.method, config, auto,
                           DocState.WAITING)
            self.registry.add(doc)
            return {**doc.describe(), "existing": False, "registration": doc.index}
        ladder = registration.ladder
        required = bool(ladder) and auto and not registration.adapt  # an adapting one earns its ratio from live queries
        if required:
            ladder = tuple(ratio for ratio in ladder if ratio <= AUTO_LADDER_TOP)
        layers = LayerPlan(registration.method, ladder[0] if ladder else registration.budget,
                           dict(registration.query_source), registration.max_queries_per_head, registration.keep_first,
                           proportions, options=dict(registration.options), compact_windows=registration.compact_windows)
        certification: Certification | None = None
        if heldout:  # the HTTP process walks the rungs, asking each rung's candidate the held-out questions
            certification = {"heldout": sorted(heldout), "budgets": list(ladder or [registration.budget]),
                             "bound": registration.agreement_bound if ladder else None}
            plan = SolvePlan(layers, heldout_questions=heldout)
        else:
            plan = SolvePlan(layers, ladder, registration.fidelity_bound, required)
        doc = Document(doc_id, self.registry.new_index(), array("q", input_ids), registration.method, config, auto,
                       DocState.CAPTURING, capture=capture, plan=plan, salt=f"sglang-am-capture-{uuid.uuid4().hex}",
                       adapt_bytes=adapt_bytes)
        self.registry.add(doc)
        return {**doc.describe(), "existing": False, "registration": doc.index, "salt": doc.salt,
                "certification": certification}

    def compacted_layers(self, compact_windows: bool) -> list[int]:
        return [layer for layer, window in enumerate(self.cache.windows) if window is None or compact_windows]

    def admit_adaptation(self, pool, length: int, q_heads: int, fitted_bytes: int, compact_windows: bool,
                         slots: int, watch: bool = False) -> int:
        """The host memory an adapting document will hold (its refit inputs: KV and the ``fitted_bytes`` of
        queries it was fitted to; live queries; the compacted layers of the version serving, ``slots`` wide, in
        float32), within the server's bound (``--am-adapt-memory-bytes``), or 503. A ``watch``ed document keeps the
        KV of its compacted layers only."""
        itemsize = pool.store_dtype.itemsize
        compacted = self.compacted_layers(compact_windows)
        tokens = sum(length if window is None else min(window, length) for layer, window in enumerate(self.cache.windows)
                     if not watch or layer in compacted)
        layers = len(compacted)
        serving = layers * slots * pool.head_num * (pool.head_dim + pool.v_head_dim + 1) * 4
        needed = (tokens * pool.head_num * (pool.head_dim + pool.v_head_dim) * itemsize + fitted_bytes + serving
                  + adapt.nbytes(layers, self.config.adapt_reservoir, q_heads, pool.head_dim, itemsize))
        free = self.config.adapt_memory_bytes - self.registry.adapt_bytes()
        if needed > free:
            raise DocumentError(HTTPStatus.SERVICE_UNAVAILABLE, f"adapting this document needs {needed / MiB:.1f} MiB of "
                                f"host memory and {max(0, free) / MiB:.1f} MiB are free (--am-adapt-memory-bytes); drop "
                                "adapting documents or register without adapt")
        return needed

    def pinned_slots(self) -> int:
        """Pool slots that do not come back when requests finish: the documents' and versions dropped but in use."""
        return self.registry.pinned_slots() + sum(version.num_slots for version in self._orphans)

    def _room(self, scheduler, in_progress: list[Document], auto: bool) -> ServerRoom:
        table = getattr(scheduler.tp_worker.model_runner.attn_backend, "bias_table", None)
        policy = self.registry.policy
        return ServerRoom(
            pool_slots=scheduler.max_total_num_tokens,
            pinned_slots=self.pinned_slots(),
            max_prompt_tokens=scheduler.max_req_input_len,
            registrations_in_progress=len(in_progress),
            capture_bytes_in_use=sum(doc.capture.nbytes for doc in in_progress if doc.capture is not None),
            bias_slots_free=None if table is None else table.free_slots(),
            auto_budget_slots=policy.budget_slots(scheduler.max_total_num_tokens) if auto and policy else None,
        )

    def hold_source(self, doc: Document, salt: str) -> None:
        """A capture request of ``doc`` finished: lock its KV in the tree (under the request's salt) until
        the solve has read it, so pool pressure cannot evict it in between."""
        if doc.source is None and doc.state is DocState.CAPTURING and self.registry.is_current(doc):
            doc.source = self.cache.hold_prefix(doc.tokens, salt)

    def advance(self, scheduler, operation: Advance) -> Description:
        """Move a registration or a load on: start the solve once its captures are done (at ``budget``, a rung
        the certification tries), start reading the primary rank's ``handoff`` on a waiting rank, install once
        the solve or the read is done (with held-out questions: install the candidate and wait for ``certify``).
        Call until ``state`` is "ready" (or "certifying")."""
        doc_id, handoff = operation.doc_id, operation.handoff
        doc = self.registry.existing(doc_id)
        with self.discarding_on_failure(doc):
            if doc.state is DocState.WAITING and handoff is not None:
                self._start_handoff_read(doc, handoff)
            if doc.state is DocState.CAPTURING:
                doc.timings.update(operation.timings or {})
                self._start_solve(scheduler, doc, operation.budget)
            if doc.state in (DocState.SOLVING, DocState.LOADING):
                if scheduler.tp_size > 1:  # every rank must install in the same call: wait for the job
                    doc.job.wait(self.config.solve_timeout * 2)
                if doc.job.done():
                    self._install(scheduler, doc)
        return doc.describe()

    def certify(self, scheduler, operation: Certify) -> Description:
        """The candidate of a certifying document was asked its held-out questions: install the solved node
        (``accept``), or drop this rung and solve at ``next_budget``, or give the registration up (422)."""
        doc = self.registry.existing(operation.doc_id)
        if doc.state is not DocState.CERTIFYING:
            raise DocumentError(HTTPStatus.CONFLICT, f"document {doc.doc_id} is {doc.state.value}, not certifying")
        with self.discarding_on_failure(doc):
            self.retire_candidate(doc)
            self.reap(scheduler)
            solved, doc.solved = doc.solved, None
            if operation.accept:
                self.install_solved(scheduler, doc, solved)
            elif operation.next_budget is not None:
                doc.state = DocState.CAPTURING  # its capture is still held: solve the next rung from it
                self._start_solve(scheduler, doc, operation.next_budget)
            else:
                raise DocumentError(HTTPStatus.UNPROCESSABLE_ENTITY, "no ratio on the ladder keeps the held-out "
                                    "questions' answers within the agreement bound; the prefix stays uncompacted")
        return doc.describe()

    @contextlib.contextmanager
    def discarding_on_failure(self, doc: Document):
        """A step of ``doc``'s registration that fails discards it, with a clear error."""
        try:
            yield
        except Exception as error:
            self.discard(doc)
            if isinstance(error, DocumentError):
                raise
            if isinstance(error, CompactionCancelled):  # its deadline passed, or it was dropped
                raise DocumentError(HTTPStatus.SERVICE_UNAVAILABLE, f"{error}; the registration was abandoned") from None
            if isinstance(error, NonFiniteInput):  # an internal fault: say where, never a bare 500
                logger.error("sglang-am: document %s: %s", doc.doc_id, error)
                raise DocumentError(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal fault, the registration was abandoned: "
                                    f"{error}") from None
            logger.warning("sglang-am: document %s failed: %r", doc.doc_id, error, exc_info=error)
            raise DocumentError(HTTPStatus.INTERNAL_SERVER_ERROR, f"compaction failed: {error!r}") from None

    def _start_solve(self, scheduler, doc: Document, budget: float | int | None = None) -> None:
        problem = doc.capture.problem()
        if problem is not None:
            raise DocumentError(HTTPStatus.SERVICE_UNAVAILABLE, problem)
        if doc.source is None:
            raise DocumentError(HTTPStatus.SERVICE_UNAVAILABLE,
                                "the document's KV was evicted before compaction (KV pool under pressure); register again")
        pool = scheduler.tp_worker.model_runner.token_to_kv_pool
        plan, tokens = doc.plan, list(doc.tokens)
        if budget is not None:
            if not plan.heldout_questions:
                raise DocumentError(HTTPStatus.BAD_REQUEST, "only a registration certified on held-out questions is "
                                    "solved at a budget it is given")
            plan = dataclasses.replace(plan, layers=dataclasses.replace(plan.layers, budget=budget))
        inputs = pool_inputs(pool, doc.source.slots, doc.capture)
        adapt_bytes, layers = doc.adapt_bytes, self.compacted_layers(plan.layers.compact_windows)

        def work() -> Solved:
            prefix, candidate = solve(inputs, plan, tokens, self.cache.windows, self.store.fingerprint_or_empty(), doc.config)
            adaptation = adapt.Adaptation.start(
                inputs, plan, layers, self.cache.windows, len(tokens), self.config.adapt_reservoir,
                self.config.adapt_refit_every, adapt_bytes, doc.config["answer_tokens"], prefix,
                "adapt" if doc.config["adapt"] else "watch") if adapt_bytes else None
            return Solved(prefix, adaptation, candidate)

        try:
            doc.job = self.solver.submit(work, "the solve", timeout=self.config.solve_timeout)
        except QueueFull:
            raise DocumentError(HTTPStatus.SERVICE_UNAVAILABLE, "the solver queue is full; retry later") from None
        doc.state = DocState.SOLVING

    def _start_handoff_read(self, doc: Document, handoff: str) -> None:
        try:
            doc.job = self.store.io.submit(
                lambda: Solved(self.store.handoffs().read(handoff, doc.doc_id, self.store.fingerprint())), "the handoff")
        except QueueFull:
            raise DocumentError(HTTPStatus.SERVICE_UNAVAILABLE, "the store's queue is full; retry later") from None
        doc.state, doc.handoff = DocState.LOADING, True

    def _install(self, scheduler, doc: Document) -> None:
        """The finished solve's (or store read's) node, or with held-out questions its candidate first."""
        solved: Solved = doc.job.result()  # raises what the solve or the read raised
        doc.job = None
        if solved.candidate is None:
            self.install_solved(scheduler, doc, solved)
            return
        self.install_candidate(scheduler, doc, solved)
        doc.state = DocState.CERTIFYING

    def install_candidate(self, scheduler, doc: Document, solved: Solved) -> None:
        """Install ``solved``'s candidate for probes only (room is checked for the node that may follow it)."""
        table = getattr(scheduler.tp_worker.model_runner.attn_backend, "bias_table", None)
        self._check_bias_room(table, solved.candidate.num_slots + solved.prefix.num_slots)
        doc.candidate = self.cache.install_document(solved.candidate, self.registry.new_index())
        if table is not None:
            table.base_of(doc.candidate.index, lambda: doc.candidate.bias)
        doc.solved = solved

    def retire_candidate(self, doc: Document) -> None:
        """A certifying document's candidate is done with: ``reap`` removes it once no probe uses it."""
        if doc.candidate is not None:
            self._orphans.append(doc.candidate)
            doc.candidate = None

    def install_solved(self, scheduler, doc: Document, solved: Solved) -> None:
        started = time.perf_counter()
        prefix = solved.prefix
        self._release_capture(doc, doc.source)
        if document_id(prefix.token_ids) != doc.doc_id:
            raise DocumentError(HTTPStatus.BAD_REQUEST, f"stored document {doc.doc_id} holds another document's tokens")
        if len(prefix.token_ids) >= scheduler.max_req_input_len:
            raise DocumentError(HTTPStatus.BAD_REQUEST, f"document {doc.doc_id} has {len(prefix.token_ids)} tokens, "
                                "too long for this server")
        if doc.state is DocState.LOADING:
            doc.tokens, doc.method = array("q", prefix.token_ids), prefix.method
        doc.config = prefix.config  # a solve adds its fidelity
        if compacts_windows(prefix, self.cache.windows):
            check_compacted_windows(scheduler.tp_worker.model_runner)
        if doc.auto:
            self._make_room_for_auto(scheduler, prefix.num_slots)
        table = getattr(scheduler.tp_worker.model_runner.attn_backend, "bias_table", None)
        self._check_bias_room(table, prefix.num_slots)
        doc.installed = self.cache.install_document(prefix, doc.index)
        if table is not None:  # placed now, so the table's free room counts every installed document
            table.base_of(doc.index, lambda: doc.installed.bias)
        doc.adaptation = solved.adaptation
        if doc.handoff:
            self.registry.stats.add("handoffs", origin=doc.origin)
        elif doc.state is DocState.LOADING:
            self.registry.stats.add("loads", origin=doc.origin)
        else:
            self.registry.stats.add("compactions", origin=doc.origin)
            self.registry.stats.add("compaction_seconds", prefix.timings["solve_seconds"])
        doc.timings.update(prefix.timings)
        doc.timings["install_seconds"] = round(time.perf_counter() - started, 4)
        doc.state = DocState.READY
        self.registry.update_gauges()
        if doc.auto and self.registry.tracker is not None:
            self.registry.tracker.release(doc.tokens)
        logger.info("sglang-am: document %s ready: T=%d -> t=%d slots", doc.doc_id, doc.length, doc.num_slots)

    @staticmethod
    def _check_bias_room(table, slots: int) -> None:
        if table is not None and slots > table.free_slots():
            raise DocumentError(HTTPStatus.SERVICE_UNAVAILABLE, f"the bias table has room for {table.free_slots()} "
                                f"compacted slots, {slots} do not fit; drop documents or raise --am-bias-slots")

    def discard(self, doc: Document, failed: bool = True) -> None:
        """Forget a document that is not ready, releasing what it held (``failed``: count it as a failure)."""
        job, hold = doc.job, doc.source
        self.retire_candidate(doc)
        self._orphans.extend(doc.retired)  # versions from before a revert that requests still hold
        doc.retired = []
        doc.solved = None
        if job is not None and not job.done():
            job.cancel("the registration was cancelled")
            if not job.wait(CANCEL_WAIT_SECONDS):
                if hold is not None:  # the solve may still read it: ``reap`` unlocks it once the job stops
                    self._abandoned.append((job, hold))
                hold = None
        doc.job = None
        self._release_capture(doc, hold)
        if doc.installed is not None:  # installed, then a later step failed
            self.cache.remove_document(doc.installed)
            doc.installed = None
        if self.registry.is_current(doc):
            self.registry.remove(doc)
            # A load that finds nothing stored is no failure; a waiting rank's is counted by its primary.
            if failed and doc.state is not DocState.LOADING and doc.state is not DocState.WAITING:
                self.registry.stats.add("compaction_failures", origin=doc.origin)

    def _release_capture(self, doc: Document, hold: SourceHold | None) -> None:
        """What the capture took: the lock on the document's KV (``hold``, unless a running solve still reads it),
        the capture requests' own tree entries and the recorded queries."""
        if hold is not None:
            self.cache.unlock(hold.lock)
        if doc.salt:  # a registration that captured (not a load, a handoff or another rank's waiting copy)
            self.cache.remove_namespace(doc.salt)
        if doc.capture is not None:
            doc.capture.release()
        doc.source, doc.capture = None, None

    def note_fidelity(self, scheduler, operation: NoteFidelity) -> dict:
        """The HTTP process measured the installed document end to end (``fidelity``): keep it with the rest."""
        doc = self.registry.existing(operation.doc_id)
        doc.config = {**doc.config, "fidelity": {**(doc.config.get("fidelity") or {}), **operation.figures}}
        return {"doc_id": doc.doc_id}

    def abandon(self, scheduler, operation: Abandon) -> dict:
        """The HTTP process gave up a registration or a load (its client left, or it failed): forget what
        is left of it. A ready document is left alone unless ``ready_too`` (it became ready here while
        another data-parallel rank failed) and no request uses it yet; so is a later registration of the same
        document (its failed predecessor's abandon can arrive after it started)."""
        doc_id = operation.doc_id
        doc = self.registry.get(check_document_id(doc_id))
        if doc is None or doc.index != operation.registration:
            return {"doc_id": doc_id}
        if doc.state is not DocState.READY:
            self.discard(doc)
        elif operation.ready_too and not doc.users:
            self.remove_ready(scheduler, doc)
        return {"doc_id": doc_id}

    # ----- drop -----

    def drop(self, scheduler, operation: Drop) -> Dropped:
        """Remove a document in any state: a ready one unless requests use it (409), one in progress at once."""
        doc_id = operation.doc_id
        doc = self.registry.existing(doc_id)
        if doc.state is not DocState.READY:
            state = doc.state.value
            self.discard(doc)
            return {"doc_id": doc_id, "dropped": True, "cancelled": state, "freed_slots": 0}
        if doc.users:
            raise DocumentError(HTTPStatus.CONFLICT, f"document {doc_id} is in use by {doc.users} request(s); "
                                "retry when they finish")
        return {"doc_id": doc_id, "dropped": True, "freed_slots": self.remove_ready(scheduler, doc)}

    def remove_ready(self, scheduler, doc: Document) -> int:
        if doc.adaptation is not None:
            doc.adaptation.stop()
        freed = sum(self.remove_version(scheduler, version) for version in [doc.installed, *doc.retired])
        doc.retired.clear()
        self.registry.remove(doc)
        return freed

    def remove_version(self, scheduler, version: Installed) -> int:
        freed = self.cache.remove_document(version)
        table = getattr(scheduler.tp_worker.model_runner.attn_backend, "bias_table", None)
        if table is not None:
            table.release(version.index)
        return freed

    # ----- automatic documents -----

    def _make_room_for_auto(self, scheduler, width: int) -> None:
        """Drop (saving them to the store first, if the policy says so) the least recently used idle
        automatic documents until ``width`` more slots fit the automatic budget."""
        policy = self.registry.policy
        budget = policy.budget_slots(scheduler.max_total_num_tokens)
        autos = self.registry.in_state(DocState.READY)
        victims = eviction_order(autos, budget, width)
        if victims is None:
            used = sum(d.num_slots for d in autos if d.auto)
            raise DocumentError(HTTPStatus.SERVICE_UNAVAILABLE, f"automatic documents in use hold {used} of the "
                                f"{budget}-slot budget; {width} more do not fit")
        for victim in victims:
            if policy.save_evicted:
                self.store.write_in_background(victim.doc_id, self.store.snapshot(scheduler, victim))
            self.remove_ready(scheduler, victim)
            self.registry.stats.add("auto_evictions")

    def take_auto_candidates(self) -> list[AutoCandidate]:
        """Prefixes the reuse tracker proposes that are not documents yet (the HTTP process compacts them)."""
        tracker = self.registry.tracker
        if tracker is None:
            return []
        named = ((document_id(ids), ids) for ids in tracker.take_candidates())
        candidates = [{"doc_id": doc_id, "input_ids": ids} for doc_id, ids in named if self.registry.get(doc_id) is None]
        self.registry.stats.add("auto_triggers", len(candidates))
        return candidates


def _describe_config(registration: RegistrationRequest) -> dict:
    """What ``describe`` and the saved artifact record of how the document was compacted."""
    return {"budget": registration.budget, "query_source": dict(registration.query_source),
            "head_budgets": registration.head_budgets is not None, "max_queries_per_head": registration.max_queries_per_head,
            "keep_first": registration.keep_first, "options": dict(registration.options),
            "compact_windows": registration.compact_windows, "questions": len(registration.questions),
            "answer_tokens": registration.answer_tokens, "adapt": registration.adapt}
