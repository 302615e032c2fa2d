"""One document operation on the data-parallel ranks, from SGLang's main process.

Every scheduler call goes through the ``channel`` as a ``protocol`` record; ``RankFanout`` says on which
ranks it acts and what its callers get: one rank's result with its error raised (``one``), every rank's
result or error (``each``), or every result with the first error raised (``all``). With several ranks an
error names its rank. ``merge`` folds the ranks' descriptions of one document into the one a client sees,
and ``until_ready`` / ``until_done`` poll a registration or a store job on a rank until it ends.
"""

from __future__ import annotations

import asyncio

from ..channel import SchedulerChannel
from ..errors import DocumentError
from ..protocol import Advance, Description, JobStarted, Operation, PollJob
from ..scheduler.registry import DocState

POLL_SECONDS = 0.05


class RankFanout:
    def __init__(self, channel: SchedulerChannel):
        self.channel = channel

    @property
    def num_ranks(self) -> int:
        return self.channel.num_ranks

    def failure(self, rank: int, error: DocumentError) -> DocumentError:
        """``error``, naming its rank when there are several."""
        if self.num_ranks == 1:
            return error
        return DocumentError(error.status, f"DP rank {rank}: {error.message}")

    async def one(self, rank: int, operation: Operation) -> dict:
        """``operation`` on one rank; its error raised."""
        answer = (await self.channel.call(operation, ranks=[rank]))[rank]
        if isinstance(answer, DocumentError):
            raise self.failure(rank, answer)
        return answer

    async def each(self, operation: Operation, ranks: list[int] | None = None) -> list:
        """``operation`` on ``ranks`` (all by default); each rank's result or error, None for the others."""
        return await self.channel.call(operation, ranks=ranks)

    async def all(self, operation: Operation, ranks: list[int] | None = None) -> list:
        """``operation`` on ``ranks`` (all by default); the first error raised."""
        answers = await self.each(operation, ranks)
        for rank, answer in enumerate(answers):
            if isinstance(answer, DocumentError):
                raise self.failure(rank, answer)
        return answers

    async def until_ready(self, rank: int, described: Description) -> Description:
        """Poll ``advance`` on ``rank`` until the document is ready (or certifying) there (a failure raises its error)."""
        while described["state"] not in (DocState.READY.value, DocState.CERTIFYING.value):
            await asyncio.sleep(POLL_SECONDS)
            described = await self.one(rank, Advance(described["doc_id"]))
        return described

    async def until_done(self, rank: int, started: JobStarted) -> dict:
        """Poll a job of ``rank`` until it is done; its result, or its error raised."""
        result = {"done": False}
        while not result["done"]:
            await asyncio.sleep(POLL_SECONDS)
            result = await self.one(rank, PollJob(started["job"]))
        del result["done"]
        return result

    def merge(self, described: list[Description | None]) -> Description:
        """One document as the ranks describe it (None where a rank has none): ready when every rank has it
        ready, "partial" when only some have; requests counted over the ranks, and each rank's state."""
        held = {rank: doc for rank, doc in enumerate(described) if doc is not None}
        states = {str(rank): doc["state"] for rank, doc in held.items()}
        ready = [doc for doc in held.values() if doc["state"] == DocState.READY.value]
        merged = {**(ready[0] if ready else next(iter(held.values()))), "ranks": states}
        if len(ready) != len(held):
            merged["state"] = next(doc["state"] for doc in held.values() if doc["state"] != DocState.READY.value)
        elif len(held) < self.num_ranks:
            merged["state"] = "partial"
        merged["requests_served"] = sum(doc["requests_served"] for doc in held.values())
        merged["requests_active"] = sum(doc["requests_active"] for doc in held.values())
        return merged


def sum_figures(values: list):
    """Numbers summed, dicts of them summed key by key (the ranks' stats)."""
    if isinstance(values[0], dict):
        return {key: sum_figures([value[key] for value in values if key in value]) for key in values[0]}
    return sum(values)
