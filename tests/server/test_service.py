"""The document service over scripted scheduler ranks."""

import asyncio
from http import HTTPStatus

import pytest

from sglang_am.server.entrypoints.service import DocumentService
from sglang_am.server.errors import DocumentError

from .samples import CONFIG


class ScriptedRank:
    """One scheduler rank answering each operation from a script (the service's side of the channel)."""

    num_ranks = 1

    def __init__(self, script: dict):
        self.script, self.calls = script, []

    async def call(self, operation, ranks=None):
        self.calls.append(operation.name)
        return [self.script.get(operation.name, {})]


def test_a_load_whose_document_is_dropped_once_ready_answers_409_not_a_crash():
    doc_id = "a" * 64
    rank = ScriptedRank({"load": {"doc_id": doc_id, "state": "loading", "existing": False},
                         "advance": {"doc_id": doc_id, "state": "ready"},
                         "get": DocumentError(HTTPStatus.NOT_FOUND, "no document")})  # a drop came in between
    service = DocumentService(None, rank, CONFIG)
    with pytest.raises(DocumentError) as refused:
        asyncio.run(service.load(doc_id))
    assert refused.value.status == HTTPStatus.CONFLICT and "dropped while it was being loaded" in refused.value.message
    assert rank.calls == ["load", "advance", "get"]  # the drop took it all: nothing left to abandon


class CertifyingRank(ScriptedRank):
    """A rank whose registration certifies: every advance leaves the candidate installed, every certify that
    accepts makes the document ready, and one that gives up is refused as the scheduler refuses it."""

    def __init__(self):
        super().__init__({})
        self.operations = []

    async def call(self, operation, ranks=None):
        self.operations.append(operation)
        if operation.name == "certify" and not operation.accept and operation.next_budget is None:
            return [DocumentError(HTTPStatus.UNPROCESSABLE_ENTITY, "no ratio on the ladder keeps ...")]
        state = "ready" if operation.name == "certify" and operation.accept else "certifying"
        return [{"doc_id": operation.doc_id, "state": state}]


def certify(agreements: list[float], bound: float | None, budgets=(0.05, 0.1, 0.2)):
    rank = CertifyingRank()
    service = DocumentService(None, rank, CONFIG)
    asked = iter(agreements)

    async def answer_figures(doc_id, salt, ids, references, rank, candidate=False):
        assert candidate and references == ["q1", "q3"]  # the held-out questions, asked of the candidate
        assert salt == "s"  # the probes carry the registration's salt: clients cannot send them
        return {"agreement": next(asked), "next_token_kl": 0.1}

    service.requests.answer_figures = answer_figures
    certification = {"heldout": [1, 3], "budgets": list(budgets), "bound": bound}
    figures = asyncio.run(service._certify("d" * 64, "s", [1, 2], ["q0", "q1", "q2", "q3"], certification, {}, 0))
    return figures, [(op.name, getattr(op, "budget", None), getattr(op, "accept", None), getattr(op, "next_budget", None))
                     for op in rank.operations]


def test_certification_installs_the_first_rung_whose_heldout_answers_meet_the_bound():
    figures, calls = certify([0.5, 0.85, 1.0], bound=0.8)
    assert calls == [("advance", 0.05, None, None), ("certify", None, False, 0.1), ("certify", None, True, None)]
    assert [rung["budget"] for rung in figures["certification"]] == [0.05, 0.1] and figures["agreement_bound"] == 0.8
    assert figures["heldout"] == {"budget": 0.1, "agreement": 0.85, "next_token_kl": 0.1, "heldout_questions": [1, 3]}
    fixed, calls = certify([0.2], bound=None, budgets=[0.1])  # a fixed ratio: its figures are reported, the node installed
    assert calls == [("advance", 0.1, None, None), ("certify", None, True, None)] and "certification" not in fixed


def test_certification_refuses_a_document_no_rung_certifies_and_says_how_far_it_got():
    with pytest.raises(DocumentError) as refused:
        certify([0.1, 0.2, 0.3], bound=0.8)
    assert refused.value.status == HTTPStatus.UNPROCESSABLE_ENTITY and refused.value.message.endswith("(at 0.2: 0.3 < 0.8)")


def test_a_learned_registration_whose_questions_fail_leaves_nothing_on_the_ranks():
    doc_id = "b" * 64
    rank = ScriptedRank({"observe": {"doc_id": doc_id, "state": "observing", "existing": False, "registration": 7},
                         "get": {"doc_id": doc_id, "state": "observing", "requests_served": 0, "requests_active": 0}})
    service = DocumentService(None, rank, CONFIG)
    asked = []

    async def ask_as_traffic(ids, questions, rank_index):
        asked.append((ids, questions, rank_index))
        if questions == [[9]]:
            raise DocumentError(HTTPStatus.SERVICE_UNAVAILABLE, "the question's request was aborted")

    service.requests.ask_as_traffic = ask_as_traffic
    assert asyncio.run(service._learn([1, 2, 3], [[8]]))["existing"] is False
    assert asked == [([1, 2, 3], [[8]], 0)] and rank.calls == ["observe", "get"]
    with pytest.raises(DocumentError, match="aborted"):
        asyncio.run(service._learn([1, 2, 3], [[9]]))
    assert rank.calls[2:] == ["observe", "abandon"]  # what this call added is abandoned
