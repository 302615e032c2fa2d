"""The document registry: references held by requests, longest-prefix lookup and boundary misses."""

from array import array
from types import SimpleNamespace

from sglang_am.server.scheduler.registry import BOUNDARY_TOKENS, DocState, Document, DocumentRegistry, document_id

from .samples import IDS, document


def test_a_request_holds_its_document_until_it_ends_once():
    registry, doc = DocumentRegistry(None), document(slots=4)
    registry.add(doc)
    first, second = SimpleNamespace(), SimpleNamespace()
    registry.acquire(doc, first)
    version = doc.installed
    doc.installed = SimpleNamespace(num_slots=4, head_slots=[], bias=[], users=0)  # a refit installed meanwhile
    registry.acquire(doc, second, counted=False)  # a registration's probe
    assert doc.users == 2 and doc.requests_served == 1 and version.users == doc.installed.users == 1
    assert first.am.served.version is version and second.am.served.version is doc.installed
    assert first.am.served.client and not second.am.served.client
    registry.release(first)
    registry.release(first)  # the stream and an abort report may both see the end: counted once
    registry.release(SimpleNamespace())  # never rewritten
    assert doc.users == 1 and version.users == 0
    registry.release(second)
    assert doc.users == 0 and doc.installed.users == 0


def test_lookup_takes_the_longest_ready_or_registering_prefix_and_ids_are_full_sha256():
    registry = DocumentRegistry(None)
    short, long = document(index=1), document(index=1)
    long.tokens = array("q", IDS[1:150])
    short.tokens = array("q", IDS[1:50])
    short.doc_id, long.doc_id = document_id(short.tokens), document_id(long.tokens)
    loading = Document("f" * 64, 9, array("q"), "", {}, False, DocState.LOADING)  # no tokens yet
    for doc in (short, long, loading):
        registry.add(doc)
    assert registry.longest_prefix(IDS[1:]) is long and registry.longest_prefix(IDS[1:100]) is short
    assert registry.longest_prefix([1, 2, 3]) is None
    assert len(short.doc_id) == 64 and int(short.doc_id, 16) >= 0


def test_a_prompt_that_leaves_a_document_within_its_last_tokens_is_a_boundary_miss():
    registry, doc = DocumentRegistry(None), document(index=1)
    registry.add(doc)
    merged = list(IDS[1:-3]) + [7, 8, 9, 10]  # the last 3 tokens tokenized differently, then the question
    assert registry.longest_prefix(merged) is None and registry.boundary_miss(merged) is doc
    assert registry.boundary_miss(list(IDS[1:-BOUNDARY_TOKENS - 1]) + [7] * 20) is None  # parted earlier
    assert registry.boundary_miss(list(IDS[1:-BOUNDARY_TOKENS])) is None  # ends where the boundary begins
    doc.state = DocState.CAPTURING
    assert registry.boundary_miss(merged) is None  # only ready documents
