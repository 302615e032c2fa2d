"""The operation records: what the HTTP process encodes, the scheduler decodes to the same record; a call it
does not know, or with fields the record does not have, is a 400 naming it."""

from http import HTTPStatus

import pytest

from sglang_am.server.errors import DocumentError
from sglang_am.server.protocol import OPERATIONS, Advance, AuditLearned, Prepare, decode


def test_every_operation_has_its_own_name_and_decodes_to_what_was_encoded():
    assert len(OPERATIONS) == 20 and all(kind.name == name for name, kind in OPERATIONS.items())
    sent = [Prepare({"ratio": 0.1}, [5, 6, 7], auto=True, primary=1), Advance("a" * 64, {"prefill_seconds": 0.5}),
            Advance("b" * 64, handoff="h"), AuditLearned("c" * 64, 3, figures={"agreement": 0.5, "requests": 8})]
    for operation in sent:
        assert decode(operation.name, operation.encode()) == operation


@pytest.mark.parametrize(("name", "fields", "reason"), [
    ("evict_everything", "{}", "unknown document operation 'evict_everything'"),
    ("advance", '{"doc_id": "x", "force": true}', "bad fields for advance"),
    ("drop", "{}", "bad fields for drop"),
])
def test_an_unknown_operation_or_field_is_refused_with_400(name, fields, reason):
    with pytest.raises(DocumentError, match=reason) as refused:
        decode(name, fields)
    assert refused.value.status == HTTPStatus.BAD_REQUEST
