"""Scheduler-side hooks, each on one SGLang internal (``compat`` checks their signatures).

- ``after_create_req`` (``Scheduler._create_generation_req``): a request whose prompt starts with a
  ready document (or names one in ``custom_params["am_doc_id"]``) is rewritten to ``virtual ids +
  suffix`` and holds the document until it ends; a registration's capture requests are tagged, and so
  are the requests that reuse an observing document's prefix (served in full); a prompt that leaves a
  document within its last tokens is counted as a boundary miss.
- ``after_stream_output`` / ``after_send_abort_output``: the two ways a request ends (its last output,
  or an abort reported outside the stream); it releases its document.
- ``after_process_batch_result``: a finished capture request's KV is locked in the tree until its
  document's solve has read it; a finished greedy request that an observing document learns from leaves it
  its answer, and one that an audited learned node served leaves the audit its answer; then
  ``operations.background_step``.
- ``after_init_max_new_tokens``: SGLang clamped ``max_new_tokens`` with the rewritten (shorter)
  prompt; clamp again with the logical length so positions stay inside the model's context.
- ``after_init_new`` (``ForwardBatch.init_new``): tokens after a document take RoPE positions from T
  (``+ T - t``), and the attention backend learns which request-pool rows serve which document.
- ``around_rpc`` (``Scheduler.handle_rpc_request``): the document operations (method ``am_call``, see
  ``channel``) answer with their JSON result and this DP rank in a ``DocumentCallReqOutput``, which SGLang
  sends back to the tokenizer manager like its own control outputs; they are logged by name only (SGLang
  logs every call with its parameters).

One runs in the HTTP server's process: ``before_validate_request``
(``TokenizerManager._validate_one_request``) refuses a prompt token id outside the model's vocabulary with a
400, where SGLang would pass it to the embedding and lose the scheduler, and every client with it.
"""

from __future__ import annotations

import json
import logging
from array import array
from http import HTTPStatus

import torch
from sglang.srt.managers.schedule_batch import FINISH_ABORT

from .. import protocol
from ..channel import RPC_METHOD, DocumentCallReqOutput
from ..errors import DocumentError
from ..registration import check_vocabulary
from ..scheduler.capture import CaptureTag, capture_salt
from ..scheduler.registry import DocState, DocumentRegistry, Observed, RequestRecord

DOCUMENT_INFO_KEY = "am_document"
logger = logging.getLogger(__name__)


def _abort(req, message: str) -> None:
    req.set_finish_with_abort(message, status_code=HTTPStatus.BAD_REQUEST)


