"""A client's registration request, validated and bounded before it reaches the scheduler.

``RegistrationRequest.from_client`` turns the JSON body of ``POST /am/documents`` (or the keyword arguments
of ``EngineDocuments.register``) into a frozen record, refusing unknown fields, wrong types and anything
beyond the server's ``ServerConfig`` bounds with a ``ValueError`` that names the field. Solver options
are bounded field by field (``OPTION_BOUNDS``): a field without a bound is refused, so an option added to
a method later cannot reach the server unbounded.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from ..core import get_method
from ..core.head_budgets import load_head_proportions
from ..core.plan import QUERY_MIXTURES, source_fractions
from .config import ServerConfig, check_int

DEFAULT_METHOD = "AM-HighestAttnKeys"
DEFAULT_QUERY_SOURCE = "repeat-prefill"
CAPTURED_SOURCES = ("context-prefill", "repeat-prefill", "self-study")
MIN_DOCUMENT_TOKENS = 16
MAX_TOKEN_ID = (1 << 31) - 1
TEXT_CHARACTERS_PER_TOKEN = 64  # text longer than this times the token bound is refused before tokenizing
MAX_HEAD_BUDGET_ENTRIES = 1 << 14
# Options the server sets itself, per layer, from the model.
SERVER_SET_OPTIONS = ("scale", "layer", "num_layers")


@dataclasses.dataclass(frozen=True)
class Bound:
    """A solver option's allowed values: ``kind`` int/float/bool/str/schedule, a closed range, ``None`` allowed."""

    kind: str
    low: float = -math.inf
    high: float = math.inf
    optional: bool = False

    def check(self, name: str, value: object) -> None:
        if value is None and self.optional:
            return
        if self.kind == "bool":
            ok = isinstance(value, bool)
        elif self.kind == "str":
            ok = isinstance(value, str) and len(value) <= 64
        elif self.kind == "schedule":
            ok = _is_schedule(value)
        else:
            number = isinstance(value, int if self.kind == "int" else (int, float)) and not isinstance(value, bool)
            ok = number and math.isfinite(value) and self.low <= value <= self.high
        if not ok:
            bounds = f" in [{self.low:g}, {self.high:g}]" if self.kind in ("int", "float") else ""
            raise ValueError(f"options.{name} must be {'null or ' if self.optional else ''}a {self.kind}{bounds}, got {value!r}")


def _is_schedule(value: object) -> bool:
    """OMP's ``((up_to or None, k, tau), ...)``, at most 16 stages of bounded numbers."""
    if not isinstance(value, Sequence) or isinstance(value, str) or not 1 <= len(value) <= 16:
        return False
    small = lambda v, top: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= top
    return all(isinstance(stage, Sequence) and len(stage) == 3 and (stage[0] is None or small(stage[0], 1 << 20))
               and small(stage[1], 1024) and small(stage[2], 1024) for stage in value)


OPTION_BOUNDS = {
    "fit_beta": Bound("bool"),
    "fit_values": Bound("bool"),
    "beta_min": Bound("float", -50.0, 50.0),
    "beta_max": Bound("float", -50.0, 50.0),
    "nnls_iters": Bound("int", 0, 1000),
    "query_chunk": Bound("int", 1, 1 << 16, optional=True),
    "seed": Bound("int", 0, MAX_TOKEN_ID),
    "stats_backend": Bound("str"),
    "score_dtype": Bound("str"),
    "score": Bound("str"),
    "pooling": Bound("str", optional=True),
    "pool_kernel": Bound("int", 1, 255),
    "keys_per_step": Bound("int", 1, 1024),
    "refit_every": Bound("int", 1, 1024),
    "schedule": Bound("schedule", optional=True),
    "drop_below": Bound("float", -50.0, 50.0),
    "drop_rounds": Bound("int", 0, 10),
    "memory_bytes": Bound("int", 1 << 20, 1 << 32),
    "pyramid_beta": Bound("float", 1.0, 1e4),
}


