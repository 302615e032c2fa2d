"""Automatic compaction: find long radix-tree prefixes that many requests reuse, and compact them.

The policy (``AutoPolicy``) reaches every SGLang process as JSON in ``SGLANG_AM_AUTO`` (the launcher's
``--am-auto*`` flags write it). In the scheduler, ``ReuseTracker`` watches each request's radix-tree
match (``AMRadixCache.match_prefix``): requests of at least ``min_tokens`` (plus ``keep_last``) tokens
are grouped by their first ``min_tokens``, whether the tree still holds them or not, and the group keeps
the longest common prefix of their prompts. Once ``min_requests`` of them arrive within
``window_seconds``, that prefix minus a protected tail of ``keep_last`` tokens becomes a candidate. The
HTTP process polls for candidates (``background.AutoCompactor``). With the default query source ``live``
each candidate learns from traffic, with no extra prefill (``refits``): the requests that reuse it are
served in full and keep their queries until ``observe_requests`` of them certify a node on the half held
out (their attention error, and their greedy answers: ``agreement_bound``). With a captured source it is
registered through the ordinary registration path, two at a time, in the background. Either way new
requests on the prefix then use the compacted node, requests in flight keep their full prefix.

Each is compacted at ``ratio``, by default ``"auto"``: the smallest ratio on the ladder up to
``AUTO_LADDER_TOP`` whose fidelity guard meets ``fidelity_bound`` (``solve``); a prefix that none meets is
not compacted (the registration fails with 422, counted in ``compaction_failures``), and is proposed again
after a window. A fixed ``ratio`` compacts every candidate, whatever its figure. Live documents keep refitting
from the requests they serve (``adapt``) and go back to observing when what those ask leaves the bound; with
``adapt``, captured automatic documents start on the whole ladder's pick and refit too. Compacted
content from this path is capped by ``budget`` (KV slots, or a fraction of the pool): the least recently
used automatic documents that no request uses are dropped, and saved to the server's document store
first (``save_evicted``), from where they are loaded back instead of compacted again when their prefix
returns.
"""

from __future__ import annotations

import dataclasses
import json
import time
from array import array
from collections import OrderedDict, deque

from ..core import get_method
from ..core.plan import source_fractions
from .chat import common_length
from .config import check_int, flag, from_environment
from .registration import CAPTURED_SOURCES, DEFAULT_AGREEMENT_BOUND, DEFAULT_FIDELITY_BOUND

POLICY_VARIABLE = "SGLANG_AM_AUTO"
MAX_TRACKED_GROUPS = 1024  # prefixes watched at once; the least recently seen is forgotten first
# With ratio "auto", an automatic document climbs the fidelity ladder only this far, and is refused when even
# this rung misses the bound: a larger rung saves under 5x, solves slowest, and the exact prefix is a cache hit away.
AUTO_LADDER_TOP = 0.2
GUARD_REFUSALS_BEFORE_PAUSE = 3  # automatic prefixes in a row the fidelity guard refused, before a pause
LIVE_SOURCE = "live"  # the query source of automatic documents that learn from the requests reusing them


