"""Documents that learn from live traffic, on the scheduler's thread (see ``adapt``).

Adapting documents: once enough new live queries arrived at a ready one, its refit is solved on the solver
thread; when that is done the refit is installed as a new version of the document, and the version it
replaces is retired (``Registrations.reap`` removes it once no request holds it).

Learned documents (``--am-auto`` with the query source ``live``): ``observe`` adds an automatic document
that serves nothing yet (``DocState.OBSERVING``) while the requests reusing its prefix are served in full and
tagged (``hooks``). Once enough of them are in its reservoir, its prefix's KV is copied from the pool to host
memory, and the node is solved from their queries and certified on the half held out (``adapt.Observation``),
one document at a time: the ladder's smallest rung within the attention bound is picked; with held-out greedy
requests its candidate is installed for probes and handed to the HTTP process (``certifications``), which asks
it their questions and answers ``certify_learned``: the node is installed, with an adaptation that watches it,
only if its answers agree with what those requests were served. A refusal keeps observing, and three documents
given up in a row pause observing for a window. A client's document registered with ``learn`` learns the same way,
but its full prefix stays pinned in the tree while it observes, and it is never given up: it observes afresh.
Installed, it is measured on the new live queries whenever a refit would be due. With ratio auto it is refitted
only when that live figure is above the bound, and goes back to observing (its versions retired) when the
figure is above the bound twice in a row, or its refit's own figure is: no refit keeps up with what the
traffic asks now. With a fixed ratio it is only measured. Its answers are audited too (``adapt.AnswerAudit``):
every so many greedy requests it served, the HTTP process asks the full prefix the latest ones' prompts, and with
ratio auto a node whose answers disagree reverts the same way.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import secrets
import time
from array import array
from http import HTTPStatus

import torch

from ...core.plan import LayerPlan
from ...prefix import CompactedPrefix
from .. import faults
from ..auto import AUTO_LADDER_TOP, GUARD_REFUSALS_BEFORE_PAUSE
from ..compat import check_model, single_rank
from ..config import ServerConfig
from ..errors import DocumentError
from ..protocol import AuditLearned, CertifyLearned, Description, Observe
from ..registration import DEFAULT_ANSWER_TOKENS, RATIO_LADDER
from .adapt import Adaptation, AnswerAudit, LearnedCertification, LiveQueries, Observation, host_layers, nbytes
from .jobs import QueueFull, Worker
from .layout import node_floor
from .registrations import Registrations
from .registry import DocState, Document, document_id
from .solve import Solved, SolvePlan, pool_kv, solve, solve_document

logger = logging.getLogger(__name__)
# Guard refusals an observing document takes (each after twice the requests of the one before) before it is
# given up; the reuse tracker proposes its prefix again after a window.
OBSERVE_TRIES = 2
# The share of the solver thread's time that measuring watched documents may take: each measure is followed by a
# pause 1 / WATCH_SHARE - 1 times as long, one watched document at a time (measuring all of them as often as
# adapting ones cut bench_serving's 32 registered prefixes from 2.21x to 1.61x the requests/s of no document).
WATCH_SHARE = 0.1
LEARNED_MAX_QUERIES_PER_HEAD = 5000  # as a registration's default
# The paper's NNLS start for nodes learned from live traffic: on Gemma-3-270M's Zipf stream they kept agreement
# with stock 0.98 with it, 0.95 and 0.84 (two runs) with the default's unit fallback (docs/automatic-compaction.md).
LEARNED_OPTIONS = {"nnls_start": "least-squares"}


def _picked_ratio(prefix: CompactedPrefix) -> float:
    """The ratio a learned solve installed: the ladder's pick, or the fixed ratio."""
    return prefix.config["fidelity"].get("ratio", prefix.config["budget"])


def reentry_bound(bound: float) -> float:
    """What a reverted document's next node must reproduce of its held-out answers: half the disagreement ``bound``
    allows (0.9 for 0.8). Hysteresis: the traffic moved once, and a node certified at the bound itself serves
    answers at the bound's loss until an audit sends it back again (Gemma's drift stream: certified at 0.80 after
    its revert, it lost 10 to 25 points of accuracy in the last fifth)."""
    return 1 - (1 - bound) / 2


def _ladder(lowest: float) -> tuple[float, ...]:
    """The rungs a learned document with ratio auto may pick, from ``lowest`` up."""
    return tuple(ratio for ratio in RATIO_LADDER if lowest <= ratio <= AUTO_LADDER_TOP)


