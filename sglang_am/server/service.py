"""Document operations in SGLang's main process, shared by the HTTP routes and the Engine client.

Registering a document: validate the request (``RegistrationRequest``), ``prepare`` on the scheduler
(which answers with an existing document for a duplicate), run the capture requests through the
server's own generation path (context-prefill: the document itself; repeat-prefill: document + repeat
instruction + document; self-study: the server samples answers to the self-study prompts, which are
then teacher-forced), then ``advance`` until the scheduler reports the document ready (the solve runs
on a scheduler worker thread). A drop while that runs cancels it: its capture requests are aborted and
the registration answers 409. Every scheduler operation is one JSON RPC over SGLang's RPC socket, and
none waits longer than the configured RPC timeout.

``AutoCompactor`` is the HTTP process's side of automatic compaction: it polls the scheduler for the
prefixes its reuse tracker proposes and loads (from the store) or registers them, one at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import threading
import time
from http import HTTPStatus

from ..prompts import SELF_STUDY_PROMPTS, instruction_ids, repeat_ids
from .auto import AutoPolicy
from .capture import capture_salt
from .config import ServerConfig
from .errors import DocumentError
from .hooks import RPC_METHOD
from .registration import RegistrationRequest
from .registry import DocState

logger = logging.getLogger(__name__)
SELF_STUDY_SAMPLING = {"temperature": 0.7, "top_p": 0.8, "top_k": 20}
POLL_SECONDS = 0.05


class SchedulerRPC:
    """JSON document operations over SGLang's RPC socket, one at a time, each waiting at most ``timeout``.

    Every call carries a sequence number that the scheduler echoes, so the late answer to a call that
    timed out is recognised and dropped instead of being taken for the next call's answer."""

    def __init__(self, socket, timeout: float):
        self.socket, self.timeout = socket, timeout
        self._lock = threading.Lock()
        self._sequence = itertools.count()

    def call(self, op: str, **payload) -> dict:
        import zmq
        from sglang.srt.managers.io_struct import RpcReqInput, sock_recv, sock_send

        deadline = time.monotonic() + self.timeout  # waiting for the socket counts too
        timed_out = DocumentError(HTTPStatus.GATEWAY_TIMEOUT,
                                  f"the scheduler did not answer {op} within {self.timeout:g} s; it may be busy")
        if not self._lock.acquire(timeout=self.timeout):
            raise timed_out
        try:
            seq = next(self._sequence)
            parameters = {"op": op, "payload": json.dumps(payload), "seq": seq}
            sock_send(self.socket, RpcReqInput(method=RPC_METHOD, parameters=parameters))
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not self.socket.poll(int(left * 1000) + 1, zmq.POLLIN):
                    raise timed_out
                output = sock_recv(self.socket)
                try:
                    answer = json.loads(output.message)
                except (TypeError, ValueError):
                    raise DocumentError(HTTPStatus.INTERNAL_SERVER_ERROR, f"{op} failed: {output.message}") from None
                if answer.get("seq") == seq:
                    break
        finally:
            self._lock.release()
        if output.success:
            return answer["result"]
        raise DocumentError(answer["status"], answer["error"])


