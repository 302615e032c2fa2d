"""What the end-to-end tests (tests/test_sglang_*.py) share about the servers they start and call."""

from sglang_am.client import http_json

# SGLang's own invariant checks, on in the servers these tests start: a leaked or double-counted slot
# stops the scheduler.
STRICT_CHECKS = {"SGLANG_ENABLE_TREE_CACHE_SANITY_CHECK": "1", "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"}


def ok(server, method, path, payload=None, key=None):
    """The body of a call that must answer 200 (``key``: the API key it is sent with)."""
    status, body = http_json(method, server + path, payload, key)
    assert status == 200, (status, body)
    return body
