"""What the end-to-end tests (tests/test_sglang_*.py) share about the servers they start and call."""

import contextlib
from collections.abc import Iterator

from sglang_am.client import http_json
from sglang_am.serve import ServerProcess

# SGLang's own invariant checks, on in the servers these tests start: a leaked or double-counted slot
# stops the scheduler.
STRICT_CHECKS = {"SGLANG_ENABLE_TREE_CACHE_SANITY_CHECK": "1", "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"}


def ok(server, method, path, payload=None, key=None):
    """The body of a call that must answer 200 (``key``: the API key it is sent with)."""
    status, body = http_json(method, server + path, payload, key)
    assert status == 200, (status, body)
    return body


@contextlib.contextmanager
def side_by_side(*servers: ServerProcess) -> Iterator[list[str]]:
    """``servers`` started at once, their URLs for a ``with`` block, all killed at its end: a start here is
    mostly one process importing SGLang (about 27 s), so two starts overlap on two cores."""
    launched = []
    try:
        for server in servers:
            launched.append(server.launch())
        yield [server.wait_ready().url for server in servers]
    finally:
        for server in launched:
            server.kill()
