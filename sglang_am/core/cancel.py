"""Cooperative cancellation of a running solve: a caller's deadline or cancel flag, checked at loop boundaries.

A solve can run for minutes (long documents, many queries, OMP), and a thread cannot be stopped from
outside. The solver's loops (score chunks, OMP steps, NNLS iterations) call ``checkpoint()``, which raises
``CompactionCancelled`` once the check installed by the innermost ``cancellation(...)`` of this thread
returns a reason. Without one installed, ``checkpoint()`` costs a context-variable read.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

_check: contextvars.ContextVar[Callable[[], str | None] | None] = contextvars.ContextVar("sglang_am_cancel", default=None)


class CompactionCancelled(Exception):
    """The solve was stopped by its caller; ``str()`` is the reason the caller's check gave."""


@contextlib.contextmanager
def cancellation(check: Callable[[], str | None]) -> Iterator[None]:
    """Within the block, solver loops stop with ``CompactionCancelled(reason)`` once ``check()`` returns a
    reason (``None`` means go on)."""
    token = _check.set(check)
    try:
        yield
    finally:
        _check.reset(token)


def checkpoint() -> None:
    check = _check.get()
    if check is not None:
        reason = check()
        if reason is not None:
            raise CompactionCancelled(reason)
