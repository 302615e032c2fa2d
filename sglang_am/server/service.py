"""Document operations in SGLang's main process, shared by the HTTP routes and the Engine client.

Registering a document: validate, ``prepare`` on the scheduler (which answers with an existing
document for a duplicate), run the capture requests through the server's own generation path
(context-prefill: the document itself; repeat-prefill: document + repeat instruction + document;
self-study: the server samples answers to the self-study prompts, which are then teacher-forced),
then ``compact`` until the scheduler reports the document ready (the solve runs on a scheduler
worker thread). Every scheduler operation is one JSON RPC over SGLang's RPC socket.

``AutoCompactor`` is the HTTP process's side of automatic compaction: it polls the scheduler for the
prefixes its reuse tracker proposes and registers them, one at a time, in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from pathlib import Path

from ..core import get_method
from ..core.plan import source_fractions
from ..hf.prompts import instruction_ids, repeat_ids
from ..hf.self_study import SELF_STUDY_PROMPTS
from .auto import AutoPolicy
from .documents import DEFAULT_MAX_QUERIES_PER_HEAD, DocumentError
from .hooks import RPC_METHOD

logger = logging.getLogger(__name__)
DEFAULT_METHOD = "AM-HighestAttnKeys"
DEFAULT_QUERY_SOURCE = "repeat-prefill"
CAPTURED_SOURCES = ("context-prefill", "repeat-prefill", "self-study")
SELF_STUDY_SAMPLING = {"temperature": 0.7, "top_p": 0.8, "top_k": 20}
REGISTRATION_POLL_SECONDS = 0.2
COMPACTION_POLL_SECONDS = 0.05


class SchedulerRPC:
    """JSON document operations over SGLang's RPC socket (one call at a time; see ``hooks.around_rpc``)."""

    def __init__(self, socket):
        self.socket = socket
        self._lock = threading.Lock()

    def call(self, op: str, **payload) -> dict:
        from sglang.srt.managers.io_struct import RpcReqInput, sock_recv, sock_send

        with self._lock:
            sock_send(self.socket, RpcReqInput(method=RPC_METHOD, parameters={"op": op, "payload": json.dumps(payload)}))
            output = sock_recv(self.socket)
        if output.success:
            return json.loads(output.message)
        try:
            error = json.loads(output.message)
            raise DocumentError(error["status"], error["error"])
        except (ValueError, KeyError, TypeError):
            raise DocumentError(HTTPStatus.INTERNAL_SERVER_ERROR, output.message) from None


def registration_request(
    text: str | None = None,
    input_ids: Sequence[int] | None = None,
    ratio: float | None = None,
    budget: int | None = None,
    method: str = DEFAULT_METHOD,
    query_source: str | Mapping[str, float] = DEFAULT_QUERY_SOURCE,
    head_budgets: Mapping[str, float] | None = None,
    max_queries_per_head: int = DEFAULT_MAX_QUERIES_PER_HEAD,
    self_study_max_new_tokens: int = 64,
    keep_first: int = 0,
    options: Mapping[str, object] | None = None,
) -> dict:
    """Check a registration's arguments (``ValueError`` naming the bad one) and normalise them."""
    if (text is None) == (input_ids is None):
        raise ValueError("give exactly one of text or input_ids (the document as it starts prompts)")
    if input_ids is not None and (not isinstance(input_ids, Sequence) or not all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in input_ids
    )):
        raise ValueError("input_ids must be a list of non-negative token ids")
    if text is not None and not isinstance(text, str):
        raise ValueError("text must be a string")
    if (ratio is None) == (budget is None):
        raise ValueError("give exactly one of ratio (in (0, 1]) or budget (slots, below the document length)")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1):
        raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise ValueError(f"budget must be a positive int number of slots, got {budget!r}")
    try:
        get_method(method)
    except KeyError as error:
        raise ValueError(str(error).strip("'\"")) from None
    fractions = source_fractions(query_source)
    if not set(fractions) <= set(CAPTURED_SOURCES):
        raise ValueError(f"query_source for the server must use {CAPTURED_SOURCES}, got {query_source!r}")
    if isinstance(max_queries_per_head, bool) or not isinstance(max_queries_per_head, int) or max_queries_per_head < 1:
        raise ValueError(f"max_queries_per_head must be a positive int, got {max_queries_per_head!r}")
    if isinstance(self_study_max_new_tokens, bool) or not isinstance(self_study_max_new_tokens, int) or self_study_max_new_tokens < 1:
        raise ValueError(f"self_study_max_new_tokens must be a positive int, got {self_study_max_new_tokens!r}")
    if isinstance(keep_first, bool) or not isinstance(keep_first, int) or keep_first < 0:
        raise ValueError(f"keep_first must be a non-negative int (tokens kept verbatim at the start), got {keep_first!r}")
    if head_budgets is not None and not isinstance(head_budgets, Mapping):
        raise ValueError("head_budgets must be the head-budget JSON object {\"L{layer}H{head}\": proportion}")
    if options is not None and not isinstance(options, Mapping):
        raise ValueError("options must be an object of the method's option fields")
    return {
        "text": text, "input_ids": None if input_ids is None else list(input_ids),
        "budget": float(ratio) if ratio is not None else budget, "method": method, "query_source": fractions,
        "head_budgets": None if head_budgets is None else dict(head_budgets), "max_queries_per_head": max_queries_per_head,
        "self_study_max_new_tokens": self_study_max_new_tokens, "keep_first": keep_first, "options": dict(options or {}),
    }