class DocumentService:
    def __init__(self, tokenizer_manager, rpc: SchedulerRPC, config: ServerConfig):
        self.tokenizer_manager, self.rpc, self.config = tokenizer_manager, rpc, config
        self._registrations: dict[str, asyncio.Task] = {}  # doc_id -> its capture and compaction in progress

    async def _call(self, op: str, **payload) -> dict:
        """One scheduler operation, waited for on a daemon thread: asyncio's own executor threads are joined
        when the server stops, and a call to a scheduler that is already gone would hold the stop for the
        whole RPC timeout."""
        loop = asyncio.get_running_loop()
        answer = loop.create_future()

        def settle(result, error) -> None:
            if answer.done():  # the caller was cancelled meanwhile
                return
            if error is not None:
                answer.set_exception(error)
            else:
                answer.set_result(result)

        def run() -> None:
            try:
                result, error = self.rpc.call(op, **payload), None
            except Exception as failure:
                result, error = None, failure
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits any more
                loop.call_soon_threadsafe(settle, result, error)

        threading.Thread(target=run, name="sglang-am-rpc", daemon=True).start()
        return await answer

    async def register(self, **fields) -> dict:
        return await self._register(RegistrationRequest.from_client(self.config, **fields), auto=False)

    async def _register(self, request: RegistrationRequest, auto: bool) -> dict:
        ids = list(request.input_ids) if request.input_ids is not None else self._encode(request.text)
        while True:
            prepared = await self._call("prepare", request=request.to_payload(), input_ids=ids, auto=auto)
            if not prepared["existing"]:
                break
            if prepared["state"] == DocState.READY.value:
                return prepared
            # A concurrent registration or load of the same document: wait for it, then ask again, since it may
            # have failed or been replaced meanwhile (an explicit request must find the ready one explicit).
            await self._wait_settled(prepared["doc_id"])
        doc_id = prepared["doc_id"]
        work = asyncio.create_task(self._capture_and_compact(doc_id, prepared["salt"], ids, request))
        self._registrations[doc_id] = work
        try:
            return {**await work, "existing": False}
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():  # the client went away
                raise
            raise DocumentError(HTTPStatus.CONFLICT, f"document {doc_id} was dropped while it was being registered") from None
        finally:
            self._registrations.pop(doc_id, None)

    def _encode(self, text: str) -> list[int]:
        tokenizer = self.tokenizer_manager.tokenizer
        if tokenizer is None:
            raise ValueError("this server runs without a tokenizer: register input_ids instead of text")
        ids = tokenizer.encode(text)
        if len(ids) > self.config.max_document_tokens:
            raise ValueError(f"text has {len(ids)} tokens; this server takes at most {self.config.max_document_tokens}")
        return ids

    async def _capture_and_compact(self, doc_id: str, salt: str, ids: list[int], request: RegistrationRequest) -> dict:
        try:
            timings = await self._capture(doc_id, salt, ids, request)
            return await self._until_ready(await self._call("advance", doc_id=doc_id, timings=timings))
        except BaseException as error:
            with contextlib.suppress(DocumentError):  # whatever was left of it on the scheduler
                await self._call("abandon", doc_id=doc_id)
            if isinstance(error, DocumentError) and error.status == HTTPStatus.NOT_FOUND:
                # A registering document disappears only when it is dropped.
                raise DocumentError(HTTPStatus.CONFLICT, f"document {doc_id} was dropped while it was being registered") from None
            raise

    async def _wait_settled(self, doc_id: str) -> None:
        """Until the document ``doc_id`` is ready or gone."""
        while True:
            try:
                doc = await self._call("get", doc_id=doc_id)
            except DocumentError as error:
                if error.status == HTTPStatus.NOT_FOUND:
                    return
                raise
            if doc["state"] == DocState.READY.value:
                return
            await asyncio.sleep(POLL_SECONDS * 4)

    async def _capture(self, doc_id: str, salt: str, ids: list[int], request: RegistrationRequest) -> dict:
        tokenizer = self.tokenizer_manager.tokenizer
        length, sources = len(ids), request.query_source
        if tokenizer is None and {"repeat-prefill", "self-study"} & set(sources):
            raise ValueError("repeat-prefill and self-study need the server's tokenizer")
        timings = {"prefill_seconds": 0.0, "self_study_seconds": 0.0}
        start = time.perf_counter()
        captures = []
        if "context-prefill" in sources:
            captures.append(self._capture_one(doc_id, salt, "context-prefill", ids, 0, length))
        if "repeat-prefill" in sources:
            between = repeat_ids(tokenizer)
            captures.append(self._capture_one(doc_id, salt, "repeat-prefill", ids + between + ids,
                                              length + len(between), 2 * length + len(between)))
        await asyncio.gather(*captures)
        timings["prefill_seconds"] = round(time.perf_counter() - start, 4)
        if "self-study" in sources:
            start = time.perf_counter()
            starters = [instruction_ids(tokenizer, "\n\n" + prompt) for prompt in SELF_STUDY_PROMPTS.values()]
            answers = await asyncio.gather(*(self._sample(ids + starter, request.self_study_max_new_tokens)
                                             for starter in starters))
            sequences = [ids + starter + answer for starter, answer in zip(starters, answers)]
            await asyncio.gather(*(self._capture_one(doc_id, salt, "self-study", sequence, length, len(sequence))
                                   for sequence in sequences))
            timings["self_study_seconds"] = round(time.perf_counter() - start, 4)
        return timings

    async def _generate(self, input_ids: list[int], sampling_params: dict, cache_salt: str | None = None) -> dict:
        from sglang.srt.managers.io_struct import GenerateReqInput

        obj = GenerateReqInput(input_ids=input_ids, sampling_params=sampling_params, cache_salt=cache_salt)
        output = None
        async for item in self.tokenizer_manager.generate_request(obj, None):
            output = item  # the last one carries the finish reason
        reason = (output or {}).get("meta_info", {}).get("finish_reason") or {}
        if reason.get("type") == "abort":
            raise DocumentError(HTTPStatus.SERVICE_UNAVAILABLE, f"capture request failed: {reason.get('message')}")
        return output

    async def _capture_one(self, doc_id: str, salt: str, source: str, input_ids: list[int], start: int, stop: int) -> None:
        params = {"am_op": "capture", "am_doc_id": doc_id, "am_source": source, "am_from": start, "am_to": stop}
        await self._generate(input_ids, {"max_new_tokens": 1, "temperature": 0.0, "custom_params": params},
                             cache_salt=capture_salt(salt, source))

    async def _sample(self, input_ids: list[int], max_new_tokens: int) -> list[int]:
        params = {"max_new_tokens": max_new_tokens, "custom_params": {"am_op": "sample"}, **SELF_STUDY_SAMPLING}
        output = await self._generate(input_ids, params)
        return list(output["output_ids"])

    async def _until_ready(self, described: dict) -> dict:
        """Poll ``advance`` until the document is ready (a failure raises its error)."""
        while described["state"] != DocState.READY.value:
            await asyncio.sleep(POLL_SECONDS)
            described = await self._call("advance", doc_id=described["doc_id"])
        return described

    async def _until_done(self, started: dict) -> dict:
        """Poll a save or store job until it is done; its result, or its error raised."""
        result = {"done": False}
        while not result["done"]:
            await asyncio.sleep(POLL_SECONDS)
            result = await self._call("job", job=started["job"])
        del result["done"]
        return result

    async def list(self) -> dict:
        return await self._call("list")

    async def get(self, doc_id: str) -> dict:
        return await self._call("get", doc_id=doc_id)

    async def drop(self, doc_id: str) -> dict:
        """Drop a document in any state; a registration in progress is cancelled."""
        result = await self._call("drop", doc_id=doc_id)
        registration = self._registrations.get(doc_id)
        if registration is not None:
            registration.cancel()
        return result

    async def save(self, doc_id: str) -> dict:
        return await self._until_done(await self._call("save", doc_id=doc_id))

    async def load(self, doc_id: str, auto: bool = False) -> dict:
        loaded = await self._call("load", doc_id=doc_id, auto=auto)
        if loaded["existing"]:
            return loaded
        try:
            return {**await self._until_ready(loaded), "existing": False}
        except BaseException:
            with contextlib.suppress(DocumentError):
                await self._call("abandon", doc_id=doc_id)
            raise

    async def stored(self) -> dict:
        return await self._until_done(await self._call("store_list"))

    async def delete_stored(self, doc_id: str) -> dict:
        return await self._until_done(await self._call("store_delete", doc_id=doc_id))

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
        try:
            try:  # evicted earlier and saved: load it back
                result = await self.service.load(doc_id, auto=True)
            except DocumentError as error:
                if error.status != HTTPStatus.NOT_FOUND:
                    raise
                request = RegistrationRequest.from_client(
                    self.service.config, input_ids=input_ids, ratio=policy.ratio, method=policy.method,
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