class Refits:
    def __init__(self, registrations: Registrations, config: ServerConfig, solver: Worker):
        self.registrations, self.config, self.solver = registrations, config, solver
        self.cache, self.registry = registrations.cache, registrations.registry
        self.given_up_in_a_row = 0  # learned documents in a row whose guard refused them to the end
        self.paused_until = 0.0  # no prefix is observed before then (``_note_given_up``)
        self.watch_resumes_at = 0.0  # no watched document is measured before then (``WATCH_SHARE``)

    def advance(self, scheduler) -> None:
        """Install the adapting documents' finished refits; start one where enough new live queries arrived.
        Solve the observing documents that observed enough requests, and install what their guard certifies."""
        ready = [doc for doc in self.registry.in_state(DocState.READY) if doc.adaptation is not None]
        measuring = any(doc.adaptation.mode == "watch" and doc.adaptation.job is not None for doc in ready)
        for doc in ready:
            adaptation, watched = doc.adaptation, doc.adaptation.mode == "watch"
            if adaptation.job is not None and adaptation.job.done():
                if watched:
                    self._finish_measure(doc)
                else:
                    self._install_refit(scheduler, doc)
                self.registry.update_gauges()  # the live fidelity the job measured first
            elif adaptation.due() and not watched:
                self._start_refit(doc)
            elif adaptation.due() and not measuring and time.monotonic() >= self.watch_resumes_at:
                self._start_measure(doc)
                measuring = True
        for doc in self.registry.in_state(DocState.OBSERVING):
            self._pin(doc)
            if doc.job is not None and doc.job.done():
                self._finish_learning(scheduler, doc)
            elif doc.observation.certifying is not None and time.monotonic() > doc.observation.certifying.deadline:
                self._end_certification(doc)
                self._give_up(doc, "its held-out requests were not asked of its candidate in time", refused=False)
        # One at a time: the solver thread runs one job at a time anyway, and a document that waits keeps observing.
        observing = self.registry.in_state(DocState.OBSERVING)  # without those just installed or given up
        if all(doc.job is None for doc in observing):
            due = next((doc for doc in observing if doc.observation.due()), None)
            if due is not None:
                self._start_learning(scheduler, due)

    def _start_refit(self, doc: Document) -> None:
        adaptation, seen_before = doc.adaptation, doc.adaptation.seen_at_fit
        unfitted = adaptation.unfitted()
        inputs = adaptation.refit_inputs(self.solver.device or torch.device("cpu"))
        plan, tokens, config = adaptation.plan, list(doc.tokens), {**doc.config, "fidelity": None}
        fingerprint = self.registrations.store.fingerprint_or_empty()

        def work() -> CompactedPrefix | None:
            faults.inject("refit_slow")
            adaptation.measure_live(unfitted)
            if not adaptation.needs_refit():  # a learned document within its bound: not refitted
                return None
            return solve_document(inputs, plan, tokens, self.cache.windows, fingerprint, config)

        self._submit(adaptation, work, "a refit", seen_before)

    def _start_measure(self, doc: Document) -> None:
        """A watched document's live fidelity on the positions it has not been measured on; never a refit."""
        adaptation, seen_before = doc.adaptation, doc.adaptation.seen_at_fit
        unfitted = adaptation.unfitted()
        adaptation.seen_at_fit = adaptation.live.seen

        def work() -> float:
            start = time.perf_counter()
            adaptation.measure_live(unfitted)
            return time.perf_counter() - start

        self._submit(adaptation, work, "a live-fidelity measure", seen_before)

    def _submit(self, adaptation: Adaptation, work, what: str, seen_before: int) -> None:
        try:
            adaptation.job = self.solver.submit(work, what, timeout=self.config.solve_timeout)
        except QueueFull:  # registrations go first; the job waits for the next batch
            adaptation.seen_at_fit = seen_before

    def _finish_measure(self, doc: Document) -> None:
        """The next watched document is measured after a pause ``1 / WATCH_SHARE - 1`` times as long as this one."""
        job, doc.adaptation.job = doc.adaptation.job, None
        try:
            seconds = job.result()
        except Exception as error:  # noqa: BLE001  (the document serves on, unmeasured this time)
            seconds = 0.0
            logger.warning("sglang-am: measuring document %s failed: %r", doc.doc_id, error)
        self.watch_resumes_at = time.monotonic() + seconds * (1 / WATCH_SHARE - 1)

    def _install_refit(self, scheduler, doc: Document) -> None:
        """The refit becomes the version new requests are served from; the old one is retired (``reap``
        removes it once the requests that started on it end). A failure leaves the document as it was."""
        adaptation = doc.adaptation
        job, adaptation.job = adaptation.job, None
        table = getattr(scheduler.tp_worker.model_runner.attn_backend, "bias_table", None)
        try:
            prefix: CompactedPrefix | None = job.result()
            if prefix is None:
                return
            figure = (prefix.config.get("fidelity") or {}).get("relative_l2")
            if adaptation.mode == "guard" and (adaptation.over_bound >= 2 or (figure or 0.0) > adaptation.bound):
                live = (adaptation.live_fidelity or {}).get("relative_l2")
                self._revert(scheduler, doc, f"live error {live} above the bound {adaptation.bound}")
                return
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
        adaptation.serving = host_layers(prefix, adaptation.live.layers)
        if adaptation.audit is not None:
            adaptation.audit.restart()
        adaptation.refits += 1
        doc.timings["refit_seconds"] = prefix.timings["solve_seconds"]
        self.registry.stats.add("refits")
        self.registrations.reap(scheduler)  # an old version nobody uses goes at once
        logger.info("sglang-am: document %s refitted from %d live queries (refit %d)", doc.doc_id, adaptation.live.seen,
                    adaptation.refits)

    # ----- learned documents -----

    def observe(self, scheduler, operation: Observe) -> Description:
        """Add a document that learns from the requests reusing ``input_ids``: an automatic one, or a client's
        (``explicit``, 503 without room in the pool for its pinned prefix beside its node). 503 without room for its
        reservoir and the adaptation that will watch it, within ``--am-adapt-memory-bytes``."""
        ids, registry, policy, explicit = operation.input_ids, self.registry, self.registry.policy, operation.explicit
        if policy is None:
            raise DocumentError(HTTPStatus.BAD_REQUEST, "learn uses the automatic policy: start the server with --am-auto")
        doc_id = document_id(ids)
        existing = registry.get(doc_id)
        if existing is not None:
            if explicit and existing.auto:  # a client registered it: no longer evicted or given up
                existing.auto = False
                registry.update_gauges()
            return {**existing.describe(), "existing": True}
        if not explicit and time.monotonic() < self.paused_until:
            raise DocumentError(HTTPStatus.UNPROCESSABLE_ENTITY, f"{GUARD_REFUSALS_BEFORE_PAUSE} learned prefixes in a "
                                "row did not generalise to requests held out of their fit: no prefix is observed "
                                "for a window")
        check_model(scheduler)
        single_rank(scheduler, "learning from traffic")
        runner = scheduler.tp_worker.model_runner
        pool, q_heads = runner.token_to_kv_pool, runner.model_config.num_attention_heads // scheduler.tp_size
        layers = self.registrations.compacted_layers(False)
        capacity = self.config.adapt_reservoir
        reservoir = nbytes(len(layers), capacity, q_heads, pool.head_dim, pool.store_dtype.itemsize)
        top = AUTO_LADDER_TOP if policy.ratio == "auto" else policy.ratio
        slots = max(node_floor(self.cache.windows, len(ids), False), policy.keep_first + math.ceil(top * len(ids)))
        free = scheduler.max_total_num_tokens - self.registrations.pinned_slots()
        if explicit and len(ids) + slots > free:
            raise DocumentError(HTTPStatus.SERVICE_UNAVAILABLE, f"the KV pool has {free} slots besides pinned documents; "
                                f"learning this document pins its {len(ids)} tokens beside a node of up to {slots}: drop "
                                "documents or raise --max-total-tokens")
        # The reservoir twice: the queries the node is fitted to stay for its refits, beside new live ones.
        needed = self.registrations.admit_adaptation(pool, len(ids), q_heads, reservoir, False, slots) + reservoir
        config = {"budget": policy.ratio, "query_source": "live", "max_queries_per_head": LEARNED_MAX_QUERIES_PER_HEAD,
                  "keep_first": policy.keep_first, "options": dict(LEARNED_OPTIONS), "compact_windows": False, "questions": 0,
                  "answer_tokens": DEFAULT_ANSWER_TOKENS, "adapt": True}
        observation = self._new_observation(layers)
        # The salt lets the HTTP process's probes, and no client's request, reach the candidate (``hooks``).
        doc = Document(doc_id, registry.new_index(), array("q", ids), policy.method, config, not explicit,
                       DocState.OBSERVING, salt=secrets.token_hex(16), adapt_bytes=needed, observation=observation)
        registry.add(doc)
        self._pin(doc)
        registry.update_gauges()
        logger.info("sglang-am: observing a %s %d-token prefix (document %s)", doc.origin, len(ids), doc_id)
        return {**doc.describe(), "existing": False, "registration": doc.index}

    def _pin(self, doc: Document) -> None:
        """A learned explicit document keeps its full prefix in the tree while it observes, as a registered document
        keeps its node, once a request has computed it; released when its node is installed or it is dropped. Not
        held yet, it is looked for (a radix match) once per new request that reuses it."""
        observation = doc.observation
        if doc.auto or doc.source is not None or observation.tagged == observation.pin_tried_at:
            return
        observation.pin_tried_at = observation.tagged
        doc.source = self.cache.hold_prefix(doc.tokens, None)

    def _new_observation(self, layers, tries: int = 0, agreement_bound: float | None = None) -> Observation:
        """``tries``: guard refusals already counted (each doubles the requests the next solve waits for);
        ``agreement_bound``: stricter than the policy's (after a revert)."""
        return Observation(LiveQueries(layers, self.config.adapt_reservoir), self.registry.policy.observe_requests,
                           DEFAULT_ANSWER_TOKENS, tries=tries, agreement_bound=agreement_bound)

    def _start_learning(self, scheduler, doc: Document) -> None:
        """Copy the prefix's KV to host memory (it stays there for the refits of the node) and solve its node from
        the observed requests, on the solver thread. No tree lock is held: the pool keeps its room for requests."""
        hold = self.cache.hold_prefix(doc.tokens, None)
        if hold is None:  # evicted from the pool: the next request that reuses it computes it again
            return
        pool, policy, observation = scheduler.tp_worker.model_runner.token_to_kv_pool, self.registry.policy, doc.observation
        try:
            read = pool_kv(pool, hold.slots)
            # Indexing the pool by slots already copies: ``cpu`` moves a GPU pool's copy, a CPU one's stays as it is.
            kv = {layer: tuple(part.cpu() for part in read(layer)) for layer in range(pool.layer_num)}
        finally:
            self.cache.unlock(hold.lock)
        inputs, heldout = observation.fit_inputs(kv.__getitem__, pool.layer_num, pool.head_num)
        ladder = _ladder(observation.lowest_ratio) if policy.ratio == "auto" else None
        layers = LayerPlan(policy.method, ladder[0] if ladder else policy.ratio, {"questions": 1.0},
                           LEARNED_MAX_QUERIES_PER_HEAD, policy.keep_first, options=doc.config["options"])
        plan = SolvePlan(layers, ladder, policy.fidelity_bound if ladder else None, bool(ladder), heldout)
        tokens, config, windows = list(doc.tokens), doc.config, self.cache.windows
        compacted, adapt_bytes = self.registrations.compacted_layers(False), doc.adapt_bytes
        fingerprint = self.registrations.store.fingerprint_or_empty()

        def work() -> Solved:
            prefix, candidate = solve(inputs, plan, tokens, windows, fingerprint, config)
            watch = SolvePlan(dataclasses.replace(layers, budget=_picked_ratio(prefix)))  # refits keep the certified rung
            adaptation = Adaptation.start(inputs, watch, compacted, windows, len(tokens), self.config.adapt_reservoir,
                                          self.config.adapt_refit_every, adapt_bytes, observation.answer_steps, prefix,
                                          "guard" if plan.bound is not None else "watch", policy.fidelity_bound)
            return Solved(prefix, adaptation, candidate)

        try:
            doc.job = self.solver.submit(work, "a learned document's solve", timeout=self.config.solve_timeout)
        except QueueFull:  # registrations go first; the solve waits for the next batch
            pass

    def _finish_learning(self, scheduler, doc: Document) -> None:
        """A certified solve: with held-out greedy requests, install its candidate for their questions
        (``certifications``), else the node; after a refusal keep observing, until ``OBSERVE_TRIES`` refusals."""
        observation = doc.observation
        job, doc.job = doc.job, None
        try:
            solved: Solved = job.result()
        except Exception as error:  # noqa: BLE001  (the radix cache keeps serving the prefix in full)
            refused = isinstance(error, DocumentError) and error.status == HTTPStatus.UNPROCESSABLE_ENTITY
            self._refused(doc, error.message if isinstance(error, DocumentError) else repr(error), refused)
            return
        heldout = observation.heldout_answers()
        if solved.candidate is None or not heldout:
            self._install_learned(scheduler, doc, solved)
            return
        try:
            with self.registrations.discarding_on_failure(doc):
                self.registrations.install_candidate(scheduler, doc, solved)
        except DocumentError as error:
            logger.warning("sglang-am: learned document %s: its candidate was not installed: %s", doc.doc_id,
                           error.message)
            return
        observation.certifying = LearnedCertification(heldout, time.monotonic() + self.config.solve_timeout)

    def certifications(self) -> list[dict]:
        """The learned documents whose candidates wait for their held-out requests' questions, each handed out once
        (the HTTP process asks them and answers ``certify_learned``)."""
        waiting = []
        for doc in self.registry.in_state(DocState.OBSERVING):
            certification = doc.observation.certifying
            if certification is not None and not certification.handed_out:
                certification.handed_out = True
                waiting.append({"doc_id": doc.doc_id, "salt": doc.salt, "input_ids": list(doc.tokens),
                                "heldout": [dataclasses.asdict(answer) for answer in certification.heldout]})
        return waiting

    def certify_learned(self, scheduler, operation: CertifyLearned) -> Description:
        """The candidate's greedy answers to the held-out requests, against what those were served: with ratio auto
        the node is installed if they agree on at least ``agreement_bound`` of the tokens (after a revert,
        ``reentry_bound`` of it; a fixed ratio installs it and reports them); else the document observes on, its
        next solve from the rung above."""
        doc = self.registry.get(operation.doc_id)
        if doc is None or doc.observation is None or doc.observation.certifying is None:
            raise DocumentError(HTTPStatus.CONFLICT, f"document {operation.doc_id} is not certifying a learned node")
        observation, policy = doc.observation, self.registry.policy
        bound = observation.agreement_bound or policy.agreement_bound
        solved = self._end_certification(doc)
        if operation.figures is None:
            self._give_up(doc, f"asking its candidate the held-out requests' questions failed: {operation.error}",
                          refused=False)
            return doc.describe()
        agreement, ratio = operation.figures["agreement"], _picked_ratio(solved.prefix)
        if policy.ratio == "auto" and agreement < bound:
            self.registry.stats.add("answer_refusals")
            higher = _ladder(ratio)[1:]
            if higher:
                observation.lowest_ratio = higher[0]
            self._refused(doc, f"held-out requests' answers through the node at {ratio} agree on {agreement} of their "
                          f"tokens, below the bound {bound}", refused=True, last_chance=not higher)
            return doc.describe()
        prefix = solved.prefix
        fidelity = {**prefix.config["fidelity"], "heldout_answers": operation.figures}
        self._install_learned(scheduler, doc, dataclasses.replace(
            solved, prefix=dataclasses.replace(prefix, config={**prefix.config, "fidelity": fidelity})))
        return doc.describe()

    def audits(self) -> list[dict]:
        """The installed learned nodes whose latest greedy requests are due an answer audit, each handed out once (the
        HTTP process asks the full prefix their prompts and answers ``audit_learned``)."""
        due = []
        for doc in self.registry.in_state(DocState.READY):
            audit = None if doc.adaptation is None else doc.adaptation.audit
            if audit is not None and doc.installed is not None and audit.due():
                served = audit.hand_out(doc.installed.index, time.monotonic() + self.config.solve_timeout)
                due.append({"doc_id": doc.doc_id, "version": doc.installed.index, "input_ids": list(doc.tokens),
                            "served": [dataclasses.asdict(answer) for answer in served]})
        return due

    def audit_learned(self, scheduler, operation: AuditLearned) -> Description:
        """A learned node's latest greedy answers against the full prefix's: with ratio auto, a version that agrees on
        fewer than ``agreement_bound`` of their tokens goes (``_revert``); with a fixed ratio the figure is reported."""
        doc = self.registry.get(operation.doc_id)
        audit = None if doc is None or doc.adaptation is None else doc.adaptation.audit
        if audit is None or audit.out_for != operation.version:
            raise DocumentError(HTTPStatus.CONFLICT, f"document {operation.doc_id} has no answer audit out for version "
                                f"{operation.version}")
        audit.out_for = None
        self.registry.stats.add("answer_audits")
        audit.last = operation.figures if operation.figures is not None else {"error": operation.error}
        if operation.figures is None:
            return doc.describe()
        agreement, bound = operation.figures["agreement"], self.registry.policy.agreement_bound
        serving = doc.installed is not None and doc.installed.index == operation.version
        if serving and doc.adaptation.mode == "guard" and agreement < bound:
            self._revert(scheduler, doc, f"its latest {operation.figures['requests']} greedy requests agreed with the "
                         f"full prefix's answers on {agreement} of their tokens, below the bound {bound}")
        return doc.describe()

    def _end_certification(self, doc: Document) -> Solved | None:
        solved, doc.solved, doc.observation.certifying = doc.solved, None, None
        self.registrations.retire_candidate(doc)
        return solved

    def _install_learned(self, scheduler, doc: Document, solved: Solved) -> None:
        self.given_up_in_a_row = 0
        observation, every = doc.observation, self.registry.policy.audit_requests
        if every:  # the prompts it was learned from are no news to its audit
            solved.adaptation.audit = AnswerAudit(every, observation.answer_steps, observation.prompts)
        try:
            with self.registrations.discarding_on_failure(doc):
                self.registrations.install_solved(scheduler, doc, solved)
        except DocumentError as error:
            logger.warning("sglang-am: learned document %s not installed: %s", doc.doc_id, error.message)
            return
        doc.observation = None

    def _refused(self, doc: Document, why: str, refused: bool, last_chance: bool = False) -> None:
        """A solve or certification that did not install: a guard's refusal (``refused``) keeps observing until
        ``OBSERVE_TRIES`` (or ``last_chance``); anything else gives the document up at once."""
        observation = doc.observation
        observation.last_error = why
        observation.tries += refused
        if not refused or last_chance or observation.tries >= OBSERVE_TRIES:
            self._give_up(doc, why, refused)
        else:
            logger.info("sglang-am: learned document %s refused, observing on: %s", doc.doc_id, why)

    def _give_up(self, doc: Document, why: str, refused: bool) -> None:
        if not doc.auto:  # a client's: served in full, it learns from the requests that come next
            doc.observation = self._new_observation(doc.observation.live.layers, tries=OBSERVE_TRIES,
                                                    agreement_bound=doc.observation.agreement_bound)
            doc.observation.last_error = why
            logger.warning("sglang-am: learned document %s observes afresh: %s", doc.doc_id, why)
            return
        logger.warning("sglang-am: gave up learning document %s: %s", doc.doc_id, why)
        self.registrations.discard(doc)
        if self.registry.tracker is not None:  # its prefix is not proposed again at once, with the policy's bound
            self.registry.tracker.hold_off(doc.tokens)
        if refused:  # a fault or an evicted prefix says nothing about whether the traffic generalises
            self._note_given_up()

    def _note_given_up(self) -> None:
        """After ``GUARD_REFUSALS_BEFORE_PAUSE`` learned documents in a row were given up, this traffic's questions
        do not generalise: stop observing for a window (each solve competes with serving for the cores)."""
        self.given_up_in_a_row += 1
        if self.given_up_in_a_row < GUARD_REFUSALS_BEFORE_PAUSE:
            return
        self.given_up_in_a_row = 0
        self.paused_until = time.monotonic() + self.registry.policy.window_seconds
        stopped = [doc for doc in self.registry.in_state(DocState.OBSERVING) if doc.job is None and doc.auto]
        for doc in stopped:
            self.registrations.discard(doc, failed=False)
        logger.warning("sglang-am: %d learned prefixes in a row were refused on requests held out of their fit: no "
                       "prefix is observed for %.0f s (%d observing stopped). For capacity over fidelity, give "
                       "--am-auto-ratio 0.1", GUARD_REFUSALS_BEFORE_PAUSE, self.registry.policy.window_seconds,
                       len(stopped))

    def _revert(self, scheduler, doc: Document, why: str) -> None:
        """The traffic asks what the node no longer answers (``why``): new requests get the full prefix, and the
        document learns again from them; its versions go once no request holds them."""
        adaptation = doc.adaptation
        adaptation.stop("the document reverted to its full prefix")
        doc.retired.append(doc.installed)
        doc.installed, doc.adaptation, doc.state = None, None, DocState.OBSERVING
        doc.observation = self._new_observation(adaptation.live.layers,
                                                agreement_bound=reentry_bound(self.registry.policy.agreement_bound))
        doc.observation.last_error = f"reverted: {why}"
        logger.warning("sglang-am: learned document %s reverted to its full prefix: %s", doc.doc_id, why)
        self.registry.stats.add("reverts")
        self.registrations.reap(scheduler)
        self.registry.update_gauges()
