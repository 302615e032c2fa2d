"""Learned documents' bookkeeping in the scheduler, without a server."""

import contextlib
import dataclasses
from array import array
from http import HTTPStatus
from types import SimpleNamespace

import pytest
import torch

from sglang_am.prefix import CompactedPrefix
from sglang_am.server.auto import GUARD_REFUSALS_BEFORE_PAUSE, ReuseTracker
from sglang_am.server.errors import DocumentError
from sglang_am.server.protocol import AuditLearned, CertifyLearned, Observe
from sglang_am.server.scheduler.adapt import (
    ANSWERS_KEPT,
    AUDIT_SAMPLE,
    MAX_PROMPT_KEPT,
    NEW_PROMPTS_BEFORE_AUDIT,
    AnswerAudit,
    LearnedCertification,
    LiveQueries,
    Observation,
    ServedAnswer,
)
from sglang_am.server.scheduler.refits import OBSERVE_TRIES, Refits, _ladder, reentry_bound
from sglang_am.server.scheduler.registry import DocState, document_id
from sglang_am.server.scheduler.solve import Solved

from .samples import CONFIG


class FailedJob:
    def __init__(self, error: Exception):
        self.error = error

    def result(self):
        raise self.error


def test_only_guard_refusals_pause_observing_a_fault_does_not():
    discarded = []
    registry = SimpleNamespace(policy=SimpleNamespace(window_seconds=60.0), in_state=lambda *states: [], tracker=None)
    registrations = SimpleNamespace(cache=None, registry=registry, discard=lambda doc, failed=True: discarded.append(doc))
    refits = Refits(registrations, CONFIG, solver=None)

    def give_up(error: Exception) -> None:  # a learned document at its last try, whose solve ends with ``error``
        observation = Observation(LiveQueries([0], 4), requests_needed=2, answer_steps=1, tries=OBSERVE_TRIES - 1)
        refits._finish_learning(None, SimpleNamespace(doc_id="d", auto=True, job=FailedJob(error), observation=observation))

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
    policy = SimpleNamespace(ratio=ratio, agreement_bound=0.8, window_seconds=60.0, audit_requests=32, min_tokens=2,
                             keep_last=1, min_requests=3)
    documents = {}
    registry = SimpleNamespace(policy=policy, stats=Stats(), get=documents.get, in_state=lambda *states: [],
                               tracker=ReuseTracker(policy))
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
    doc = SimpleNamespace(doc_id="d", auto=True, state=DocState.OBSERVING, observation=observation, tokens=[5, 6],
                          solved=Solved(prefix, adaptation=SimpleNamespace(audit=None)),
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


def audited_setup(mode="guard"):
    """A ``Refits`` and an installed learned document (version 7) whose answers are audited every 4 greedy requests."""
    refits, _, _ = learned_setup()
    registry = refits.registry
    registry.policy.observe_requests = 8
    registry.update_gauges = lambda: None
    refits.registrations.reap = lambda scheduler: None
    audit = AnswerAudit(every=4, answer_steps=2)
    adaptation = SimpleNamespace(audit=audit, mode=mode, live=LiveQueries([0], 4), stopped=[])
    adaptation.stop = adaptation.stopped.append  # a running refit is cancelled with this reason
    installed = SimpleNamespace(index=7)
    doc = SimpleNamespace(doc_id="d", state=DocState.READY, adaptation=adaptation, installed=installed, retired=[],
                          tokens=[5, 6], observation=None, describe=lambda: {"doc_id": "d"})
    registry.get = {"d": doc}.get
    registry.in_state = lambda *states: [doc] if DocState.READY in states and doc.state is DocState.READY else []
    return refits, doc, audit


def test_an_installed_learned_node_is_audited_on_its_latest_greedy_answers_and_reverted_when_they_disagree():
    refits, doc, audit = audited_setup()
    for request in range(AUDIT_SAMPLE + 2):  # the last AUDIT_SAMPLE are kept, answers cut to answer_steps
        audit.note([request, 9], [1, 2, 3])
    audit.note([1] * (MAX_PROMPT_KEPT + 1), [1])  # too long to keep, and not counted
    (due,) = refits.audits()
    assert due["version"] == 7 and due["input_ids"] == [5, 6] and len(due["served"]) == AUDIT_SAMPLE
    assert due["served"][0] == {"prompt": [2, 9], "answer": [1, 2]} and refits.audits() == []  # handed out once
    with pytest.raises(DocumentError) as stale:  # an answer for another version is refused
        refits.audit_learned(None, AuditLearned("d", 6, figures={"agreement": 0.1, "requests": 8}))
    assert stale.value.status == HTTPStatus.CONFLICT
    refits.audit_learned(None, AuditLearned("d", 7, figures={"agreement": 0.9, "requests": 8}))
    assert doc.state is DocState.READY and audit.last["agreement"] == 0.9 and audit.out_for is None
    for request in range(4):
        audit.note([request], [1])
    (due,) = refits.audits()
    adaptation = doc.adaptation
    refits.audit_learned(None, AuditLearned("d", 7, figures={"agreement": 0.5, "requests": 4}))
    assert adaptation.stopped == ["the document reverted to its full prefix"]
    assert doc.state is DocState.OBSERVING and doc.installed is None and doc.adaptation is None
    assert doc.retired[0].index == 7 and "agreed with the full prefix's answers on 0.5" in doc.observation.last_error
    assert refits.registry.stats.counts == {"answer_audits": 2, "reverts": 1}


def test_a_reverted_document_needs_held_out_answers_past_the_reentry_bound_and_once_given_up_is_not_proposed_at_once():
    """Hysteresis: a node reverted at the bound (0.8) comes back only at 0.9; given up, its prefix stays quiet."""
    refits, doc, audit = audited_setup()
    for request in range(4):
        audit.note([request], [1])
    refits.audits()
    refits.audit_learned(None, AuditLearned("d", 7, figures={"agreement": 0.7, "requests": 4}))
    observation = doc.observation
    assert observation.agreement_bound == reentry_bound(0.8) == 0.9 and observation.describe()["agreement_bound"] == 0.9
    one = torch.zeros(1, 1, 1)
    doc.auto = True
    for rung in _ladder(0.0)[:OBSERVE_TRIES]:
        prefix = CompactedPrefix([one], [one], [one[0]], 1, [5], {}, "AM-HighestAttnKeys",
                                 {"budget": "auto", "fidelity": {"ratio": rung}})
        doc.solved = Solved(prefix, adaptation=SimpleNamespace(audit=None))
        observation.certifying = LearnedCertification([ServedAnswer([1], [2])], deadline=float("inf"))
        refits.certify_learned(None, CertifyLearned("d", figures(0.85)))  # enough before the revert, not after
        assert "below the bound 0.9" in observation.last_error
    assert refits.registry.stats.counts["answer_refusals"] == OBSERVE_TRIES
    tracker = refits.registry.tracker
    assert tracker.cooldown.keys() == {array("q", doc.tokens).tobytes()}  # its first min_tokens ids
    for rid in range(3):
        tracker.observe([*doc.tokens, rid, 9, 9], f"r{rid}")
    assert tracker.take_candidates() == []


def test_an_audit_comes_early_once_enough_requests_asked_questions_the_node_was_not_learned_from():
    refits, doc, _ = learned_setup()
    adaptation = doc.solved.adaptation
    for question in range(3):  # the observed requests' prompts follow the prefix [5]
        doc.observation.note_answer(question, [5, question], 1, [1])
    refits.certify_learned(None, CertifyLearned("d", figures(0.9)))
    audit = adaptation.audit
    for request in range(31):  # only the questions it was learned from: audited every 32 requests
        audit.note([request % 3], [1])
    assert not audit.due() and audit.new_since == 0
    audit.note([0], [1])
    assert audit.due()
    audit.hand_out(7, answer_by=0.0)  # an audit whose answer never came holds back no later one
    for question in range(NEW_PROMPTS_BEFORE_AUDIT):  # new questions, each asked twice: due at the 4th new one
        assert not audit.due()
        audit.note([100 + question], [1])
        audit.note([100 + question], [1])
    assert audit.due() and audit.since == 2 * NEW_PROMPTS_BEFORE_AUDIT
    assert audit.describe()["new_prompts_since_last"] == NEW_PROMPTS_BEFORE_AUDIT
    # The audit asks the requests that asked new prompts, not the latest ones (half of them repeats).
    assert [served.prompt for served in audit.hand_out(7, answer_by=0.0)] == [[100 + q] for q in range(NEW_PROMPTS_BEFORE_AUDIT)]
    for request in range(32):  # a periodic audit asks the latest requests
        audit.note([request % 3], [1])
    assert [served.prompt for served in audit.hand_out(7, answer_by=0.0)] == [[request % 3] for request in range(24, 32)]


def test_an_audit_that_failed_or_of_a_fixed_ratio_node_keeps_the_node():
    refits, doc, audit = audited_setup(mode="watch")
    for request in range(4):
        audit.note([request], [1])
    refits.audits()
    refits.audit_learned(None, AuditLearned("d", 7, figures={"agreement": 0.1, "requests": 4}))
    assert doc.state is DocState.READY and audit.last["agreement"] == 0.1  # capacity over fidelity: reported only
    for request in range(4):
        audit.note([request], [1])
    refits.audits()
    refits.audit_learned(None, AuditLearned("d", 7, error="RuntimeError('aborted')"))
    assert doc.state is DocState.READY and audit.last == {"error": "RuntimeError('aborted')"} and audit.due() is False
    audit.restart()  # a refit's new version: the answers kept were the old one's
    assert not audit.recent and not audit.recent_new and audit.since == 0


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


def test_a_client_document_that_learns_is_never_given_up_or_paused_and_pins_its_prefix_once_computed():
    discarded, holds = [], []
    policy = SimpleNamespace(window_seconds=60.0, observe_requests=2)
    observing = []
    registry = SimpleNamespace(policy=policy, in_state=lambda *states: observing, stats=Stats(), tracker=None)
    cache = SimpleNamespace(hold_prefix=lambda tokens, salt: holds.append(tuple(tokens)) or (None if len(holds) == 1 else "held"))
    registrations = SimpleNamespace(cache=cache, registry=registry, discard=lambda doc, failed=True: discarded.append(doc))
    refits = Refits(registrations, CONFIG, solver=None)

    def learning(auto: bool):
        observation = Observation(LiveQueries([0], 4), requests_needed=2, answer_steps=1, tries=OBSERVE_TRIES - 1)
        return SimpleNamespace(doc_id="auto" if auto else "client", auto=auto, job=None, source=None, tokens=[1, 2],
                               observation=observation)

    client = learning(auto=False)
    refits._pin(client)  # not computed yet: looked for again only once another request reuses it
    refits._pin(client)
    assert client.source is None and len(holds) == 1
    client.observation.tag()
    refits._pin(client)
    refits._pin(client)
    assert client.source == "held" and len(holds) == 2
    automatic = learning(auto=True)
    refits._pin(automatic)  # an automatic document serves its prefix from the tree as traffic leaves it
    assert automatic.source is None and len(holds) == 2

    # Refused at its last try: an automatic document is given up; a client's observes afresh, its next solve after
    # OBSERVE_TRIES doublings of the requests, and stays when a pause stops the automatic ones.
    observing.extend([client, automatic])
    refused = DocumentError(HTTPStatus.UNPROCESSABLE_ENTITY, "no rung within the bound")
    for doc in (client, automatic):
        doc.job = FailedJob(refused)
        refits._finish_learning(None, doc)
    assert discarded == [automatic]
    assert client.observation.tries == OBSERVE_TRIES and client.observation.last_error == "no rung within the bound"
    assert not client.observation.due() and client.source == "held"
    for _ in range(GUARD_REFUSALS_BEFORE_PAUSE - 1):  # the automatic document's was the first in a row
        refits._note_given_up()
    assert refits.paused_until > 0 and discarded == [automatic, automatic]  # the pause stopped the automatic one only


def test_learning_needs_the_automatic_policy_and_a_client_makes_an_automatic_document_its_own():
    documents = {}
    registry = SimpleNamespace(policy=None, get=documents.get, update_gauges=lambda: None)
    refits = Refits(SimpleNamespace(cache=None, registry=registry), CONFIG, solver=None)
    with pytest.raises(DocumentError, match="start the server with --am-auto") as raised:
        refits.observe(None, Observe([1, 2, 3], explicit=True))
    assert raised.value.status == HTTPStatus.BAD_REQUEST
    registry.policy = SimpleNamespace()
    doc = SimpleNamespace(auto=True, describe=lambda: {"state": "observing"})
    documents[document_id([1, 2, 3])] = doc
    assert refits.observe(None, Observe([1, 2, 3], explicit=True)) == {"state": "observing", "existing": True}
    assert doc.auto is False