def after_create_req(req, scheduler, recv_req, *args, **kwargs):
    registry = getattr(scheduler.tree_cache, "registry", None)
    if registry is None:  # another radix cache: documents are off
        return req
    params = req.sampling_params.custom_params
    params = params if isinstance(params, dict) else {}  # whatever a client sent; only a dict can name a document
    if params.get("am_op") == "capture":
        _tag_capture(registry, req, params)
        return req
    if params.get("am_op") == "sample":  # a registration's self-study answer: full prefix, not a reuse
        RequestRecord.attach(req).internal = True
        return req
    probe = params.get("am_op") == "probe"  # the registration measuring its document: served, counted nowhere
    forced = params.get("am_doc_id")
    ids = req.origin_input_ids
    version = None
    if probe:  # only the registration knows its salt; a certifying one asks its candidate
        doc = registry.get(str(forced))
        candidate = params.get("am_version") == "candidate"
        if doc is None or not doc.salt or params.get("am_salt") != doc.salt or (
            doc.candidate is None if candidate else doc.state is not DocState.READY
        ):
            _abort(req, "probes are internal to document registration")
            return req
        version = doc.candidate if candidate else None
    elif forced is not None:
        doc = registry.ready(str(forced))
        if doc is None:
            _abort(req, f"am_doc_id {str(forced)[:80]!r} is not a registered, compacted document")
            return req
    if forced is not None:
        if not doc.is_proper_prefix_of(ids):
            _abort(req, f"the prompt does not start with document {forced}'s {doc.length} tokens followed by at least one more")
            return req
    else:
        doc = registry.longest_prefix(ids)
        if doc is None:
            if registry.boundary_miss(ids) is not None:
                registry.stats.add("fallbacks", reason="boundary_miss")
            return req
        RequestRecord.attach(req).extends_document = True
        if doc.state is DocState.OBSERVING:  # served in full, as stock serves it; its queries teach the document
            if _default_namespace(req, recv_req):
                observation = doc.observation
                RequestRecord.attach(req).observed = Observed(observation, observation.tag(), doc.length)
                registry.stats.add("observed_requests")
            return req
        if doc.state is not DocState.READY:  # still registering: the full prefix serves meanwhile
            registry.stats.add("fallbacks", reason="not_ready")
            return req
    if len(ids) >= scheduler.max_req_input_len:  # too long as written: SGLang's own length check rejects it
        registry.stats.add("fallbacks", reason="too_long")
        return req
    # Compacted nodes live in the default namespace of a text-only request; anything else falls back.
    if not _default_namespace(req, recv_req):
        if forced is not None:
            _abort(req, "am_doc_id cannot be combined with lora, extra_key, cache_salt, embeddings or multimodal inputs")
        else:
            registry.stats.add("fallbacks", reason="namespace")
        return req
    starts_late = recv_req.logprob_start_len is not None and recv_req.logprob_start_len != -1
    if starts_late and recv_req.logprob_start_len < doc.length:
        _abort(req, f"input logprobs inside the compacted document (logprob_start_len < {doc.length}) are not available")
        return req
    served = registry.acquire(doc, req, counted=not probe, version=version)
    if starts_late:
        recv_req.logprob_start_len -= served.position_offset
    req.origin_input_ids = served.version.virtual_ids + array("q", ids[doc.length :])
    if not probe:
        registry.stats.add("hits")
    req.customized_info = {**(req.customized_info or {}), DOCUMENT_INFO_KEY: [{
        "doc_id": doc.doc_id, "document_tokens": doc.length, "compacted_slots": served.version.num_slots,
        "logical_prompt_tokens": len(ids),
    }]}
    return req


def _default_namespace(req, recv_req) -> bool:
    """Is ``req`` a text-only request in the radix cache's default namespace (where documents live)?"""
    return req.extra_key is None and req.cache_salt is None and recv_req.input_embeds is None and (
        recv_req.mm_inputs is None and getattr(recv_req, "positional_embed_overrides", None) is None)


def _tag_capture(registry: DocumentRegistry, req, params: dict) -> None:
    doc = registry.get(str(params.get("am_doc_id")))
    source = params.get("am_source")
    if doc is None or doc.state is not DocState.CAPTURING or not isinstance(source, str) or (
        req.cache_salt != capture_salt(doc.salt, source)
    ):
        _abort(req, "capture requests are internal to document registration")
        return
    try:
        answer_from = params.get("am_answer")
        rows = doc.capture.add_request(source, int(params["am_from"]), int(params["am_to"]), int(params.get("am_part", 0)),
                                       None if answer_from is None else int(answer_from))
    except (KeyError, TypeError, ValueError):
        _abort(req, "capture requests are internal to document registration")
        return
    RequestRecord.attach(req).capture = CaptureTag(doc, doc.capture, rows)


def after_stream_output(result, streamer, reqs, return_logprob, skip_req=None):
    for req in reqs:
        if req is not skip_req and req.finished():
            DocumentRegistry.release(req)
    return result


def after_send_abort_output(result, scheduler, abort_req, req):
    DocumentRegistry.release(req)
    return result