@dataclasses.dataclass(frozen=True)
class AutoPolicy:
    min_tokens: int = flag(256, metavar="N", help="tokens of the shortest prefix worth compacting")
    min_requests: int = flag(4, metavar="N", help="reuses of a prefix within the window that make it a candidate")
    window_seconds: float = flag(300.0, metavar="SECONDS", help="seconds over which a prefix's reuses are counted")
    ratio: float | str = flag("auto", metavar="RATIO", help="compacted slots per token of the prefix, in (0, 1), or "
                                                            "auto: the smallest the fidelity guard accepts")
    fidelity_bound: float = flag(DEFAULT_FIDELITY_BOUND, metavar="ERROR", help="the guard's bound on the held-out "
                                 "relative attention error, with ratio auto")
    agreement_bound: float = flag(DEFAULT_AGREEMENT_BOUND, metavar="FRACTION", help="with query source live and ratio "
                                  "auto: the share of held-out greedy requests' answer tokens a learned node must "
                                  "reproduce")
    budget: float | int = flag(0.5, metavar="FRACTION|N", help="KV slots automatic documents may hold: a fraction "
                                                               "of the pool, or a slot count")
    keep_first: int = flag(4, metavar="N", help="attention-sink tokens kept verbatim at the start of a prefix")
    keep_last: int = flag(16, metavar="N", help="tokens at a prefix's end left to the requests' own suffix "
                                                "(template tokens)")
    method: str = flag("AM-HighestAttnKeys", metavar="METHOD", help="the compaction method's name (AM-OMP, "
                                                                    "AM-OMP-fast, ...)")
    query_source: str = flag(LIVE_SOURCE, metavar="SOURCE", help="where reference queries come from: live (the "
                             "requests that reuse the prefix, certified on held-out ones; no extra prefill), or a "
                             "capture: repeat-prefill, context-prefill, self-study or a mixture")
    observe_requests: int = flag(8, metavar="N", help="distinct requests a live prefix observes before its first "
                                                      "solve; half of them are held out to certify it")
    audit_requests: int = flag(32, metavar="N", help="greedy requests an installed learned node serves between two "
                               "checks of its latest answers against the full prefix's, sooner after 4 questions it "
                               "never saw (0: never)")
    save_evicted: bool = flag(True, metavar="BOOL", help="evicted automatic documents go to the store, and come "
                                                         "back from it on reuse")
    poll_seconds: float = flag(0.5, metavar="SECONDS", help="seconds between the HTTP process's polls for "
                                                            "candidates")
    adapt: bool = flag(False, metavar="BOOL", help="captured automatic documents refit from the requests they serve "
                                                   "(live ones always do)")

    def __post_init__(self):
        # keep_last >= 1: a request must go on after the document
        for name, low in (("min_tokens", 2), ("min_requests", 1), ("keep_first", 0), ("observe_requests", 2),
                          ("keep_last", 1), ("audit_requests", 0)):
            check_int(name, getattr(self, name), low)
        for name in ("window_seconds", "poll_seconds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if self.ratio != "auto" and (
            isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 < self.ratio < 1
        ):
            raise ValueError(f'ratio must be in (0, 1) or "auto", got {self.ratio!r}')
        bound = self.fidelity_bound
        if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not 0 < bound <= 10:
            raise ValueError(f"fidelity_bound must be in (0, 10], got {bound!r}")
        agreement = self.agreement_bound
        if isinstance(agreement, bool) or not isinstance(agreement, (int, float)) or not 0 < agreement <= 1:
            raise ValueError(f"agreement_bound must be in (0, 1], got {agreement!r}")
        budget = self.budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0 or (
            isinstance(budget, float) and budget > 1
        ):
            raise ValueError(f"budget must be a fraction of the KV pool in (0, 1] or an int number of slots, got {budget!r}")
        if self.keep_first + self.keep_last >= self.min_tokens:
            raise ValueError(f"keep_first + keep_last ({self.keep_first} + {self.keep_last}) must be below "
                             f"min_tokens ({self.min_tokens})")
        get_method(self.method)  # ValueError naming the known methods
        if self.query_source != LIVE_SOURCE and not set(source_fractions(self.query_source)) <= set(CAPTURED_SOURCES):
            raise ValueError(f"query_source must be {LIVE_SOURCE!r} or use {CAPTURED_SOURCES}, got {self.query_source!r}")
        for name in ("save_evicted", "adapt"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")

    def budget_slots(self, pool_size: int) -> int:
        return self.budget if isinstance(self.budget, int) else max(1, int(self.budget * pool_size))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    def describe(self) -> dict:
        return dataclasses.asdict(self)


def policy_from_environment() -> AutoPolicy | None:
    """The policy in ``SGLANG_AM_AUTO`` (JSON of ``AutoPolicy`` fields, ``{}`` for the defaults), or None."""
    return from_environment(AutoPolicy, POLICY_VARIABLE)


def eviction_order(ready: list, budget: int, width: int) -> list | None:
    """The automatic documents to drop, least recently used first, so that ``width`` more slots fit the
    automatic ``budget``; documents that requests use are skipped. None if even that is not enough."""
    autos = sorted((doc for doc in ready if doc.auto), key=lambda doc: doc.last_used)
    used = sum(doc.num_slots for doc in autos)
    victims = []
    for doc in autos:
        if used + width <= budget:
            break
        if doc.users == 0:
            victims.append(doc)
            used -= doc.num_slots
    return victims if used + width <= budget else None


@dataclasses.dataclass
class _Group:
    prefix: array  # longest common prefix of the grouped prompts
    seen: OrderedDict  # rid -> time of its first qualifying match


class ReuseTracker:
    """Counts requests reusing a cached prefix and proposes the prefixes to compact (scheduler side)."""

    def __init__(self, policy: AutoPolicy):
        self.policy = policy
        self.groups: OrderedDict[bytes, _Group] = OrderedDict()
        # Groups that triggered stay quiet until their document is installed (``release``), or for a
        # window if it never is (a refused registration is not retried at once).
        self.cooldown: dict[bytes, float] = {}
        self.candidates: deque[list[int]] = deque()

    def observe(self, token_ids, rid: str, now: float | None = None) -> None:
        policy = self.policy
        # Cache hit or not: a prefix that the pool evicts and prefills again is the reuse that compaction saves.
        if len(token_ids) < policy.min_tokens + policy.keep_last:
            return
        now = time.monotonic() if now is None else now
        key = self._group_key(token_ids)
        if now < self.cooldown.get(key, 0.0):
            return
        group = self.groups.pop(key, None)
        if group is None or (group.seen and now - next(reversed(group.seen.values())) > policy.window_seconds):
            group = _Group(array("q", token_ids), OrderedDict())
        self.groups[key] = group  # most recently seen last
        if rid in group.seen:
            return
        group.seen[rid] = now
        group.prefix = group.prefix[: common_length(group.prefix, token_ids)]
        while now - next(iter(group.seen.values())) > policy.window_seconds:
            group.seen.popitem(last=False)
        if len(group.seen) >= policy.min_requests:
            del self.groups[key]
            self.cooldown[key] = now + policy.window_seconds
            self.candidates.append(list(group.prefix[: len(group.prefix) - policy.keep_last]))
        while len(self.groups) > MAX_TRACKED_GROUPS:
            self.groups.popitem(last=False)
        self.cooldown = {k: until for k, until in self.cooldown.items() if until > now}

    def hold_off(self, token_ids, now: float | None = None) -> None:
        """The document starting with ``token_ids`` was given up: its prefix stays quiet for a window."""
        now = time.monotonic() if now is None else now
        self.cooldown[self._group_key(token_ids)] = now + self.policy.window_seconds

    def release(self, token_ids) -> None:
        """A document starting with ``token_ids`` is installed: once it is dropped, reuse counts again."""
        start = self._group_key(token_ids)
        self.cooldown = {k: until for k, until in self.cooldown.items() if not k.startswith(start)}

    def _group_key(self, token_ids) -> bytes:
        """Prompts sharing their first ``min_tokens`` ids are one group."""
        return array("q", token_ids[: self.policy.min_tokens]).tobytes()

    def take_candidates(self) -> list[list[int]]:
        taken = list(self.candidates)
        self.candidates.clear()
        return taken
