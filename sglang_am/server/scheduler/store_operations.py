"""The store and handoff operations of one scheduler process, and the served model's identity.

``save`` copies a ready document out of the pool here, on the scheduler's thread, and writes it on the
store's I/O thread; ``load`` reads a stored document there, and the registrations' ``advance`` installs it.
``export`` writes a ready document as a handoff file for the other data-parallel ranks, which read it back
(``Registrations.advance``). Store jobs run behind the scheduler: the HTTP process polls each with ``PollJob``.
The store is keyed by the served checkpoint's fingerprint, so a document is only loaded into the model it
was compacted for.
"""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
from array import array
from http import HTTPStatus
from pathlib import Path

from ...fingerprint import checkpoint_fingerprint
from ...prefix import CompactedPrefix
from ..compat import check_model, single_rank
from ..config import ServerConfig
from ..errors import DocumentError
from ..protocol import DeleteStored, Export, JobStarted, JobState, ListStored, Load, PollJob, Prepared, ReleaseHandoff, Save
from .jobs import Job, QueueFull, Worker
from .registry import IN_PROGRESS, DocState, Document, DocumentRegistry
from .solve import Solved
from .store import DocumentStore, Handoffs, check_document_id

MAX_FINISHED_JOBS = 256  # finished save/store jobs kept for their poller


class StoreOperations:
    def __init__(self, registry: DocumentRegistry, config: ServerConfig, model_path: str, io: Worker):
        self.registry, self.config, self.model_path, self.io = registry, config, model_path, io
        self.jobs: dict[str, Job] = {}  # save and store jobs the HTTP process polls
        self._identity_lock = threading.Lock()
        self._fingerprint: dict | None = None
        self._store: DocumentStore | None = None
        self._handoffs: Handoffs | None = None

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

    def document_store(self) -> DocumentStore:
        """This model's part of the store root: one subdirectory per fingerprint."""
        fingerprint = self.fingerprint()
        with self._identity_lock:
            if self._store is None:
                key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
                self._store = DocumentStore(Path(self.config.store_dir) / key, self.config.store_quota_bytes)
            return self._store

    def handoffs(self) -> Handoffs:
        store = self.document_store()
        with self._identity_lock:
            if self._handoffs is None:
                self._handoffs = Handoffs(store.root, self.config.store_quota_bytes)
            return self._handoffs

    def fingerprint_or_empty(self) -> dict:
        """Serving needs no fingerprint; only save and load refuse without one."""
        try:
            return self.fingerprint()
        except DocumentError:
            return {}

    # ----- snapshots and jobs -----

    def snapshot(self, scheduler, doc: Document) -> CompactedPrefix:
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

    def write_in_background(self, doc_id: str, prefix: CompactedPrefix) -> Job | None:
        def write() -> dict:
            try:
                return {"doc_id": doc_id, "stored": True, "bytes": self.document_store().save(doc_id, prefix)}
            except Exception:
                self.registry.stats.add("store_failures")
                raise

        try:
            return self.io.submit(write, "the save")
        except QueueFull:
            self.registry.stats.add("store_failures")
            return None

    def _track(self, job: Job | None) -> JobStarted:
        if job is None:
            raise DocumentError(HTTPStatus.SERVICE_UNAVAILABLE, "the store's queue is full; retry later")
        while len(self.jobs) >= MAX_FINISHED_JOBS and any(j.done() for j in self.jobs.values()):
            del self.jobs[next(key for key, j in self.jobs.items() if j.done())]
        key = uuid.uuid4().hex
        self.jobs[key] = job
        return {"job": key}

    def poll_job(self, scheduler, operation: PollJob) -> JobState:
        """A save or store job: ``{"done": False}`` while it runs, then its result (errors raise)."""
        job = operation.job
        running = self.jobs.get(job)
        if running is None:
            raise DocumentError(HTTPStatus.NOT_FOUND, "no such job")
        if not running.done():
            return {"done": False}
        del self.jobs[job]
        return {"done": True, **running.result()}  # a failed job raises its error here

    # ----- operations -----

    def _ready_copy(self, scheduler, doc_id: str, what: str) -> CompactedPrefix:
        """A ready document copied out of the pool for ``what`` (save, handoff); 409 while it is registering."""
        doc = self.registry.existing(doc_id)
        single_rank(scheduler, what)
        if doc.state is not DocState.READY:
            raise DocumentError(HTTPStatus.CONFLICT, f"document {doc_id} is still being registered")
        return self.snapshot(scheduler, doc)

    def save(self, scheduler, operation: Save) -> JobStarted:
        doc_id = operation.doc_id
        return self._track(self.write_in_background(doc_id, self._ready_copy(scheduler, doc_id, "save")))

    def load(self, scheduler, operation: Load) -> Prepared:
        """Install a stored document (read and checked on the I/O thread; ``advance`` installs it)."""
        doc_id, auto = check_document_id(operation.doc_id), operation.auto
        single_rank(scheduler, "load")
        existing = self.registry.get(doc_id)
        if existing is not None:
            return {**existing.describe(), "existing": True}
        check_model(scheduler)
        in_progress = self.registry.in_state(*IN_PROGRESS)
        if len(in_progress) >= self.config.max_registrations:
            raise DocumentError(HTTPStatus.SERVICE_UNAVAILABLE, f"{len(in_progress)} registrations are in progress, "
                                "the server's limit (--am-max-registrations); retry when one finishes")
        try:
            job = self.io.submit(lambda: Solved(self.document_store().load(doc_id, self.fingerprint())), "the load")
        except QueueFull:
            raise DocumentError(HTTPStatus.SERVICE_UNAVAILABLE, "the store's queue is full; retry later") from None
        doc = Document(doc_id, self.registry.new_index(), array("q"), "", {}, auto, DocState.LOADING, job=job)
        self.registry.add(doc)
        return {**doc.describe(), "existing": False, "registration": doc.index}

    def export(self, scheduler, operation: Export) -> JobStarted:
        """Write a ready document as a handoff for the other data-parallel ranks (a job: its result names it)."""
        doc_id = operation.doc_id
        prefix = self._ready_copy(scheduler, doc_id, "handing a document to other data-parallel ranks")
        return self._track(self.io.submit(lambda: {"handoff": self.handoffs().write(doc_id, prefix)}, "the handoff"))

    def release_handoff(self, scheduler, operation: ReleaseHandoff) -> dict:
        self.handoffs().remove(operation.handoff)
        return {"handoff": operation.handoff}

    def list_stored(self, scheduler, operation: ListStored) -> JobStarted:
        store = self.document_store
        return self._track(self.io.submit(lambda: {"documents": store().list(), **self._store_usage()}, "the listing"))

    def delete_stored(self, scheduler, operation: DeleteStored) -> JobStarted:
        doc_id = check_document_id(operation.doc_id)
        store = self.document_store
        return self._track(self.io.submit(lambda: {"doc_id": doc_id, "deleted": store().delete(doc_id)}, "the delete"))

    def _store_usage(self) -> dict:
        return {"bytes": self.document_store().used_bytes(), "quota_bytes": self.config.store_quota_bytes}