class DocumentService:
    def __init__(self, tokenizer_manager, rpc: SchedulerRPC):
        self.tokenizer_manager = tokenizer_manager
        self.rpc = rpc

    async def _call(self, op: str, **payload) -> dict:
        return await asyncio.to_thread(self.rpc.call, op, **payload)

    async def register(self, **arguments) -> dict:
        return await self._register(registration_request(**arguments), auto=False)

    async def _register(self, request: dict, auto: bool) -> dict:
        tokenizer = self.tokenizer_manager.tokenizer
        ids = request["input_ids"]
        if ids is None:
            if tokenizer is None:
                raise ValueError("this server runs without a tokenizer: register input_ids instead of text")
            ids = tokenizer.encode(request["text"])
        while True:
            prepared = await self._call(
                "prepare", input_ids=ids, budget=request["budget"], method=request["method"],
                query_source=request["query_source"], head_budgets=request["head_budgets"],
                max_queries_per_head=request["max_queries_per_head"],
                self_study_max_new_tokens=request["self_study_max_new_tokens"], options=request["options"],
                keep_first=request["keep_first"], auto=auto,
            )
            if not prepared["existing"]:
                break
            if prepared["state"] == "ready":
                return prepared
            existing = await self._wait_ready(prepared["doc_id"])
            if existing is not None:
                return existing
            # The concurrent registration failed, or its document was dropped meanwhile: register anew.
        doc_id, salt = prepared["doc_id"], prepared["salt"]
        try:
            timings = await self._capture(doc_id, salt, ids, request)
            result = await self._call("compact", doc_id=doc_id, timings=timings)
            while result["state"] != "ready":
                await asyncio.sleep(COMPACTION_POLL_SECONDS)
                result = await self._call("compact", doc_id=doc_id, timings={})
        except BaseException:
            await self._call("abort", doc_id=doc_id)
            raise
        return {**result, "existing": False}

    async def _wait_ready(self, doc_id: str) -> dict | None:
        """A concurrent registration of the same document: wait for it and return it (None if it is gone)."""
        while True:
            try:
                doc = await self._call("get", doc_id=doc_id)
            except DocumentError as error:
                if error.status == HTTPStatus.NOT_FOUND:
                    return None
                raise
            if doc["state"] == "ready":
                return {**doc, "existing": True}
            await asyncio.sleep(REGISTRATION_POLL_SECONDS)

    async def _capture(self, doc_id: str, salt: str, ids: list[int], request: dict) -> dict:
        tokenizer = self.tokenizer_manager.tokenizer
        length, sources = len(ids), request["query_source"]
        timings = {"prefill_seconds": 0.0, "self_study_seconds": 0.0}
        start = time.perf_counter()
        captures = []
        if "context-prefill" in sources:
            captures.append(self._capture_one(doc_id, salt, "context-prefill", ids, 0, length))
        if "repeat-prefill" in sources:
            between = self._tokens(tokenizer, repeat_ids)
            captures.append(self._capture_one(doc_id, salt, "repeat-prefill", ids + between + ids,
                                              length + len(between), 2 * length + len(between)))
        await asyncio.gather(*captures)
        timings["prefill_seconds"] = round(time.perf_counter() - start, 4)
        if "self-study" in sources:
            start = time.perf_counter()
            starters = [self._tokens(tokenizer, lambda t: instruction_ids(t, "\n\n" + prompt))
                        for prompt in SELF_STUDY_PROMPTS.values()]
            answers = await asyncio.gather(*(self._sample(ids + starter, request["self_study_max_new_tokens"]) for starter in starters))
            sequences = [ids + starter + answer for starter, answer in zip(starters, answers)]
            await asyncio.gather(*(self._capture_one(doc_id, salt, "self-study", sequence, length, len(sequence))
                                   for sequence in sequences))
            timings["self_study_seconds"] = round(time.perf_counter() - start, 4)
        return timings

    @staticmethod
    def _tokens(tokenizer, make) -> list[int]:
        if tokenizer is None:
            raise ValueError("repeat-prefill and self-study need the server's tokenizer")
        return list(make(tokenizer))

    async def _generate(self, input_ids: list[int], sampling_params: dict, cache_salt: str | None = None) -> dict:
        from sglang.srt.managers.io_struct import GenerateReqInput

        obj = GenerateReqInput(input_ids=input_ids, sampling_params=sampling_params, cache_salt=cache_salt)
        output = None
        async for output in self.tokenizer_manager.generate_request(obj, None):
            pass
        reason = (output or {}).get("meta_info", {}).get("finish_reason") or {}
        if reason.get("type") == "abort":
            raise DocumentError(HTTPStatus.INTERNAL_SERVER_ERROR, f"capture request failed: {reason.get('message')}")
        return output

    async def _capture_one(self, doc_id: str, salt: str, source: str, input_ids: list[int], start: int, stop: int) -> None:
        params = {"am_op": "capture", "am_doc_id": doc_id, "am_source": source, "am_from": start, "am_to": stop}
        await self._generate(input_ids, {"max_new_tokens": 1, "temperature": 0.0, "custom_params": params}, cache_salt=salt)

    async def _sample(self, input_ids: list[int], max_new_tokens: int) -> list[int]:
        params = {"max_new_tokens": max_new_tokens, "custom_params": {"am_op": "sample"}, **SELF_STUDY_SAMPLING}
        output = await self._generate(input_ids, params)
        return list(output["output_ids"])

    async def list(self) -> dict:
        return await self._call("list")

    async def get(self, doc_id: str) -> dict:
        return await self._call("get", doc_id=doc_id)

    async def drop(self, doc_id: str) -> dict:
        return await self._call("drop", doc_id=doc_id)

    async def save(self, doc_id: str, path: str) -> dict:
        if not isinstance(path, str) or not path:
            raise ValueError("path must be a non-empty string (a directory on the server)")
        return await self._call("save", doc_id=doc_id, path=path)

    async def load(self, path: str, auto: bool = False) -> dict:
        if not isinstance(path, str) or not path:
            raise ValueError("path must be a non-empty string (a directory on the server)")
        return await self._call("load", path=path, auto=auto)

    async def stats(self) -> dict:
        return await self._call("stats")


