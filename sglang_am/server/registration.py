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
from ..core.plan import QUERY_MIXTURES, source_fractions, with_questions
from .chat import checked_messages
from .config import ServerConfig, check_int

DEFAULT_METHOD = "AM-HighestAttnKeys"
DEFAULT_QUERY_SOURCE = "repeat-prefill"
CAPTURED_SOURCES = ("context-prefill", "repeat-prefill", "self-study", "questions")
MIN_DOCUMENT_TOKENS = 16
MAX_TOKEN_ID = (1 << 31) - 1
TEXT_CHARACTERS_PER_TOKEN = 64  # text longer than this times the token bound is refused before tokenizing
MAX_HEAD_BUDGET_ENTRIES = 1 << 14
# "ratio": "auto": the smallest ratio on the ladder whose held-out attention error (``solve``'s fidelity
# guard) is at most the bound; the default bound is where Gemma-3-270M's real-text answers stayed within
# 5 points of full context (docs/question-aware.md).
RATIO_LADDER = (0.05, 0.1, 0.2, 0.3, 0.5)
DEFAULT_FIDELITY_BOUND = 0.1
# Options the server sets itself, per layer, from the model.
SERVER_SET_OPTIONS = ("scale", "layer", "num_layers")


def check_vocabulary(name: str, ids, vocab_size: int) -> None:
    """``ValueError`` naming ``name`` for a token id the model has no embedding for (SGLang's prefill would
    crash its scheduler on it)."""
    if ids and (min(ids) < 0 or max(ids) >= vocab_size):  # every prompt passes here: the scan stays in C
        out_of_range = next(token for token in ids if not 0 <= token < vocab_size)
        raise ValueError(f"{name} must be token ids in [0, {vocab_size}) for this model, got {out_of_range}")


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
    """One registration: the document (``text``, ``input_ids`` or chat ``messages``) and how to compact it.

    ``budget`` is a ratio (float in (0, 1]), a slot count (int) of the compacted span (the document minus
    ``keep_first``) or ``"auto"`` (``RATIO_LADDER`` and ``fidelity_bound``); ``query_source`` holds the
    source fractions. ``questions`` are the prompts that
    will follow the document (token ids, or text until the service tokenizes it): with them the
    query-agnostic source is mixed with their queries (``core.plan.with_questions``).
    """

    text: str | None
    input_ids: tuple[int, ...] | None
    budget: int | float | str
    method: str = DEFAULT_METHOD
    query_source: Mapping[str, float] = dataclasses.field(default_factory=lambda: {DEFAULT_QUERY_SOURCE: 1.0})
    head_budgets: Mapping[str, float] | None = None
    max_queries_per_head: int = 5000
    self_study_max_new_tokens: int = 64
    keep_first: int = 0
    options: Mapping[str, object] = dataclasses.field(default_factory=dict)
    compact_windows: bool = False  # sliding-window layers' windows compacted too (``LayerPlan.compact_window``)
    questions: tuple[tuple[int, ...] | str, ...] = ()
    fidelity_bound: float | None = None  # with budget "auto"
    adapt: bool = False  # refit from the queries of the requests it serves (``adapt``)
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content), rendered by the chat API (``chat``)

    @classmethod
    def from_client(cls, config: ServerConfig, text=None, input_ids=None, ratio=None, budget=None,
                    method: object = DEFAULT_METHOD, query_source: object = DEFAULT_QUERY_SOURCE, head_budgets=None,
                    max_queries_per_head: object = 5000, self_study_max_new_tokens: object = 64,
                    keep_first: object = 0, options=None, compact_windows: object = False, questions=None,
                    fidelity_bound=None, adapt: object = False, messages=None, **unknown) -> RegistrationRequest:
        """Validate a client's fields (``ValueError`` naming the bad or unknown one)."""
        if unknown:
            raise ValueError(f"unknown field(s) {sorted(unknown)}; a registration takes text, input_ids or messages, ratio or "
                             "budget, method, query_source, head_budgets, max_queries_per_head, "
                             "self_study_max_new_tokens, keep_first, options, compact_windows, questions, fidelity_bound, adapt")
        longest = config.max_document_tokens
        if sum(field is not None for field in (text, input_ids, messages)) != 1:
            raise ValueError("give exactly one of text, input_ids or messages (the document as it starts prompts, "
                             "or the chat messages that start conversations)")
        if messages is not None:
            messages = checked_messages(messages, longest * TEXT_CHARACTERS_PER_TOKEN)
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
        if ratio is not None and ratio != "auto" and (
            isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1
        ):
            raise ValueError(f'ratio must be in (0, 1] or "auto", got {ratio!r}')
        if fidelity_bound is not None and ratio != "auto":
            raise ValueError('fidelity_bound goes with "ratio": "auto" (it picks the ratio)')
        if ratio == "auto":
            fidelity_bound = DEFAULT_FIDELITY_BOUND if fidelity_bound is None else fidelity_bound
            if isinstance(fidelity_bound, bool) or not isinstance(fidelity_bound, (int, float)) or not 0 < fidelity_bound <= 10:
                raise ValueError(f"fidelity_bound must be a relative attention error in (0, 10], got {fidelity_bound!r}")
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
        questions = _checked_questions(config, questions)
        if questions:
            fractions = with_questions(fractions)
        elif "questions" in fractions:
            raise ValueError("query_source uses questions: give them in questions (the prompts that will follow the document)")
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
        if not isinstance(adapt, bool):
            raise ValueError(f"adapt must be true or false, got {adapt!r}")
        budget = budget if ratio is None else ratio if ratio == "auto" else float(ratio)
        return cls(text, input_ids, budget, method, fractions, None if head_budgets is None else dict(head_budgets),
                   max_queries_per_head, self_study_max_new_tokens, keep_first, options, compact_windows, questions,
                   None if fidelity_bound is None else float(fidelity_bound), adapt, messages)

    @property
    def ladder(self) -> tuple[float, ...] | None:
        """The ratios an ``"auto"`` registration tries, smallest first (None for a fixed budget)."""
        return RATIO_LADDER if self.budget == "auto" else None

    @property
    def largest_ratio(self) -> int | float:
        """The budget admission reserves: the ladder's top for ``"auto"``."""
        return RATIO_LADDER[-1] if self.budget == "auto" else self.budget

    def with_question_ids(self, config: ServerConfig, encode) -> RegistrationRequest:
        """Text questions tokenized with ``encode`` (no special tokens: they follow the document), bounded."""
        ids = tuple(question if isinstance(question, tuple) else tuple(encode(question)) for question in self.questions)
        for index, question in enumerate(ids):
            if not 1 <= len(question) <= config.max_question_tokens:
                raise ValueError(f"questions[{index}] has {len(question)} tokens; this server takes 1 to "
                                 f"{config.max_question_tokens} (--am-max-question-tokens)")
        return dataclasses.replace(self, questions=ids)

    def to_payload(self) -> dict:
        """JSON-ready fields (the scheduler rebuilds the request with ``from_payload``); questions as token ids."""
        if any(isinstance(question, str) for question in self.questions):
            raise ValueError("text questions must be tokenized (with_question_ids) before they reach the scheduler")
        return {**dataclasses.asdict(self), "input_ids": None if self.input_ids is None else list(self.input_ids),
                "questions": [list(question) for question in self.questions]}

    @classmethod
    def from_payload(cls, payload: Mapping) -> RegistrationRequest:
        return cls(**{**payload, "input_ids": None if payload["input_ids"] is None else tuple(payload["input_ids"]),
                      "questions": tuple(tuple(question) for question in payload["questions"]),
                      "messages": None if payload["messages"] is None else tuple(map(tuple, payload["messages"]))})

    @property
    def head_proportions(self) -> dict[tuple[int, int], float] | None:
        return None if self.head_budgets is None else load_head_proportions(self.head_budgets)


def _checked_questions(config: ServerConfig, questions) -> tuple[tuple[int, ...] | str, ...]:
    """Each question as a tuple of token ids or a non-empty string, at most ``max_questions`` of them."""
    if questions is None:
        return ()
    if not isinstance(questions, Sequence) or isinstance(questions, str) or not 1 <= len(questions) <= config.max_questions:
        raise ValueError(f"questions must be a list of 1 to {config.max_questions} prompts (--am-max-questions), "
                         "each a string or a list of token ids")
    longest_text = config.max_question_tokens * TEXT_CHARACTERS_PER_TOKEN
    checked = []
    for index, question in enumerate(questions):
        if isinstance(question, str):
            if not question or len(question) > longest_text:
                raise ValueError(f"questions[{index}] must be a non-empty string of at most {longest_text} characters")
            checked.append(question)
            continue
        if not isinstance(question, Sequence) or not 1 <= len(question) <= config.max_question_tokens or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= MAX_TOKEN_ID for t in question
        ):
            raise ValueError(f"questions[{index}] must be a string or a list of 1 to {config.max_question_tokens} "
                             f"token ids in [0, {MAX_TOKEN_ID}]")
        checked.append(tuple(question))
    return tuple(checked)


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
