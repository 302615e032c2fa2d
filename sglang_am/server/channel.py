"""Document operations on every data-parallel rank, over SGLang's own control path.

A call is an ``RpcReqInput`` (method ``am_call``) sent the way SGLang sends its control requests: the
tokenizer manager hands it to the scheduler, or, with ``--dp-size N``, to the data-parallel controller,
which passes every request type it does not dispatch itself to all DP schedulers. Each scheduler
(``hooks.around_rpc``) answers with a ``DocumentCallReqOutput``, which goes back like any control output
to the tokenizer manager, whose result dispatcher hands it to the channel. A call waits for one answer
per rank, at most ``timeout`` seconds; answers carry the call's sequence number, so a late answer to a
call that timed out is dropped rather than taken for another call's.

``ranks`` names the ranks that act; the others answer ``None`` at once, so every call has the same
fan-in.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Sequence
from http import HTTPStatus

from sglang.srt.managers.io_struct import BaseReq

from .errors import DocumentError
from .protocol import Operation

RPC_METHOD = "am_call"


class DocumentCallReqOutput(BaseReq, kw_only=True):
    """One DP rank's answer to a document operation: ``message`` is the JSON result, or the error."""

    seq: int
    dp_rank: int
    success: bool
    message: str


def channel_for(tokenizer_manager, timeout: float) -> SchedulerChannel:
    """The tokenizer manager's one channel (its result dispatcher takes one handler per answer type)."""
    channel = getattr(tokenizer_manager, "am_channel", None)
    if channel is None:
        channel = tokenizer_manager.am_channel = SchedulerChannel(tokenizer_manager, timeout)
    return channel


class SchedulerChannel:
    def __init__(self, tokenizer_manager, timeout: float):
        from sglang.srt.managers.io_struct import hook_custom_types
        from sglang.srt.runtime_context import get_parallel
        from sglang.utils import TypeBasedDispatcher

        hook_custom_types(DocumentCallReqOutput)  # so this process decodes the schedulers' answers
        # A private member, replaced by itself plus this handler (``compat.HOOKED_ATTRIBUTES`` checks it).
        tokenizer_manager._result_dispatcher += TypeBasedDispatcher([(DocumentCallReqOutput, self._receive)])
        self.tokenizer_manager, self.timeout = tokenizer_manager, timeout
        self.num_ranks = get_parallel().num_dp_ranks
        self._sequence = itertools.count()
        self._waiting: dict[int, tuple[asyncio.Future, dict[int, DocumentCallReqOutput]]] = {}

    async def call(self, operation: Operation, ranks: Sequence[int] | None = None) -> list[dict | DocumentError | None]:
        """Every rank's result of ``operation`` in rank order: its JSON result, the ``DocumentError`` it raised,
        or None for a rank not in ``ranks``. ``DocumentError`` (504) when some rank does not answer in time."""
        from sglang.srt.managers.io_struct import RpcReqInput

        manager = self.tokenizer_manager
        manager.auto_create_handle_loop()  # the loop that reads the schedulers' answers
        seq = next(self._sequence)
        done = asyncio.get_running_loop().create_future()
        answers: dict[int, DocumentCallReqOutput] = {}
        self._waiting[seq] = (done, answers)
        op = operation.name
        parameters = {"op": op, "fields": operation.encode(), "seq": seq,
                      "ranks": json.dumps(None if ranks is None else list(ranks))}
        try:
            manager._dispatch_to_scheduler(RpcReqInput(method=RPC_METHOD, parameters=parameters))
            await asyncio.wait_for(done, self.timeout)
        except TimeoutError:
            missing = sorted(set(range(self.num_ranks)) - set(answers))
            raise DocumentError(HTTPStatus.GATEWAY_TIMEOUT, f"the scheduler{'s' if len(missing) > 1 else ''} of DP rank "
                                f"{', '.join(map(str, missing))} did not answer {op} within {self.timeout:g} s; "
                                "it may be busy") from None
        finally:
            self._waiting.pop(seq, None)
        return [_result(answers[rank]) for rank in range(self.num_ranks)]

    def _receive(self, answer: DocumentCallReqOutput) -> None:
        waiting = self._waiting.get(answer.seq)
        if waiting is None:  # the call timed out
            return
        done, answers = waiting
        answers[answer.dp_rank] = answer
        if len(answers) == self.num_ranks and not done.done():
            done.set_result(None)


def _result(answer: DocumentCallReqOutput) -> dict | DocumentError | None:
    message = json.loads(answer.message)
    if answer.success:
        return message
    return DocumentError(message["status"], message["error"])