def after_process_batch_result(result, scheduler, batch, *args, **kwargs):
    operations = getattr(scheduler.tree_cache, "operations", None)
    if operations is None:
        return result
    for req in batch.reqs:
        if not req.finished() or isinstance(req.finished_reason, FINISH_ABORT):
            continue
        record = RequestRecord.of(req)
        if record.capture is not None:
            record.capture.rows.finished = True
            operations.registrations.hold_source(record.capture.document, req.cache_salt)
        elif record.observed is not None and req.sampling_params.top_k == 1:  # SGLang's greedy (temperature 0)
            observed = record.observed
            observed.observation.note_answer(observed.part, req.origin_input_ids, observed.start, req.output_ids)
        elif record.served is not None and record.served.client and req.sampling_params.top_k == 1:
            _note_served_answer(record.served, req)
    if scheduler.tp_size == 1:  # with TP, ranks release together, in an RPC (and documents do not adapt)
        operations.background_step(scheduler)
    return result


def _note_served_answer(served, req) -> None:
    """A greedy request that an audited learned node served ended: its prompt after the node's slots and its answer."""
    doc = served.document
    audit = None if doc.adaptation is None else doc.adaptation.audit
    if audit is not None and served.version is doc.installed:
        audit.note(req.origin_input_ids[served.version.num_slots :], req.output_ids)


def after_on_idle(result, scheduler, *args, **kwargs):
    operations = getattr(scheduler.tree_cache, "operations", None)
    if operations is not None and scheduler.tp_size == 1:
        operations.background_step(scheduler)
    return result


def after_init_max_new_tokens(result, scheduler, req):
    served = RequestRecord.of(req).served
    if served is not None:
        logical = len(req.origin_input_ids) + served.position_offset
        limit = max(0, scheduler.max_req_len - logical - 1)
        if req.sampling_params.max_new_tokens is None or req.sampling_params.max_new_tokens > limit:
            req.sampling_params.max_new_tokens = limit
    return result


def after_init_new(forward_batch, cls, batch, model_runner, *args, **kwargs):
    mode = forward_batch.forward_mode
    if mode.is_idle() or not (mode.is_decode() or mode.is_extend()):
        return forward_batch
    rows = getattr(model_runner.attn_backend, "document_rows", None)
    if rows is None:  # not a bias-aware backend: documents are refused at registration
        return forward_batch
    rows.bind(batch.reqs)
    served = [RequestRecord.of(req).served for req in batch.reqs]
    if not any(served):
        return forward_batch
    offsets = torch.tensor([entry.position_offset if entry else 0 for entry in served],
                           dtype=forward_batch.positions.dtype, device=forward_batch.positions.device)
    if mode.is_extend():
        offsets = torch.repeat_interleave(offsets, torch.tensor(batch.extend_lens, device=offsets.device))
    forward_batch.positions = forward_batch.positions + offsets
    return forward_batch


def around_rpc(original, scheduler, recv_req):
    if recv_req.method != RPC_METHOD:
        return original(scheduler, recv_req)
    from sglang.srt.runtime_context import get_parallel
    from torch.distributed import barrier

    parameters = recv_req.parameters
    op, dp_rank = parameters["op"], get_parallel().dp_rank or 0
    ranks = json.loads(parameters["ranks"])
    success, message = True, "null"
    if ranks is None or dp_rank in ranks:
        try:
            operation = protocol.decode(op, parameters["fields"])
            (logger.debug if operation.quiet else logger.info)("sglang-am: document operation %s", op)
            message = json.dumps(scheduler.tree_cache.operations.call(scheduler, operation))
        except Exception as error:  # the HTTP layer turns it into a status and a reason
            if isinstance(error, DocumentError):
                status, text = error.status, error.message
            else:
                logger.exception("sglang-am: document operation %s failed", op)
                status, text = HTTPStatus.INTERNAL_SERVER_ERROR, f"{op} failed: {error!r}"
            success, message = False, json.dumps({"status": int(status), "error": text})
    barrier(group=scheduler.tp_group.cpu_group)  # as SGLang's own handler: every TP rank answered
    return DocumentCallReqOutput(seq=parameters["seq"], dp_rank=dp_rank, success=success, message=message)


def request_level_info_key(result, streamer, key):
    return True if key == DOCUMENT_INFO_KEY else result


def before_validate_request(manager, obj, input_ids) -> None:
    if input_ids:
        check_vocabulary("input_ids", input_ids, manager.model_config.vocab_size)
