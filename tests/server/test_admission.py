"""Admission: a registration that can never fit is refused with 400, one that does not fit now with 503."""

import dataclasses

import pytest

from sglang_am.server.errors import DocumentError
from sglang_am.server.scheduler.admission import ServerRoom, admit

from .samples import CONFIG, IDS, request

ROOM = ServerRoom(pool_slots=8192, pinned_slots=0, max_prompt_tokens=4096, registrations_in_progress=0,
                  capture_bytes_in_use=0)


def test_admission_refuses_what_never_fits_with_400_and_what_does_not_fit_now_with_503():
    assert admit(request(), len(IDS), ROOM, CONFIG, 1000, 4) == 20
    # A node is as wide as its widest verbatim window on every layer: that is what it pins and what is counted.
    assert admit(request(), len(IDS), ROOM, CONFIG, 1000, 4, floor=64) == 64
    with pytest.raises(DocumentError, match="64 slots exceed the automatic-compaction budget"):
        admit(request(), len(IDS), dataclasses.replace(ROOM, auto_budget_slots=32), CONFIG, 1000, 4, floor=64)
    cases = [
        (request(), 10, ROOM, 400, "document has 10 tokens"),
        (request(), 4096, ROOM, 400, "this server takes 16 to 4095"),
        (request(keep_first=199), len(IDS), ROOM, 400, "keep_first must be in [0, T - 2]"),
        (request(ratio=None, budget=len(IDS) + 1), len(IDS), ROOM, 400, "budget must be in [1, T - keep_first]"),
        (request(), len(IDS), dataclasses.replace(ROOM, registrations_in_progress=4), 503, "registrations are in progress"),
        (request(), len(IDS), dataclasses.replace(ROOM, pinned_slots=8000), 503, "the KV pool has 192 slots"),
        (request(), len(IDS), dataclasses.replace(ROOM, bias_slots_free=5), 503, "bias table has room for 5"),
        (request(), len(IDS), dataclasses.replace(ROOM, auto_budget_slots=10), 503, "automatic-compaction budget"),
        (request(), len(IDS), dataclasses.replace(ROOM, capture_bytes_in_use=CONFIG.capture_memory_bytes - 10), 503,
         "captured queries would need"),
    ]
    for made, length, room, status, reason in cases:
        with pytest.raises(DocumentError) as error:
            admit(made, length, room, CONFIG, 1000, 4)
        assert error.value.status == status and reason in error.value.message, (reason, error.value.message)
