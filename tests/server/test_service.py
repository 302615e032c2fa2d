"""The document service over scripted scheduler ranks."""

import asyncio
from http import HTTPStatus

import pytest

from sglang_am.server.errors import DocumentError
from sglang_am.server.service import DocumentService

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
