"""The document operations of one scheduler process: one RPC each, on the scheduler's thread.

The HTTP process (``service``) drives a registration: ``prepare`` (validate, admit, reserve the id),
the capture requests (ordinary prefills through the server, tagged by ``hooks``), then ``advance``
until the document is ready: the first call hands the solve to the solver thread, a later one installs
its result. With ``--dp-size N`` every rank runs ``prepare``; only the ``primary`` rank captures and
solves, the others wait (``DocState.WAITING``) until ``export`` has written the primary's copy as a
handoff, which ``advance`` then reads and installs on them as a load. ``load`` reads a stored document
on the store's I/O thread and ``advance`` installs it the same way. ``save`` copies a document out of
the pool here and writes it on the I/O thread; the HTTP process polls ``job``. ``drop`` removes a
document in any state, cancelling its solve. Each step releases what the previous one took when it
fails, and ``reap`` releases what a cancelled solve still held once it has stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from array import array
from http import HTTPStatus
from pathlib import Path

import torch

from ..core.cancel import CompactionCancelled
from ..core.plan import LayerPlan
from ..fingerprint import checkpoint_fingerprint
from ..prefix import CompactedPrefix
from ..prompts import SELF_STUDY_PROMPTS
from . import adapt, faults
from .admission import ServerRoom, admit
from .auto import AUTO_LADDER_TOP, eviction_order
from .cache import AMRadixCache, SourceHold
from .capture import QueryCapture
from .config import MiB, ServerConfig
from .errors import DocumentError
from .jobs import Job, QueueFull, Worker
from .layout import compacts_windows
from .registration import RegistrationRequest
from .registry import DocState, Document, document_id
from .solve import Solved, SolvePlan, pool_inputs, solve_document
from .store import DocumentStore, Handoffs, check_document_id

logger = logging.getLogger(__name__)
IN_PROGRESS = (DocState.CAPTURING, DocState.SOLVING, DocState.LOADING, DocState.WAITING)
# How long a drop waits for a cancelled solve to stop (one loop step) before leaving its KV lock to ``reap``.
CANCEL_WAIT_SECONDS = 0.5
MAX_FINISHED_JOBS = 256  # finished save/store jobs kept for their poller
SOLVER_NICE = 10


class DocumentOperations:
    def __init__(self, cache: AMRadixCache, config: ServerConfig, model_path: str, device, dp_rank: int = 0):
        self.cache, self.registry, self.config = cache, cache.registry, config
        self.model_path, self.dp_rank = model_path, dp_rank
        # Solves and refits run behind the scheduler's forwards on a CPU: serving latency comes first.
        self.solver = Worker("solver", max_queued=config.max_registrations, device=device, nice=SOLVER_NICE)
        self.io = Worker("store", max_queued=64)
        self.jobs: dict[str, Job] = {}  # save and store jobs the HTTP process polls
        self._abandoned: list[tuple[Job, SourceHold]] = []  # cancelled solves that had not stopped yet
        self._identity_lock = threading.Lock()
        self._fingerprint: dict | None = None
        self._store: DocumentStore | None = None
        self._handoffs: Handoffs | None = None

    # ----- entry point -----

    def call(self, scheduler, op: str, payload: dict) -> dict:
        handler = getattr(self, f"op_{op}", None)
        if handler is None:
            raise DocumentError(HTTPStatus.BAD_REQUEST, f"unknown document operation {op!r}")
        self.reap(scheduler)
        return handler(scheduler, **payload)

    def reap(self, scheduler) -> None:
        """Release the KV that cancelled solves held, once they have stopped, and the retired versions of
        refitted documents once no request holds them."""
        if self._abandoned:
            stopped = [(job, hold) for job, hold in self._abandoned if job.done()]
            for _, hold in stopped:
                self.cache.unlock(hold.lock)
            self._abandoned = [entry for entry in self._abandoned if not entry[0].done()]
        for doc in self.registry.documents.values():
            if any(version.users == 0 for version in doc.retired):
                for version in [version for version in doc.retired if version.users == 0]:
                    self._remove_version(scheduler, version)
                    doc.retired.remove(version)
                self.registry.update_gauges()

    # ----- the model this scheduler serves, and its store -----

    def fingerprint(self) -> dict:
        """The served checkpoint's fingerprint (read once, from whichever thread asks first)."""
        with self._identity_lock:
            if self._fingerprint is None:
                try:
                    self._fingerprint = checkpoint_fingerprint(self.model_path)
                except (OSError, ValueError) as error:
                    raise DocumentError(HTTPStatus.BAD_REQUEST, f"cannot fingerprint the served model: {error}") from None
            return self._fingerprint

    def store(self) -> DocumentStore:
        """This model's part of the store root: one subdirectory per fingerprint."""
        fingerprint = self.fingerprint()
        with self._identity_lock:
            if self._store is None:
                key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
                self._store = DocumentStore(Path(self.config.store_dir) / key, self.config.store_quota_bytes)
            return self._store

    def handoffs(self) -> Handoffs:
        store = self.store()
        with self._identity_lock:
            if self._handoffs is None:
                self._handoffs = Handoffs(store.root, self.config.store_quota_bytes)
            return self._handoffs

    # ----- reading -----

    def _get(self, doc_id: str) -> Document:
        doc = self.registry.get(check_document_id(doc_id))
        if doc is None:
            raise DocumentError(HTTPStatus.NOT_FOUND, f"no document {doc_id}")
        return doc

    def op_list(self, scheduler) -> dict:
        return {"documents": [doc.describe() for doc in self.registry.documents.values()]}

    def op_get(self, scheduler, doc_id: str) -> dict:
        return self._get(doc_id).describe()

    # ----- registration -----

    def op_prepare(self, scheduler, request: dict, input_ids: list[int], auto: bool = False, primary: int = 0) -> dict:
        """Validate and admit a registration and reserve its id; an existing document is returned as it is.
        Ranks other than ``primary`` wait for its compaction instead of capturing."""
        registration = RegistrationRequest.from_payload(request)
        doc_id = document_id(input_ids)
        existing = self.registry.get(doc_id)
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
            _single_rank(scheduler, "adapt")
        config = runner.model_config
        q_heads = config.num_attention_heads // scheduler.tp_size
        sources, questions = registration.query_source, registration.questions
        parts = {s: len(SELF_STUDY_PROMPTS) if s == "self-study" else len(questions) if s == "questions" else 1
                 for s in sources}
        # Self-study captures an instruction (64 positions allowed for it) and its answer; a question, itself.
        longest = {s: registration.self_study_max_new_tokens + 64 if s == "self-study" else
                   max(map(len, questions)) if s == "questions" else len(input_ids) for s in sources}
        if self.dp_rank == 1:
            faults.inject("prepare_rank_1")
        captures = self.dp_rank == primary
        capture = QueryCapture(dict(sources), registration.max_queries_per_head, parts, longest,
                               max(1, q_heads // pool.head_num), self._compacted_layers(registration.compact_windows),
                               q_heads * pool.head_dim * pool.store_dtype.itemsize) if captures else None
        room = self._room(scheduler, self.registry.in_state(*IN_PROGRESS), auto)
        admit(registration, len(input_ids), room, self.config, capture.nbytes if captures else 0, len(SELF_STUDY_PROMPTS),
              captures)
        adapt_bytes = (self._admit_adaptation(pool, len(input_ids), q_heads, capture, registration.compact_windows)
                       if registration.adapt and captures else 0)
        config = _describe_config(registration)
        if not captures:
            _single_rank(scheduler, "installing another data-parallel rank's compaction")
            doc = Document(doc_id, self.registry.new_index(), array("q", input_ids), registration.method, config, auto,
                           DocState.WAITING)
            self.registry.add(doc)
            return {**doc.describe(), "existing": False}
        ladder = registration.ladder
        required = bool(ladder) and auto and not registration.adapt  # an adapting one earns its ratio from live queries
        if required:
            ladder = tuple(ratio for ratio in ladder if ratio <= AUTO_LADDER_TOP)
        layers = LayerPlan(registration.method, ladder[0] if ladder else registration.budget,
                           dict(registration.query_source), registration.max_queries_per_head, registration.keep_first,
                           proportions, options=dict(registration.options), compact_windows=registration.compact_windows)
        plan = SolvePlan(layers, ladder, registration.fidelity_bound, required)
        doc = Document(doc_id, self.registry.new_index(), array("q", input_ids), registration.method, config, auto,
                       DocState.CAPTURING, capture=capture, plan=plan, salt=f"sglang-am-capture-{uuid.uuid4().hex}",
                       adapt_bytes=adapt_bytes)
        self.registry.add(doc)
        return {**doc.describe(), "existing": False, "salt": doc.salt}

    def _compacted_layers(self, compact_windows: bool) -> list[int]:
        return [layer for layer, window in enumerate(self.cache.windows) if window is None or compact_windows]

    def _admit_adaptation(self, pool, length: int, q_heads: int, capture: QueryCapture, compact_windows: bool) -> int:
        """The host memory an adapting document will hold (its refit inputs and live queries), within the
        server's bound (``--am-adapt-memory-bytes``), or 503."""
        itemsize = pool.store_dtype.itemsize
        tokens = sum(length if window is None else min(window, length) for window in self.cache.windows)
        layers = len(self._compacted_layers(compact_windows))
        needed = (tokens * pool.head_num * (pool.head_dim + pool.v_head_dim) * itemsize + capture.nbytes
                  + adapt.nbytes(layers, self.config.adapt_reservoir, q_heads, pool.head_dim, itemsize))
        free = self.config.adapt_memory_bytes - self.registry.adapt_bytes()
        if needed > free:
            raise DocumentError(HTTPStatus.SERVICE_UNAVAILABLE, f"adapting this document needs {needed / MiB:.1f} MiB of "
                                f"host memory and {max(0, free) / MiB:.1f} MiB are free (--am-adapt-memory-bytes); drop "
                                "adapting documents or register without adapt")
        return needed

    def _room(self, scheduler, in_progress: list[Document], auto: bool) -> ServerRoom:
        table = getattr(scheduler.tp_worker.model_runner.attn_backend, "bias_table", None)
        policy = self.registry.policy
        return ServerRoom(
            pool_slots=scheduler.max_total_num_tokens,
            pinned_slots=self.registry.pinned_slots(),
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

    def op_advance(self, scheduler, doc_id: str, timings: dict | None = None, handoff: str | None = None) -> dict:
        """Move a registration or a load on: start the solve once its captures are done, start reading the
        primary rank's ``handoff`` on a waiting rank, install once the solve or the read is done. Call until
        ``state`` is "ready"."""
        doc = self._get(doc_id)
        try:
            if doc.state is DocState.WAITING and handoff is not None:
                self._start_handoff_read(doc, handoff)
            if doc.state is DocState.CAPTURING:
                doc.timings.update(timings or {})
                self._start_solve(scheduler, doc)
            if doc.state in (DocState.SOLVING, DocState.LOADING):
                if scheduler.tp_size > 1:  # every rank must install in the same call: wait for the job
                    doc.job.wait(self.config.solve_timeout * 2)
                if doc.job.done():
                    self._install(scheduler, doc)
        except Exception as error:
            self._discard(doc)
            if isinstance(error, DocumentError):
                raise
            if isinstance(error, CompactionCancelled):  # its deadline passed, or it was dropped
                raise DocumentError(HTTPStatus.SERVICE_UNAVAILABLE, f"{error}; the registration was abandoned") from None
            logger.warning("sglang-am: document %s failed: %r", doc_id, error)
            raise DocumentError(HTTPStatus.INTERNAL_SERVER_ERROR, f"compaction failed: {error!r}") from None
        return doc.describe()

    def _start_solve(self, scheduler, doc: Document) -> None:
        problem = doc.capture.problem()
        if problem is not None:
            raise DocumentError(HTTPStatus.SERVICE_UNAVAILABLE, problem)
        if doc.source is None:
            raise DocumentError(HTTPStatus.SERVICE_UNAVAILABLE,
                                "the document's KV was evicted before compaction (KV pool under pressure); register again")
        pool = scheduler.tp_worker.model_runner.token_to_kv_pool
        inputs, plan, tokens = pool_inputs(pool, doc.source.slots, doc.capture), doc.plan, list(doc.tokens)
        adapt_bytes, layers = doc.adapt_bytes, self._compacted_layers(plan.layers.compact_windows)

        def work() -> Solved:
            prefix = solve_document(inputs, plan, tokens, self.cache.windows, self._fingerprint_or_empty(), doc.config)
            adaptation = adapt.Adaptation.start(
                inputs, plan, layers, self.cache.windows, len(tokens), self.config.adapt_reservoir,
                self.config.adapt_refit_every, adapt_bytes) if adapt_bytes else None
            return Solved(prefix, adaptation)

        try:
            doc.job = self.solver.submit(work, "the solve", timeout=self.config.solve_timeout)
        except QueueFull:
            raise DocumentError(HTTPStatus.SERVICE_UNAVAILABLE, "the solver queue is full; retry later") from None
        doc.state = DocState.SOLVING

    def _start_handoff_read(self, doc: Document, handoff: str) -> None:
        try:
            doc.job = self.io.submit(lambda: Solved(self.handoffs().read(handoff, doc.doc_id, self.fingerprint())), "the handoff")
        except QueueFull:
            raise DocumentError(HTTPStatus.SERVICE_UNAVAILABLE, "the store's queue is full; retry later") from None
        doc.state, doc.handoff = DocState.LOADING, True

    def _fingerprint_or_empty(self) -> dict:
        """Serving needs no fingerprint; only save and load refuse without one."""
        try:
            return self.fingerprint()
        except DocumentError:
            return {}

    def _install(self, scheduler, doc: Document) -> None:
        started = time.perf_counter()
        solved: Solved = doc.job.result()  # raises what the solve or the read raised
        prefix = solved.prefix
        if doc.source is not None:
            self.cache.unlock(doc.source.lock)
        if doc.salt:  # a registration that captured (not a load, a handoff or another rank's waiting copy)
            self.cache.remove_namespace(doc.salt)
        if doc.capture is not None:
            doc.capture.release()
        doc.source, doc.capture, doc.job = None, None, None
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
        if table is not None and prefix.num_slots > table.free_slots():
            raise DocumentError(HTTPStatus.SERVICE_UNAVAILABLE, f"the bias table has room for {table.free_slots()} "
                                f"compacted slots, {prefix.num_slots} do not fit; drop documents or raise --am-bias-slots")
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

    def _discard(self, doc: Document) -> None:
        """Forget a document that never became ready, releasing what it held."""
        job, hold = doc.job, doc.source
        if job is not None and not job.done():
            job.cancel("the registration was cancelled")
            if not job.wait(CANCEL_WAIT_SECONDS):
                if hold is not None:
                    self._abandoned.append((job, hold))
                hold = None
        if hold is not None:
            self.cache.unlock(hold.lock)
        if doc.salt:  # a registration that captured (not a load, a handoff or another rank's waiting copy)
            self.cache.remove_namespace(doc.salt)
        if doc.capture is not None:
            doc.capture.release()
        if doc.installed is not None:  # installed, then a later step failed
            self.cache.remove_document(doc.installed)
        doc.source, doc.capture, doc.job, doc.installed = None, None, None, None
        if self.registry.is_current(doc):
            self.registry.remove(doc)
            # A load that finds nothing stored is no failure; a waiting rank's is counted by its primary.
            if doc.state is not DocState.LOADING and doc.state is not DocState.WAITING:
                self.registry.stats.add("compaction_failures", origin=doc.origin)

    def op_note_fidelity(self, scheduler, doc_id: str, figures: dict) -> dict:
        """The HTTP process measured the installed document end to end (``fidelity``): keep it with the rest."""
        doc = self._get(doc_id)
        doc.config = {**doc.config, "fidelity": {**(doc.config.get("fidelity") or {}), **figures}}
        return {"doc_id": doc_id}

    def op_abandon(self, scheduler, doc_id: str, ready_too: bool = False) -> dict:
        """The HTTP process gave up a registration or a load (its client left, or it failed): forget what
        is left of it. A ready document is left alone unless ``ready_too`` (it became ready here while
        another data-parallel rank failed) and no request uses it yet."""
        doc = self.registry.get(check_document_id(doc_id))
        if doc is not None and doc.state is not DocState.READY:
            self._discard(doc)
        elif doc is not None and ready_too and not doc.users:
            self._remove_ready(scheduler, doc)
        return {"doc_id": doc_id}

    # ----- drop -----

    def op_drop(self, scheduler, doc_id: str) -> dict:
        """Remove a document in any state: a ready one unless requests use it (409), one in progress at once."""
        doc = self._get(doc_id)
        if doc.state is not DocState.READY:
            state = doc.state.value
            self._discard(doc)
            return {"doc_id": doc_id, "dropped": True, "cancelled": state, "freed_slots": 0}
        if doc.users:
            raise DocumentError(HTTPStatus.CONFLICT, f"document {doc_id} is in use by {doc.users} request(s); "
                                "retry when they finish")
        return {"doc_id": doc_id, "dropped": True, "freed_slots": self._remove_ready(scheduler, doc)}

    def _remove_ready(self, scheduler, doc: Document) -> int:
        if doc.adaptation is not None:
            doc.adaptation.stop()
        freed = sum(self._remove_version(scheduler, version) for version in [doc.installed, *doc.retired])
        doc.retired.clear()
        self.registry.remove(doc)
        return freed

    def _remove_version(self, scheduler, version) -> int:
        freed = self.cache.remove_document(version)
        table = getattr(scheduler.tp_worker.model_runner.attn_backend, "bias_table", None)
        if table is not None:
            table.release(version.index)
        return freed

    # ----- refits from live traffic -----

    def advance_refits(self, scheduler) -> None:
        """Install the adapting documents' finished refits; start one where enough new live queries arrived."""
        for doc in self.registry.in_state(DocState.READY):
            adaptation = doc.adaptation
            if adaptation is None:
                continue
            if adaptation.job is not None and adaptation.job.done():
                self._install_refit(scheduler, doc)
            elif adaptation.due():
                self._start_refit(doc)

    def _start_refit(self, doc: Document) -> None:
        adaptation, seen_before = doc.adaptation, doc.adaptation.seen_at_fit
        inputs = adaptation.refit_inputs(self.solver.device or torch.device("cpu"))
        plan, tokens, config = adaptation.plan, list(doc.tokens), {**doc.config, "fidelity": None}
        fingerprint = self._fingerprint_or_empty()

        def work() -> CompactedPrefix:
            faults.inject("refit_slow")
            return solve_document(inputs, plan, tokens, self.cache.windows, fingerprint, config)

        try:
            adaptation.job = self.solver.submit(work, "a refit", timeout=self.config.solve_timeout)
        except QueueFull:  # registrations go first; the refit waits for the next batch
            adaptation.seen_at_fit = seen_before

    def _install_refit(self, scheduler, doc: Document) -> None:
        """The refit becomes the version new requests are served from; the old one is retired (``reap``
        removes it once the requests that started on it end). A failure leaves the document as it was."""
        adaptation = doc.adaptation
        job, adaptation.job = adaptation.job, None
        table = getattr(scheduler.tp_worker.model_runner.attn_backend, "bias_table", None)
        try:
            prefix: CompactedPrefix = job.result()
            if table is not None and prefix.num_slots > table.free_slots():
                raise DocumentError(HTTPStatus.SERVICE_UNAVAILABLE, "no room in the bias table")
            version = self.cache.install_document(prefix, self.registry.new_index())
        except Exception as error:  # noqa: BLE001  (the document keeps serving the version it has)
            adaptation.refit_failures += 1
            adaptation.last_error = f"{type(error).__name__}: {error}"
            self.registry.stats.add("refit_failures")
            logger.warning("sglang-am: refit of document %s failed: %r", doc.doc_id, error)
            return
        if table is not None:
            table.base_of(version.index, lambda: version.bias)
        doc.retired.append(doc.installed)
        doc.installed, doc.config = version, prefix.config
        adaptation.refits += 1
        doc.timings["refit_seconds"] = prefix.timings["solve_seconds"]
        self.registry.stats.add("refits")
        self.reap(scheduler)  # an old version nobody uses goes at once
        logger.info("sglang-am: document %s refitted from %d live queries (refit %d)", doc.doc_id, adaptation.live.seen,
                    adaptation.refits)

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
                self._write_in_background(victim.doc_id, self._snapshot(scheduler, victim))
            self._remove_ready(scheduler, victim)
            self.registry.stats.add("auto_evictions")

    def op_auto_poll(self, scheduler) -> dict:
        """Prefixes the reuse tracker proposes that are not documents yet (the HTTP process compacts them)."""
        tracker = self.registry.tracker
        if tracker is None:
            return {"candidates": []}
        named = ((document_id(ids), ids) for ids in tracker.take_candidates())
        candidates = [{"doc_id": doc_id, "input_ids": ids} for doc_id, ids in named if self.registry.get(doc_id) is None]
        self.registry.stats.add("auto_triggers", len(candidates))
        return {"candidates": candidates}

    # ----- the store -----

    def _snapshot(self, scheduler, doc: Document) -> CompactedPrefix:
        """A ready document copied out of the pool (to the CPU), as the store writes it."""
        pool = scheduler.tp_worker.model_runner.token_to_kv_pool
        installed = doc.installed
        columns = [installed.slots[installed.layout.columns(layer)] for layer in range(pool.layer_num)]
        return CompactedPrefix(
            keys=[pool.k_buffer[layer][slots].permute(1, 0, 2).cpu() for layer, slots in enumerate(columns)],
            values=[pool.v_buffer[layer][slots].permute(1, 0, 2).cpu() for layer, slots in enumerate(columns)],
            beta=[b[:, installed.layout.columns(layer)].cpu() for layer, b in enumerate(installed.bias)],
            logical_length=doc.length, token_ids=list(doc.tokens),
            fingerprint=self.fingerprint(), method=doc.method, config=doc.config, timings=doc.timings,
        )

    def _write_in_background(self, doc_id: str, prefix: CompactedPrefix) -> Job | None:
        def write() -> dict:
            try:
                return {"doc_id": doc_id, "stored": True, "bytes": self.store().save(doc_id, prefix)}
            except Exception:
                self.registry.stats.add("store_failures")
                raise

        try:
            return self.io.submit(write, "the save")
        except QueueFull:
            self.registry.stats.add("store_failures")
            return None

    def _track(self, job: Job | None) -> dict:
        if job is None:
            raise DocumentError(HTTPStatus.SERVICE_UNAVAILABLE, "the store's queue is full; retry later")
        while len(self.jobs) >= MAX_FINISHED_JOBS and any(j.done() for j in self.jobs.values()):
            del self.jobs[next(key for key, j in self.jobs.items() if j.done())]
        key = uuid.uuid4().hex
        self.jobs[key] = job
        return {"job": key}

    def op_job(self, scheduler, job: str) -> dict:
        """A save or store job: ``{"done": False}`` while it runs, then its result (errors raise)."""
        running = self.jobs.get(job)
        if running is None:
            raise DocumentError(HTTPStatus.NOT_FOUND, "no such job")
        if not running.done():
            return {"done": False}
        del self.jobs[job]
        return {"done": True, **running.result()}  # a failed job raises its error here

    def op_save(self, scheduler, doc_id: str) -> dict:
        doc = self._get(doc_id)
        _single_rank(scheduler, "save")
        if doc.state is not DocState.READY:
            raise DocumentError(HTTPStatus.CONFLICT, f"document {doc_id} is still being registered")
        return self._track(self._write_in_background(doc_id, self._snapshot(scheduler, doc)))

    def op_load(self, scheduler, doc_id: str, auto: bool = False) -> dict:
        """Install a stored document (read and checked on the I/O thread; ``advance`` installs it)."""
        check_document_id(doc_id)
        _single_rank(scheduler, "load")
        existing = self.registry.get(doc_id)
        if existing is not None:
            return {**existing.describe(), "existing": True}
        check_model(scheduler)
        in_progress = self.registry.in_state(*IN_PROGRESS)
        if len(in_progress) >= self.config.max_registrations:
            raise DocumentError(HTTPStatus.SERVICE_UNAVAILABLE, f"{len(in_progress)} registrations are in progress, "
                                "the server's limit (--am-max-registrations); retry when one finishes")
        try:
            job = self.io.submit(lambda: Solved(self.store().load(doc_id, self.fingerprint())), "the load")
        except QueueFull:
            raise DocumentError(HTTPStatus.SERVICE_UNAVAILABLE, "the store's queue is full; retry later") from None
        doc = Document(doc_id, self.registry.new_index(), array("q"), "", {}, auto, DocState.LOADING, job=job)
        self.registry.add(doc)
        return {**doc.describe(), "existing": False}

    def op_export(self, scheduler, doc_id: str) -> dict:
        """Write a ready document as a handoff for the other data-parallel ranks (a job: its result names it)."""
        doc = self._get(doc_id)
        _single_rank(scheduler, "handing a document to other data-parallel ranks")
        if doc.state is not DocState.READY:
            raise DocumentError(HTTPStatus.CONFLICT, f"document {doc_id} is still being registered")
        prefix = self._snapshot(scheduler, doc)
        return self._track(self.io.submit(lambda: {"handoff": self.handoffs().write(doc_id, prefix)}, "the handoff"))

    def op_release_handoff(self, scheduler, handoff: str) -> dict:
        self.handoffs().remove(handoff)
        return {"handoff": handoff}

    def op_store_list(self, scheduler) -> dict:
        return self._track(self.io.submit(lambda: {"documents": self.store().list(), **self._store_usage()}, "the listing"))

    def op_store_delete(self, scheduler, doc_id: str) -> dict:
        check_document_id(doc_id)
        return self._track(self.io.submit(lambda: {"doc_id": doc_id, "deleted": self.store().delete(doc_id)}, "the delete"))

    def _store_usage(self) -> dict:
        return {"bytes": self.store().used_bytes(), "quota_bytes": self.config.store_quota_bytes}

    # ----- stats -----

    def op_stats(self, scheduler) -> dict:
        """Counters, gauges, the KV pool's accounting and, when the scheduler is idle, SGLang's leak check."""
        faults.inject("rpc_slow")
        idle = scheduler.is_fully_idle()
        check = {"idle": idle, "leak": None, "detail": []}
        if idle:
            leak, messages = scheduler.invariant_checker._check_all_pools(scheduler.pool_stats_observer.get_pool_stats())
            check.update(leak=bool(leak), detail=list(messages) if leak else [])
        registry, policy = self.registry, self.registry.policy
        states = [doc.state for doc in registry.documents.values()]
        ready = [doc for doc in registry.documents.values() if doc.state is DocState.READY]
        held = [doc.installed.kv_bytes(doc.length) for doc in ready]
        return {
            "dp_rank": self.dp_rank,
            **registry.stats.snapshot(),
            "kv_bytes": {kind: sum(entry[kind] for entry in held) for kind in ("global", "sliding", "total", "uncompacted")},
            "documents": {"ready": states.count(DocState.READY), "registering": len(states) - states.count(DocState.READY),
                          "auto": sum(doc.auto and doc.state is DocState.READY for doc in registry.documents.values())},
            "pool": {"total": scheduler.max_total_num_tokens,
                     "available": scheduler.tp_worker.model_runner.token_to_kv_pool_allocator.available_size(),
                     "evictable": self.cache.evictable_size(), "protected": self.cache.protected_size()},
            "idle_check": check,
            "limits": {"max_registrations": self.config.max_registrations, "solve_timeout": self.config.solve_timeout,
                       "max_document_tokens": self.config.max_document_tokens,
                       "store_quota_bytes": self.config.store_quota_bytes},
            "auto": None if policy is None else {
                **policy.describe(), "budget_slots": policy.budget_slots(scheduler.max_total_num_tokens),
                "tracked_prefixes": len(registry.tracker.groups), "pending_candidates": len(registry.tracker.candidates),
            },
        }


def check_model(scheduler) -> None:
    """Documents need a bias-aware backend and one plain KV pool for every layer (global and sliding-window
    layers alike, see ``layout``)."""
    runner = scheduler.tp_worker.model_runner
    if not getattr(runner.attn_backend, "adds_document_bias", False):
        raise DocumentError(HTTPStatus.BAD_REQUEST, "compacted documents need a bias-aware attention backend: "
                            "--attention-backend triton, flashinfer or torch_native (CPU)")
    if not runner.spec_algorithm.is_none():
        raise DocumentError(HTTPStatus.BAD_REQUEST, "compacted documents do not support speculative decoding yet")
    if runner.is_hybrid_swa or runner.model_config.attention_chunk_size is not None:
        raise DocumentError(HTTPStatus.BAD_REQUEST, "compacted documents need one KV pool for every layer; this model "
                            "uses SGLang's hybrid sliding-window pool or chunked attention, which the extension does not "
                            "support yet")
    pool = runner.token_to_kv_pool
    if not hasattr(pool, "k_buffer") or pool.store_dtype != pool.dtype:
        raise DocumentError(HTTPStatus.BAD_REQUEST, f"compacted documents need a plain {pool.dtype} KV pool (no fp8/fp4 cache)")


def check_compacted_windows(runner) -> None:
    if not getattr(runner.attn_backend, "serves_compacted_windows", False):
        raise DocumentError(HTTPStatus.BAD_REQUEST, "compacted sliding-window layers are served on --attention-backend "
                            "torch_native only: the Triton and FlashInfer kernels gather a decode query's window from "
                            "its start, where the bias hook would need each slot's place in the node")


def _single_rank(scheduler, what: str) -> None:
    if scheduler.tp_size > 1:
        raise DocumentError(HTTPStatus.NOT_IMPLEMENTED, f"{what} with tensor parallelism is not supported yet")


def _describe_config(registration: RegistrationRequest) -> dict:
    """What ``describe`` and the saved artifact record of how the document was compacted."""
    return {"budget": registration.budget, "query_source": dict(registration.query_source),
            "head_budgets": registration.head_budgets is not None, "max_queries_per_head": registration.max_queries_per_head,
            "keep_first": registration.keep_first, "options": dict(registration.options),
            "compact_windows": registration.compact_windows, "questions": len(registration.questions),
            "adapt": registration.adapt}

