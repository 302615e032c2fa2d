"""Test-only fault injection (in the spirit of SGLang's ``SGLANG_TEST_*`` variables).

``SGLANG_AM_TEST_FAULTS`` names a file listing (comma or newline separated) the points at which the
server fails on purpose, so the tests can check that every failure path releases what it took; a test
rewrites the file to switch faults on and off while the server runs. Points: ``solve`` (the solver
raises), ``solver_exit`` (the solver thread gets ``SystemExit``), ``capture`` (recording queries fails
inside the forward pass), ``store_write`` (the disk fills up halfway through a save), ``store_slow``
(a save takes 3 s), ``rpc_slow`` (a stats call takes 3 s), ``refit_slow`` (a refit waits 3 s before it
solves), ``prepare_rank_1`` (data-parallel rank 1 refuses registrations as if its pool were full), ``upkeep``
(the scheduler's document upkeep after a batch raises, ``operations.background_step``), and one
that corrupts data instead of failing: ``nonfinite_kv`` (a solve reads NaN in the document's values,
``enabled``). Unset, ``inject`` does nothing.
"""

from __future__ import annotations

import errno
import os
import time
from http import HTTPStatus

from .errors import DocumentError

FAULTS_VARIABLE = "SGLANG_AM_TEST_FAULTS"
SLOW_SECONDS = 3.0


def _raise(error: BaseException):
    def fail():
        raise error

    return fail


_FAULTS = {
    "solve": _raise(RuntimeError("injected solver failure")),
    "solver_exit": _raise(SystemExit("injected solver thread exit")),
    "capture": _raise(RuntimeError("injected capture failure")),
    "store_write": _raise(OSError(errno.ENOSPC, "No space left on device (injected)")),
    "store_slow": lambda: time.sleep(SLOW_SECONDS),
    "rpc_slow": lambda: time.sleep(SLOW_SECONDS),
    "refit_slow": lambda: time.sleep(SLOW_SECONDS),
    "upkeep": _raise(RuntimeError("injected upkeep failure")),
    "prepare_rank_1": _raise(DocumentError(HTTPStatus.SERVICE_UNAVAILABLE, "the KV pool has no room for this document "
                                                                          "(injected)")),
}


_DATA_FAULTS = {"nonfinite_kv"}


def active() -> set[str]:
    path = os.environ.get(FAULTS_VARIABLE)
    if not path:
        return set()
    try:
        with open(path) as handle:
            return {point.strip() for point in handle.read().replace("\n", ",").split(",")} & (set(_FAULTS) | _DATA_FAULTS)
    except OSError:
        return set()


def inject(point: str) -> None:
    if point in active():
        _FAULTS[point]()


def enabled(point: str) -> bool:
    """Is the data fault ``point`` on (the caller corrupts its own data)?"""
    return point in _DATA_FAULTS and point in active()
