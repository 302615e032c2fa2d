"""Refits of adapting documents from live traffic, on the scheduler's thread (see ``adapt``).

Once enough new live queries arrived at a ready adapting document, its refit is solved on the solver
thread; when that is done the refit is installed as a new version of the document, and the version it
replaces is retired (``Registrations.reap`` removes it once no request holds it).
"""

from __future__ import annotations

import logging
from http import HTTPStatus

import torch

from ..prefix import CompactedPrefix
from . import faults
from .adapt import host_layers
from .config import ServerConfig
from .errors import DocumentError
from .jobs import QueueFull, Worker
from .registrations import Registrations
from .registry import DocState, Document
from .solve import solve_document

logger = logging.getLogger(__name__)


class Refits:
    def __init__(self, registrations: Registrations, config: ServerConfig, solver: Worker):
        self.registrations, self.config, self.solver = registrations, config, solver
        self.cache, self.registry = registrations.cache, registrations.registry

    def advance(self, scheduler) -> None:
        """Install the adapting documents' finished refits; start one where enough new live queries arrived."""
        for doc in self.registry.in_state(DocState.READY):
            adaptation = doc.adaptation
            if adaptation is None:
                continue
            if adaptation.job is not None and adaptation.job.done():
                self._install_refit(scheduler, doc)
                self.registry.update_gauges()  # the live fidelity the refit measured first
            elif adaptation.due():
                self._start_refit(doc)

    def _start_refit(self, doc: Document) -> None:
        adaptation, seen_before = doc.adaptation, doc.adaptation.seen_at_fit
        unfitted = adaptation.unfitted()
        inputs = adaptation.refit_inputs(self.solver.device or torch.device("cpu"))
        plan, tokens, config = adaptation.plan, list(doc.tokens), {**doc.config, "fidelity": None}
        fingerprint = self.registrations.store.fingerprint_or_empty()

        def work() -> CompactedPrefix:
            faults.inject("refit_slow")
            adaptation.measure_live(unfitted)
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
        adaptation.serving = host_layers(prefix, adaptation.live.layers)
        adaptation.refits += 1
        doc.timings["refit_seconds"] = prefix.timings["solve_seconds"]
        self.registry.stats.add("refits")
        self.registrations.reap(scheduler)  # an old version nobody uses goes at once
        logger.info("sglang-am: document %s refitted from %d live queries (refit %d)", doc.doc_id, adaptation.live.seen,
                    adaptation.refits)

    # ----- automatic documents -----