class AutoCompactor:
    def __init__(self, service: DocumentService, policy: AutoPolicy):
        self.service, self.policy = service, policy

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.policy.poll_seconds)
            try:
                for candidate in (await self.service._call("auto_poll"))["candidates"]:
                    await self.compact(candidate["doc_id"], candidate["input_ids"])
            except Exception:  # keep polling: one bad candidate must not stop automatic compaction
                logger.exception("sglang-am: automatic compaction failed")

    async def compact(self, doc_id: str, input_ids: list[int]) -> None:
        policy = self.policy
        saved = Path(policy.save_dir, doc_id) if policy.save_dir is not None else None
        try:
            if saved is not None and saved.is_dir():  # evicted earlier and saved: load it back
                result = await self.service.load(str(saved), auto=True)
            else:
                request = registration_request(input_ids=input_ids, ratio=policy.ratio, method=policy.method,
                                               query_source=policy.query_source, keep_first=policy.keep_first)
                result = await self.service._register(request, auto=True)
        except DocumentError as error:
            logger.warning("sglang-am: automatic compaction of a %d-token prefix refused: %s", len(input_ids), error.message)
            return
        logger.info("sglang-am: automatic document %s: T=%d -> t=%d slots", result["doc_id"], result["T"], result["t"])


def run_during_lifespan(app, task) -> None:
    """Run the coroutine function ``task`` while ``app`` serves (started after SGLang's own start-up)."""
    original = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(running_app):
        async with original(running_app) as state:
            background = asyncio.create_task(task())
            try:
                yield state
            finally:
                background.cancel()

    app.router.lifespan_context = lifespan
