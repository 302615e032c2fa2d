"""What the HTTP process runs in the background while it serves: automatic compaction's poller, and the
start-up load of ``--am-load-store``; both started with FastAPI's lifespan, after SGLang's own start-up.

``AutoCompactor`` is the HTTP process's side of automatic compaction: it polls the scheduler for the
prefixes its reuse tracker proposes (``auto``) and loads them from the store, or has the ranks observe them
(query source ``live``), or registers them through the service's registration entry point, like a client's,
two at a time. It also asks the learned documents' candidates their held-out requests' questions
(``DocumentService.certify_learned``), and the full prefix the prompts their installed nodes served last
(``DocumentService.audit_learned``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from http import HTTPStatus

from ..auto import GUARD_REFUSALS_BEFORE_PAUSE, LIVE_SOURCE, AutoPolicy
from ..errors import DocumentError
from ..registration import RegistrationRequest
from .service import DocumentService

logger = logging.getLogger(__name__)


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
                    candidates, learned, audits = await self.service.auto_candidates()
                except Exception:  # keep polling: a failed poll must not stop automatic compaction
                    logger.exception("sglang-am: polling for automatic compaction failed")
                    continue
                for candidate in candidates:
                    self._start(self.compact(candidate["doc_id"], candidate["input_ids"]))
                for rank, candidate in learned:
                    self._start(self.service.certify_learned(rank, candidate))
                for rank, audit in audits:
                    self._start(self.service.audit_learned(rank, audit))
        finally:
            for task in self.running:
                task.cancel()

    def _start(self, work) -> None:
        task = asyncio.create_task(work)
        self.running.add(task)
        task.add_done_callback(self.running.discard)

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
                if policy.query_source == LIVE_SOURCE:  # learns from the requests that reuse it: nothing to capture
                    await self.service.observe(input_ids)
                    return
                bound = {"fidelity_bound": policy.fidelity_bound} if policy.ratio == "auto" else {}
                request = RegistrationRequest.from_client(
                    self.service.config, input_ids=input_ids, ratio=policy.ratio, method=policy.method,
                    query_source=policy.query_source, keep_first=policy.keep_first, adapt=policy.adapt, **bound)
                result = await self.service.register_request(request, auto=True)
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
    original = app.router.lifespan_context  # a Starlette attribute replaced here (``compat.HOOKED_ATTRIBUTES``)

    @contextlib.asynccontextmanager
    async def lifespan(running_app):
        async with original(running_app) as state:
            background = asyncio.create_task(task())
            try:
                yield state
            finally:
                background.cancel()

    app.router.lifespan_context = lifespan