@dataclasses.dataclass(frozen=True)
class RegistrationRequest:
    """One registration: the document (``text`` or ``input_ids``) and how to compact it.

    ``budget`` is a ratio (float in (0, 1]) or a slot count (int) of the compacted span (the document
    minus ``keep_first``); ``query_source`` holds the source fractions.
    """

    text: str | None
    input_ids: tuple[int, ...] | None
    budget: int | float
    method: str = DEFAULT_METHOD
    query_source: Mapping[str, float] = dataclasses.field(default_factory=lambda: {DEFAULT_QUERY_SOURCE: 1.0})
    head_budgets: Mapping[str, float] | None = None
    max_queries_per_head: int = 5000
    self_study_max_new_tokens: int = 64
    keep_first: int = 0
    options: Mapping[str, object] = dataclasses.field(default_factory=dict)
    compact_windows: bool = False  # sliding-window layers' windows compacted too (``LayerPlan.compact_window``)

    @classmethod
    def from_client(cls, config: ServerConfig, text=None, input_ids=None, ratio=None, budget=None,
                    method: object = DEFAULT_METHOD, query_source: object = DEFAULT_QUERY_SOURCE, head_budgets=None,
                    max_queries_per_head: object = 5000, self_study_max_new_tokens: object = 64,
                    keep_first: object = 0, options=None, compact_windows: object = False, **unknown) -> RegistrationRequest:
        """Validate a client's fields (``ValueError`` naming the bad or unknown one)."""
        if unknown:
            raise ValueError(f"unknown field(s) {sorted(unknown)}; a registration takes text or input_ids, ratio or "
                             "budget, method, query_source, head_budgets, max_queries_per_head, "
                             "self_study_max_new_tokens, keep_first, options, compact_windows")
        longest = config.max_document_tokens
        if (text is None) == (input_ids is None):
            raise ValueError("give exactly one of text or input_ids (the document as it starts prompts)")
        if text is not None and (not isinstance(text, str) or not text or len(text) > longest * TEXT_CHARACTERS_PER_TOKEN):
            raise ValueError(f"text must be a non-empty string of at most {longest * TEXT_CHARACTERS_PER_TOKEN} characters")
        if input_ids is not None:
            if not isinstance(input_ids, Sequence) or isinstance(input_ids, str) or not (
                MIN_DOCUMENT_TOKENS <= len(input_ids) <= longest
            ):
                raise ValueError(f"input_ids must be a list of {MIN_DOCUMENT_TOKENS} to {longest} token ids")
            if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= MAX_TOKEN_ID for t in input_ids):
                raise ValueError(f"input_ids must be token ids in [0, {MAX_TOKEN_ID}]")
            input_ids = tuple(input_ids)
        if (ratio is None) == (budget is None):
            raise ValueError("give exactly one of ratio (in (0, 1]) or budget (slots, at most the document length)")
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1):
            raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
        if budget is not None:
            check_int("budget", budget, 1, longest)
        if not isinstance(method, str):
            raise ValueError(f"method must be a string, got {method!r}")
        spec = get_method(method)
        if not isinstance(query_source, (str, Mapping)) or (isinstance(query_source, str) and len(query_source) > 64):
            raise ValueError(f"query_source must be a source name, a mixture {sorted(QUERY_MIXTURES)} or an object of fractions")
        fractions = source_fractions(query_source)
        if not set(fractions) <= set(CAPTURED_SOURCES):
            raise ValueError(f"query_source for the server must use {CAPTURED_SOURCES}, got {query_source!r}")
        check_int("max_queries_per_head", max_queries_per_head, 1, config.max_queries_per_head)
        check_int("self_study_max_new_tokens", self_study_max_new_tokens, 1, config.max_self_study_tokens)
        check_int("keep_first", keep_first, 0, longest)
        if head_budgets is not None:
            if not isinstance(head_budgets, Mapping) or not 1 <= len(head_budgets) <= MAX_HEAD_BUDGET_ENTRIES:
                raise ValueError('head_budgets must be the head-budget JSON object {"L{layer}H{head}": proportion}')
            load_head_proportions(head_budgets)
        options = _checked_options(spec, options)
        if not isinstance(compact_windows, bool):
            raise ValueError(f"compact_windows must be true or false, got {compact_windows!r}")
        return cls(text, input_ids, float(ratio) if ratio is not None else budget, method, fractions,
                   None if head_budgets is None else dict(head_budgets), max_queries_per_head,
                   self_study_max_new_tokens, keep_first, options, compact_windows)

    def to_payload(self) -> dict:
        """JSON-ready fields (the scheduler rebuilds the request with ``from_payload``)."""
        return {**dataclasses.asdict(self), "input_ids": None if self.input_ids is None else list(self.input_ids)}

    @classmethod
    def from_payload(cls, payload: Mapping) -> RegistrationRequest:
        return cls(**{**payload, "input_ids": None if payload["input_ids"] is None else tuple(payload["input_ids"])})

    @property
    def head_proportions(self) -> dict[tuple[int, int], float] | None:
        return None if self.head_budgets is None else load_head_proportions(self.head_budgets)


def _checked_options(spec, options) -> dict:
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ValueError("options must be an object of the method's option fields")
    for name, value in options.items():
        if name in SERVER_SET_OPTIONS:
            raise ValueError(f"options.{name} is set by the server from the model; leave it out")
        if name not in OPTION_BOUNDS:
            fields = sorted(f.name for f in dataclasses.fields(spec.options_class) if f.name not in SERVER_SET_OPTIONS)
            raise ValueError(f"unknown option {name!r} for method {spec.name!r}; valid: {fields}")
        OPTION_BOUNDS[name].check(name, value)
    placeholders = {"layer": 0, "num_layers": 1} if {"layer", "num_layers"} <= {
        f.name for f in dataclasses.fields(spec.options_class)} else {}
    spec.make_options(**options, **placeholders)  # the method's own checks (enums, beta_min < beta_max, ...)
    return dict(options)
