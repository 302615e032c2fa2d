"""Learned documents' bookkeeping in the scheduler, without a server."""

from http import HTTPStatus
from types import SimpleNamespace

from sglang_am.server.adapt import LiveQueries, Observation
from sglang_am.server.auto import GUARD_REFUSALS_BEFORE_PAUSE
from sglang_am.server.errors import DocumentError
from sglang_am.server.refits import OBSERVE_TRIES, Refits

from .samples import CONFIG


class FailedJob:
    def __init__(self, error: Exception):
        self.error = error

    def result(self):
        raise self.error


def test_only_guard_refusals_pause_observing_a_fault_does_not():
    discarded = []
    registry = SimpleNamespace(policy=SimpleNamespace(window_seconds=60.0), in_state=lambda *states: [])
    registrations = SimpleNamespace(cache=None, registry=registry, discard=lambda doc, failed=True: discarded.append(doc))
    refits = Refits(registrations, CONFIG, solver=None)

    def give_up(error: Exception) -> None:  # a learned document at its last try, whose solve ends with ``error``
        observation = Observation(LiveQueries([0], 4), requests_needed=2, answer_steps=1, tries=OBSERVE_TRIES - 1)
        refits._finish_learning(None, SimpleNamespace(doc_id="d", job=FailedJob(error), observation=observation))

    for _ in range(GUARD_REFUSALS_BEFORE_PAUSE):
        give_up(RuntimeError("injected solver failure"))
    assert len(discarded) == GUARD_REFUSALS_BEFORE_PAUSE and refits.paused_until == 0.0
    for _ in range(GUARD_REFUSALS_BEFORE_PAUSE):
        give_up(DocumentError(HTTPStatus.UNPROCESSABLE_ENTITY, "no rung within the bound"))
    assert len(discarded) == 2 * GUARD_REFUSALS_BEFORE_PAUSE and refits.paused_until > 0
