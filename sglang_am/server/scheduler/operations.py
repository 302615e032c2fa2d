"""The document operations of one scheduler process: one RPC each, on the scheduler's thread.

``hooks.around_rpc`` decodes each call into its ``protocol`` record and hands it to ``call``, which runs
the part that owns it: ``registrations`` (prepare, advance, abandon, drop, automatic candidates), ``refits``
(observe an automatic document), ``store_operations`` (save, load, export and their jobs) or, here, the
reading ones (list, get, stats).
This object owns those parts and the two worker threads they share: the solver (solves and refits) and
the store's I/O thread. Before every call it releases what cancelled solves and retired versions held.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from .. import faults
from ..config import ServerConfig
from ..protocol import (
    Abandon,
    Advance,
    AuditLearned,
    AutoCandidates,
    Certify,
    CertifyLearned,
    CollectStats,
    DeleteStored,
    Description,
    Drop,
    Export,
    GetDocument,
    ListDocuments,
    ListStored,
    Load,
    NoteFidelity,
    Observe,
    Operation,
    PollAutoCandidates,
    PollJob,
    Prepare,
    ReleaseHandoff,
    Save,
)
from .cache import AMRadixCache
from .jobs import Worker
from .refits import Refits
from .registrations import Registrations
from .registry import DocState
from .store_operations import StoreOperations

SOLVER_NICE = 10
logger = logging.getLogger(__name__)


class DocumentOperations:
    def __init__(self, cache: AMRadixCache, config: ServerConfig, model_path: str, device, dp_rank: int = 0):
        self.cache, self.registry, self.config, self.dp_rank = cache, cache.registry, config, dp_rank
        # Solves and refits run behind the scheduler's forwards on a CPU: serving latency comes first.
        self.solver = Worker("solver", max_queued=config.max_registrations, device=device, nice=SOLVER_NICE)
        self.store = StoreOperations(self.registry, config, model_path, Worker("store", max_queued=64))
        self.registrations = Registrations(cache, config, dp_rank, self.solver, self.store)
        self.refits = Refits(self.registrations, config, self.solver)
        registrations, store = self.registrations, self.store
        self._handlers: dict[type[Operation], Callable] = {
            ListDocuments: self.list_documents, GetDocument: self.get_document, CollectStats: self.stats,
            Prepare: registrations.prepare, Advance: registrations.advance, Certify: registrations.certify,
            Abandon: registrations.abandon,
            NoteFidelity: registrations.note_fidelity, Drop: registrations.drop,
            PollAutoCandidates: self.poll_auto, Observe: self.refits.observe,
            CertifyLearned: self.refits.certify_learned,
            AuditLearned: self.refits.audit_learned,
            Save: store.save, Load: store.load, Export: store.export, ReleaseHandoff: store.release_handoff,
            ListStored: store.list_stored, DeleteStored: store.delete_stored, PollJob: store.poll_job,
        }

    def background_step(self, scheduler) -> None:
        """After each batch and when idle: release what ended, and move refits and learned documents on. A failure
        here is the extension's bug, not the batch's: it is logged and counted (``background_failures``), and
        serving goes on."""
        try:
            faults.inject("upkeep")
            self.registrations.reap(scheduler)
            self.refits.advance(scheduler)
        except Exception:  # noqa: BLE001  (raised into SGLang's event loop, it would stop the scheduler)
            self.registry.stats.add("background_failures")
            logger.exception("sglang-am: a background step of the document operations failed")

    def call(self, scheduler, operation: Operation) -> dict:
        self.registrations.reap(scheduler)
        return self._handlers[type(operation)](scheduler, operation)

    def poll_auto(self, scheduler, operation: PollAutoCandidates) -> AutoCandidates:
        """The reuse tracker's new candidates, the learned candidates waiting for their held-out questions, and the
        installed learned nodes due an answer audit."""
        return {"candidates": self.registrations.take_auto_candidates(), "certify": self.refits.certifications(),
                "audit": self.refits.audits()}

    def list_documents(self, scheduler, operation: ListDocuments) -> dict:
        return {"documents": [doc.describe() for doc in self.registry.documents.values()]}

    def get_document(self, scheduler, operation: GetDocument) -> Description:
        return self.registry.existing(operation.doc_id).describe()

    def stats(self, scheduler, operation: CollectStats) -> dict:
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
            "documents": {"ready": states.count(DocState.READY), "observing": states.count(DocState.OBSERVING),
                          "registering": len(states) - states.count(DocState.READY) - states.count(DocState.OBSERVING),
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
