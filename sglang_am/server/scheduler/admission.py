"""Whether a registration can start now: arithmetic only, so it is tested without a server.

A registration is refused up front (400 for what can never work on this server, 503 for what does not
fit now) rather than left waiting: its capture prefill must fit the KV pool next to the pinned
documents, its captured queries must fit the capture memory, and registrations in progress are limited.
"""

from __future__ import annotations

import dataclasses
from http import HTTPStatus

from ..config import MiB, ServerConfig
from ..errors import DocumentError
from ..registration import MIN_DOCUMENT_TOKENS, RegistrationRequest

# Slots a capture request needs beyond its document copies (instructions, prompts, one output token).
CAPTURE_HEADROOM_SLOTS = 64


@dataclasses.dataclass(frozen=True)
class ServerRoom:
    """What the scheduler has now."""

    pool_slots: int  # the KV pool
    pinned_slots: int  # held by documents (they do not come back when requests finish)
    max_prompt_tokens: int  # SGLang's longest accepted prompt
    registrations_in_progress: int
    capture_bytes_in_use: int  # reserved by registrations in progress
    bias_slots_free: int | None = None  # room in a GPU backend's bias table (None: no table)
    auto_budget_slots: int | None = None  # the automatic budget, for an automatic registration


def compacted_slots(request: RegistrationRequest, length: int, floor: int = 0) -> int:
    """The document's slots (kept tokens plus the compacted span's budget; per-head budgets may add padding),
    at least the node's ``floor`` (its widest verbatim window, ``layout.node_floor``)."""
    span = length - request.keep_first
    budget = request.largest_ratio
    return max(floor, request.keep_first + (budget if isinstance(budget, int) else max(1, round(budget * span))))


def capture_slots(request: RegistrationRequest, length: int, self_study_prompts: int) -> int:
    """KV slots the capture prefills hold at once: the document (twice for repeat-prefill), then the
    questions with their answers (generated, then teacher-forced) and the self-study answers, which run
    side by side after it."""
    sources = request.query_source
    needed = (2 if "repeat-prefill" in sources else 1) * length + CAPTURE_HEADROOM_SLOTS
    if "self-study" in sources:
        needed += self_study_prompts * (request.self_study_max_new_tokens + CAPTURE_HEADROOM_SLOTS)
    if "questions" in sources:
        needed += sum(len(question) + request.answer_length(index) + CAPTURE_HEADROOM_SLOTS
                      for index, question in enumerate(request.questions))
    return needed


def admit(request: RegistrationRequest, length: int, room: ServerRoom, config: ServerConfig, capture_bytes: int,
          self_study_prompts: int, captures: bool = True, candidate: bool = False, floor: int = 0) -> int:
    """The slots the document will take (``compacted_slots``); ``DocumentError`` when it cannot be registered
    now. A data-parallel rank that installs another rank's compaction (``captures`` false) needs room for the
    document only; a registration certified on held-out questions (``candidate``), room for its candidate too."""
    longest = min(config.max_document_tokens, room.max_prompt_tokens - 1)
    if not MIN_DOCUMENT_TOKENS <= length <= longest:
        raise DocumentError(HTTPStatus.BAD_REQUEST,
                            f"document has {length} tokens; this server takes {MIN_DOCUMENT_TOKENS} to {longest}")
    if not 0 <= request.keep_first <= length - 2:
        raise DocumentError(HTTPStatus.BAD_REQUEST,
                            f"keep_first must be in [0, T - 2] = [0, {length - 2}], got {request.keep_first}")
    span = length - request.keep_first
    if isinstance(request.budget, int) and not 1 <= request.budget <= span:
        raise DocumentError(HTTPStatus.BAD_REQUEST,
                            f"budget must be in [1, T - keep_first] = [1, {span}], got {request.budget}")
    if room.registrations_in_progress >= config.max_registrations:
        raise DocumentError(HTTPStatus.SERVICE_UNAVAILABLE,
                            f"{room.registrations_in_progress} registrations are in progress, the server's limit "
                            "(--am-max-registrations); retry when one finishes")
    slots = compacted_slots(request, length, floor)
    pinned = slots * (2 if candidate else 1)  # a candidate is pinned beside the node until certified
    if room.auto_budget_slots is not None and slots > room.auto_budget_slots:
        raise DocumentError(HTTPStatus.SERVICE_UNAVAILABLE, f"{slots} slots exceed the automatic-compaction budget")
    if room.bias_slots_free is not None and pinned > room.bias_slots_free:
        raise DocumentError(HTTPStatus.SERVICE_UNAVAILABLE,
                            f"the bias table has room for {room.bias_slots_free} more compacted slots and this document "
                            f"needs about {pinned}; drop documents or raise --am-bias-slots")
    free = room.pool_slots - room.pinned_slots  # slots other requests hold now come back; pinned ones do not
    needed = (capture_slots(request, length, self_study_prompts) if captures else 0) + pinned
    if free < needed:  # the capture prefill could never be scheduled: refuse instead of waiting forever
        raise DocumentError(HTTPStatus.SERVICE_UNAVAILABLE,
                            f"the KV pool has {free} slots besides compacted documents and registering this document "
                            f"needs about {needed}; drop documents or raise --max-total-tokens")
    if room.capture_bytes_in_use + capture_bytes > config.capture_memory_bytes:
        raise DocumentError(HTTPStatus.SERVICE_UNAVAILABLE,
                            f"the captured queries would need {capture_bytes / MiB:.1f} MiB and "
                            f"{(config.capture_memory_bytes - room.capture_bytes_in_use) / MiB:.1f} MiB of the capture memory "
                            "are free; lower max_queries_per_head, wait for registrations in progress, or raise "
                            "--am-capture-memory-bytes")
    return slots

