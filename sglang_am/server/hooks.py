"""Scheduler-side hooks: request rewrite, position offsets, the per-batch side channel and the RPC.

- ``after_create_req`` (``Scheduler._create_generation_req``): a request whose prompt starts with a
  ready document (or names one in ``custom_params["am_doc_id"]``) is rewritten to
  ``virtual ids + suffix``; capture requests of a registration are tagged. A request that starts with
  a document but cannot use it keeps its full prompt and counts as a fallback.
- ``after_process_batch_result``: a finished capture request's KV is locked in the tree until its
  document's solve has read it.
- ``after_init_max_new_tokens``: SGLang clamped ``max_new_tokens`` with the rewritten (shorter)
  prompt; clamp again with the logical length so positions stay inside the model's context.
- ``after_init_new`` (``ForwardBatch.init_new``): tokens after a document take RoPE positions from T
  (``+ T - t``) and the batch gets the per-request documents and capture rows the attention backend reads.
- ``around_rpc`` (``Scheduler.handle_rpc_request``): the document operations (method ``am_call``)
  return their JSON result in the RPC message (SGLang's RPC otherwise returns only success and an
  error text), and are logged by name only (SGLang logs every call with its parameters: a
  document's ids, and the automatic-compaction poll twice a second).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from array import array
from collections import deque
from http import HTTPStatus

import torch

from .documents import STORE, Document, DocumentError

RPC_METHOD = "am_call"
DOCUMENT_INFO_KEY = "am_document"
QUIET_OPERATIONS = ("auto_poll", "stats", "get", "list", "compact")  # polled: logged at debug level
logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Capture:
    document: Document
    source: str
    rows: slice  # rows of this forward's flattened query tensor


@dataclasses.dataclass
class BatchInfo:
    documents: list  # per request: its Document or None
    query_lens: list  # per request: its query rows in this forward (1 in decode)
    captures: list

    @property
    def has_documents(self) -> bool:
        return any(doc is not None for doc in self.documents)


# SGLang's runners hand the model a ``dataclasses.replace`` view of the ForwardBatch (static input
# buffers), so extra attributes do not survive; the request-id list does (same object), so the info
# is published keyed by it. A few recent batches are kept for overlap scheduling.
_published: deque = deque(maxlen=4)
# The decode CUDA-graph replay hands the backend a view without request ids; it always belongs to the
# forward batch built last.
_latest_rids: list = [None]


def batch_info(forward_batch) -> BatchInfo | None:
    """The documents and captures of ``forward_batch`` (or of the last built batch, for a replay view)."""
    rids = getattr(forward_batch, "rids", _latest_rids[0])
    for published_rids, info in reversed(_published):
        if published_rids is rids:
            return info
    return None


def _abort(req, message: str) -> None:
    req.set_finish_with_abort(message, status_code=HTTPStatus.BAD_REQUEST)


def after_create_req(req, scheduler, recv_req, *args, **kwargs):
    params = req.sampling_params.custom_params or {}
    if params.get("am_op") == "capture":
        _tag_capture(req, params)
        return req
    if params.get("am_op") == "sample":  # a registration's self-study answer: full prefix, not a reuse
        req.am_internal = True
        return req
    forced = params.get("am_doc_id")
    ids = req.origin_input_ids
    if forced is not None:
        doc = STORE.ready(str(forced))
        if doc is None:
            _abort(req, f"am_doc_id {forced!r} is not a registered, compacted document")
            return req
        if not doc.is_proper_prefix_of(ids):
            _abort(req, f"the prompt does not start with document {forced}'s {doc.length} tokens followed by at least one more")
            return req
    else:
        doc = STORE.longest_prefix(ids)
        if doc is None:
            return req
        if doc.state != "ready":  # still capturing or compacting: the full prefix serves meanwhile
            STORE.stats.add("fallbacks", reason="not_ready")
            return req
    if len(ids) >= scheduler.max_req_input_len:  # too long as written: SGLang's own length check rejects it
        STORE.stats.add("fallbacks", reason="too_long")
        return req
    # Compacted nodes live in the default namespace of a text-only request; anything else falls back.
    if req.extra_key is not None or req.cache_salt is not None or recv_req.input_embeds is not None or (
        recv_req.mm_inputs is not None or getattr(recv_req, "positional_embed_overrides", None) is not None
    ):
        if forced is not None:
            _abort(req, "am_doc_id cannot be combined with lora, extra_key, cache_salt, embeddings or multimodal inputs")
        else:
            STORE.stats.add("fallbacks", reason="namespace")
        return req
    if recv_req.logprob_start_len is not None and recv_req.logprob_start_len != -1:
        if recv_req.logprob_start_len < doc.length:
            _abort(req, f"input logprobs inside the compacted document (logprob_start_len < {doc.length}) are not available")
            return req
        recv_req.logprob_start_len -= doc.position_offset
    req.origin_input_ids = doc.virtual_ids + array("q", ids[doc.length :])
    req.am_doc = doc
    doc.requests_served += 1
    doc.last_used = time.monotonic()
    STORE.stats.add("hits")
    req.customized_info = {**(req.customized_info or {}), DOCUMENT_INFO_KEY: [{
        "doc_id": doc.doc_id, "document_tokens": doc.length, "compacted_slots": doc.num_slots,
        "logical_prompt_tokens": len(ids),
    }]}
    return req


def _tag_capture(req, params: dict) -> None:
    doc = STORE.documents.get(str(params.get("am_doc_id")))
    if doc is None or doc.state != "capturing" or req.cache_salt != doc.salt:
        _abort(req, "capture requests are internal to document registration")
        return
    req.am_capture = (doc, str(params["am_source"]), int(params["am_from"]), int(params["am_to"]))


def after_process_batch_result(result, scheduler, batch, *args, **kwargs):
    for req in batch.reqs:
        spec = getattr(req, "am_capture", None)
        if spec is not None and req.finished():
            STORE.hold_source(scheduler, spec[0])
    return result


def after_init_max_new_tokens(result, scheduler, req):
    doc = getattr(req, "am_doc", None)
    if doc is not None:
        logical = doc.length + len(req.origin_input_ids) - doc.num_slots
        limit = max(0, scheduler.max_req_len - logical - 1)
        if req.sampling_params.max_new_tokens is None or req.sampling_params.max_new_tokens > limit:
            req.sampling_params.max_new_tokens = limit
    return result


def after_init_new(forward_batch, cls, batch, model_runner, *args, **kwargs):
    _latest_rids[0] = forward_batch.rids
    mode = forward_batch.forward_mode
    if mode.is_idle() or not (mode.is_decode() or mode.is_extend()):
        return forward_batch
    reqs = batch.reqs
    documents = [getattr(req, "am_doc", None) for req in reqs]
    captures = []
    query_lens = list(batch.extend_lens) if mode.is_extend() else [1] * len(reqs)
    if mode.is_extend():
        start = 0
        for req, prefix, length in zip(reqs, batch.prefix_lens, query_lens):
            spec = getattr(req, "am_capture", None)
            if spec is not None:
                doc, source, lo, hi = spec
                lo, hi = max(lo, prefix), min(hi, prefix + length)
                if lo < hi:
                    captures.append(Capture(doc, source, slice(start + lo - prefix, start + hi - prefix)))
            start += length
    if not captures and not any(documents):
        return forward_batch
    _published.append((forward_batch.rids, BatchInfo(documents, query_lens, captures)))
    offsets = torch.tensor([doc.position_offset if doc else 0 for doc in documents],
                           dtype=forward_batch.positions.dtype, device=forward_batch.positions.device)
    if mode.is_extend():
        offsets = torch.repeat_interleave(offsets, torch.tensor(query_lens, device=offsets.device))
    forward_batch.positions = forward_batch.positions + offsets
    return forward_batch


def around_rpc(original, scheduler, recv_req):
    if recv_req.method != RPC_METHOD:
        return original(scheduler, recv_req)
    from sglang.srt.managers.io_struct import RpcReqOutput
    from torch.distributed import barrier

    op = recv_req.parameters["op"]
    (logger.debug if op in QUIET_OPERATIONS else logger.info)("sglang-am: document operation %s", op)
    try:
        success, message = True, json.dumps(STORE.call(scheduler, op, json.loads(recv_req.parameters["payload"])))
    except Exception as error:  # the HTTP layer turns it into a status and a reason
        if not isinstance(error, DocumentError):
            logger.exception("sglang-am: document operation %s failed", op)
        success, message = False, str(error)
    barrier(group=scheduler.tp_group.cpu_group)  # as SGLang's own handler: every TP rank answered
    return RpcReqOutput(success=success, message=message)


def request_level_info_key(result, streamer, key):
    return True if key == DOCUMENT_INFO_KEY else result

