"""Learned documents' bookkeeping in the scheduler, without a server."""

import contextlib
import dataclasses
from http import HTTPStatus
from types import SimpleNamespace

import pytest
import torch

from sglang_am.prefix import CompactedPrefix
from sglang_am.server.auto import GUARD_REFUSALS_BEFORE_PAUSE
from sglang_am.server.errors import DocumentError
from sglang_am.server.protocol import CertifyLearned
from sglang_am.server.scheduler.adapt import (
    ANSWERS_KEPT,
    MAX_PROMPT_KEPT,
    LearnedCertification,
    LiveQueries,
    Observation,
    ServedAnswer,
)
from sglang_am.server.scheduler.refits import OBSERVE_TRIES, Refits, _ladder
from sglang_am.server.scheduler.registry import DocState
from sglang_am.server.scheduler.solve import Solved

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


class Stats:
    def __init__(self):
        self.counts = {}

    def add(self, name, amount=1, **labels):
        self.counts[name] = self.counts.get(name, 0) + amount


def learned_setup(ratio="auto"):
    """A ``Refits`` over stand-in registrations that record what they were asked, and a learned document whose
    candidate (at the ladder's lowest rung) waits for its held-out requests' answers."""
    asked = {"installed": [], "discarded": [], "retired": []}
    policy = SimpleNamespace(ratio=ratio, agreement_bound=0.8, window_seconds=60.0)
    documents = {}
    registry = SimpleNamespace(policy=policy, stats=Stats(), get=documents.get, in_state=lambda *states: [])
    registrations = SimpleNamespace(
        cache=None, registry=registry, retire_candidate=lambda doc: asked["retired"].append(doc.doc_id),
        discard=lambda doc, failed=True: asked["discarded"].append(doc.doc_id),
        install_solved=lambda scheduler, doc, solved: asked["installed"].append(solved.prefix.config),
        discarding_on_failure=contextlib.nullcontext)
    refits = Refits(registrations, CONFIG, solver=None)
    observation = Observation(LiveQueries([0], 4), requests_needed=2, answer_steps=4)
    rung = _ladder(0.0)[0]
    observation.certifying = LearnedCertification([ServedAnswer([1], [2])], deadline=float("inf"))
    one = torch.zeros(1, 1, 1)
    prefix = CompactedPrefix([one], [one], [one[0]], 1, [5], {}, "AM-HighestAttnKeys",
                             {"budget": ratio, "fidelity": {"relative_l2": 0.05, "ratio": rung}})
    doc = SimpleNamespace(doc_id="d", state=DocState.OBSERVING, observation=observation, solved=Solved(prefix),
                          describe=lambda: {"doc_id": "d"})
    documents["d"] = doc
    return refits, doc, asked


def figures(agreement):
    return {"agreement": agreement, "agreement_by_position": [agreement], "next_token_kl": 0.1,
            "next_token_kl_max": 0.2, "questions": 1}


def test_a_learned_node_whose_held_out_answers_agree_is_installed_with_them():
    refits, doc, asked = learned_setup()
    refits.certify_learned(None, CertifyLearned("d", figures(0.9)))
    (config,) = asked["installed"]
    assert config["fidelity"]["heldout_answers"]["agreement"] == 0.9 and config["fidelity"]["relative_l2"] == 0.05
    assert asked["retired"] == ["d"] and doc.solved is None and doc.observation is None
    with pytest.raises(DocumentError) as raised:  # told twice: nothing is certifying any more
        refits.certify_learned(None, CertifyLearned("d", figures(0.9)))
    assert raised.value.status == HTTPStatus.CONFLICT


def test_a_learned_node_whose_held_out_answers_disagree_observes_on_from_the_rung_above_then_is_given_up():
    refits, doc, asked = learned_setup()
    first, second = _ladder(0.0)[:2]
    prefix = doc.solved.prefix
    refits.certify_learned(None, CertifyLearned("d", figures(0.5)))
    observation = doc.observation
    assert not asked["installed"] and not asked["discarded"] and asked["retired"] == ["d"]
    assert observation.tries == 1 and observation.lowest_ratio == second and "0.5" in observation.last_error
    assert observation.certifying is None and refits.registry.stats.counts == {"answer_refusals": 1}
    observation.certifying = LearnedCertification([ServedAnswer([1], [2])], deadline=float("inf"))
    doc.solved = Solved(dataclasses.replace(prefix, config={**prefix.config, "fidelity": {"ratio": second}}))
    refits.certify_learned(None, CertifyLearned("d", figures(0.5)))
    assert asked["discarded"] == ["d"] and refits.given_up_in_a_row == 1  # OBSERVE_TRIES refusals: a guard's give-up
    assert first < second


def test_a_fixed_ratio_installs_a_learned_node_whatever_its_answers_and_a_failed_probe_gives_it_up_unpaused():
    refits, _, asked = learned_setup(ratio=0.1)
    refits.certify_learned(None, CertifyLearned("d", figures(0.2)))
    assert asked["installed"][0]["fidelity"]["heldout_answers"]["agreement"] == 0.2
    refits, _, asked = learned_setup()
    refits.certify_learned(None, CertifyLearned("d", error="RuntimeError('probe failed')"))
    assert asked["discarded"] == ["d"] and refits.given_up_in_a_row == 0 and not asked["installed"]


def test_an_observation_keeps_a_bounded_number_of_greedy_answers_and_waits_while_certifying():
    observation = Observation(LiveQueries([0], 4), requests_needed=1, answer_steps=3)
    observation.note_answer(0, [9, 9, 1, 2], 2, [7, 8, 9, 10])  # the prompt after a 2-token prefix
    observation.note_answer(1, [0] * (MAX_PROMPT_KEPT + 3), 2, [7])  # too long a prompt to keep
    observation.note_answer(2, [1], 0, [])  # nothing served
    assert observation.answers == {0: ServedAnswer([1, 2], [7, 8, 9])}
    for part in range(3, 3 + ANSWERS_KEPT):
        observation.note_answer(part, [1], 0, [5])
    assert len(observation.answers) == ANSWERS_KEPT and 3 + ANSWERS_KEPT - 1 not in observation.answers
    observation.heldout = frozenset({4, 0, 2})
    assert observation.heldout_answers() == [ServedAnswer([1, 2], [7, 8, 9]), ServedAnswer([1], [5])]
    observation.live.requests.add(0)
    assert observation.due()
    observation.certifying = LearnedCertification([], deadline=0.0)
    assert not observation.due()
