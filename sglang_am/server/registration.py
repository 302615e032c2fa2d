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
# With held-out questions, "ratio": "auto" bounds what users would see of questions the node was not fitted
# to instead: the held-out questions' greedy answers through a node fitted without them must agree with the
# full prefix's on at least this share of their tokens (docs/question-aware.md#the-fidelity-guard).
DEFAULT_AGREEMENT_BOUND = 0.8
# Options the server sets itself, per layer, from the model.
SERVER_SET_OPTIONS = ("scale", "layer", "num_layers")
# Tokens of each question's answer the capture generates with the full prefix and fits the node to
# (``answer_tokens``): the answer's later tokens are computed at decode positions that a fit to the prompt
# alone never sees (docs/question-aware.md#answers-in-the-fit).
DEFAULT_ANSWER_TOKENS = 32
MAX_ANSWER_TEMPERATURE = 2.0


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
    "nnls_start": Bound("str"),
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
    ``keep_first``) or ``"auto"`` (``RATIO_LADDER``, bounded by ``agreement_bound`` with two or more questions,
    else by ``fidelity_bound``); ``query_source`` holds the
    source fractions. ``questions`` are the prompts that
    will follow the document (token ids; text or chat messages until the service tokenizes or renders them),
    and ``answers`` what follows each of them, where a client gave it: the node is fitted to the queries of
    each question and of its answer (given, or generated with the full prefix, ``answer_tokens`` of them)
    (``core.plan.with_questions``).
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
    questions: tuple[Question, ...] = ()  # token ids once the service has tokenized or rendered them
    answers: tuple[Answer | None, ...] = ()  # per question: the answer a client gave (None: the capture generates one)
    answer_tokens: int = DEFAULT_ANSWER_TOKENS  # tokens of each generated answer the node is fitted to
    answer_temperature: float = 0.0  # 0: greedy answers
    fidelity_bound: float | None = None  # with budget "auto": the attention error's bound
    agreement_bound: float | None = None  # with budget "auto" and held-out questions: their least answer agreement
    adapt: bool = False  # refit from the queries of the requests it serves (``adapt``)
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content), rendered by the chat API (``chat``)
    learn: bool = False  # served in full until the requests it serves certify a node (``refits.Refits.observe``)

    @classmethod
    def from_client(cls, config: ServerConfig, text=None, input_ids=None, ratio=None, budget=None,
                    method: object = DEFAULT_METHOD, query_source: object = DEFAULT_QUERY_SOURCE, head_budgets=None,
                    max_queries_per_head: object = 5000, self_study_max_new_tokens: object = 64,
                    keep_first: object = 0, options=None, compact_windows: object = False, questions=None,
                    answer_tokens: object = DEFAULT_ANSWER_TOKENS, answer_temperature: object = 0.0,
                    fidelity_bound=None, agreement_bound=None, adapt: object = False, messages=None,
                    learn: object = False, **unknown) -> RegistrationRequest:
        """Validate a client's fields (``ValueError`` naming the bad or unknown one)."""
        if unknown:
            raise ValueError(f"unknown field(s) {sorted(unknown)}; a registration takes text, input_ids or messages, ratio or "
                             "budget, method, query_source, head_budgets, max_queries_per_head, "
                             "self_study_max_new_tokens, keep_first, options, compact_windows, questions, answer_tokens, "
                             "answer_temperature, fidelity_bound, agreement_bound, adapt, learn")
        if not isinstance(learn, bool):
            raise ValueError(f"learn must be true or false, got {learn!r}")
        if learn:  # the automatic policy (--am-auto-*) picks, fits and certifies the node from the traffic
            given = {"ratio": ratio, "budget": budget, "method": method != DEFAULT_METHOD,
                     "query_source": query_source != DEFAULT_QUERY_SOURCE, "head_budgets": head_budgets,
                     "max_queries_per_head": max_queries_per_head != 5000,
                     "self_study_max_new_tokens": self_study_max_new_tokens != 64, "keep_first": keep_first != 0,
                     "options": options, "compact_windows": compact_windows is not False,
                     "answer_tokens": answer_tokens != DEFAULT_ANSWER_TOKENS, "answer_temperature": answer_temperature != 0,
                     "fidelity_bound": fidelity_bound, "agreement_bound": agreement_bound, "adapt": adapt is not False}
            extra = sorted(name for name, value in given.items() if value is not None and value is not False)
            if extra:
                raise ValueError(f"learn takes the document and its questions only, not {extra}: the server's --am-auto-* "
                                 "flags choose how the node is fitted and certified")
            ratio = "auto"  # nominal: the learned node's rungs are the automatic policy's
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
        for name, bound in (("fidelity_bound", fidelity_bound), ("agreement_bound", agreement_bound)):
            if bound is not None and ratio != "auto":
                raise ValueError(f'{name} goes with "ratio": "auto" (it picks the ratio)')
        if ratio == "auto":
            # Two or more questions: the held-out ones' answers certify a rung; else the attention error does.
            by_answers = isinstance(questions, Sequence) and not isinstance(questions, str) and len(questions) >= 2
            unused, value = ("fidelity_bound", fidelity_bound) if by_answers else ("agreement_bound", agreement_bound)
            if value is not None:
                raise ValueError(f'{unused} does not apply: "auto" is bounded by agreement_bound (the held-out questions\' '
                                 "answers) with two or more questions, else by fidelity_bound (the attention error)")
            fidelity_bound = DEFAULT_FIDELITY_BOUND if fidelity_bound is None else fidelity_bound
            agreement_bound = DEFAULT_AGREEMENT_BOUND if agreement_bound is None else agreement_bound
            for name, bound, what, top in (("fidelity_bound", fidelity_bound, "a relative attention error", 10),
                                           ("agreement_bound", agreement_bound, "a share of answer tokens", 1)):
                if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not 0 < bound <= top:
                    raise ValueError(f"{name} must be {what} in (0, {top}], got {bound!r}")
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
        questions, answers = _checked_questions(config, questions)
        given_answer = next((index for index, answer in enumerate(answers) if answer is not None), None)
        if learn and given_answer is not None:
            raise ValueError(f"questions[{given_answer}].answer: a learned document is fitted to the answers the server "
                             "generates with the full prefix")
        if any(isinstance(question, tuple) and question and isinstance(question[0], tuple) for question in questions) and (
            messages is None
        ):
            raise ValueError("a question given as chat messages follows a document given as messages")
        check_int("answer_tokens", answer_tokens, 0, config.max_answer_tokens)
        if isinstance(answer_temperature, bool) or not isinstance(answer_temperature, (int, float)) or not (
            0 <= answer_temperature <= MAX_ANSWER_TEMPERATURE
        ):
            raise ValueError(f"answer_temperature must be in [0, {MAX_ANSWER_TEMPERATURE}], got {answer_temperature!r}")
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
                   max_queries_per_head, self_study_max_new_tokens, keep_first, options, compact_windows, questions, answers,
                   answer_tokens, float(answer_temperature), None if fidelity_bound is None else float(fidelity_bound),
                   None if agreement_bound is None else float(agreement_bound), adapt, messages, learn)

    @property
    def ladder(self) -> tuple[float, ...] | None:
        """The ratios an ``"auto"`` registration tries, smallest first (None for a fixed budget)."""
        return RATIO_LADDER if self.budget == "auto" else None

    @property
    def largest_ratio(self) -> int | float:
        """The budget admission reserves: the ladder's top for ``"auto"``."""
        return RATIO_LADDER[-1] if self.budget == "auto" else self.budget

    def with_question_ids(self, config: ServerConfig, encode, render_turn=None) -> RegistrationRequest:
        """Questions and answers as token ids, bounded: text tokenized with ``encode`` (no special tokens: it
        follows the document), except a text question after a document given as messages, which is the user
        turn that follows them, rendered as ``/v1/chat/completions`` renders it up to where the answer begins
        (``render_turn(messages)``: the ids after the document); so is a question given as messages."""
        def question_ids(question: Question) -> tuple[int, ...]:
            if isinstance(question, str):
                return tuple(encode(question) if self.messages is None else render_turn((("user", question),)))
            if question and isinstance(question[0], tuple):  # chat messages
                return tuple(render_turn(question))
            return question

        ids = tuple(question_ids(question) for question in self.questions)
        answers = tuple(answer if answer is None or isinstance(answer, tuple) else tuple(encode(answer))
                        for answer in self.answers)
        for index, (question, answer) in enumerate(zip(ids, answers)):
            if not 1 <= len(question) <= config.max_question_tokens:
                raise ValueError(f"questions[{index}] has {len(question)} tokens; this server takes 1 to "
                                 f"{config.max_question_tokens} (--am-max-question-tokens)")
            if answer is not None and not 1 <= len(answer) <= config.max_answer_tokens:
                raise ValueError(f"questions[{index}].answer has {len(answer)} tokens; this server takes 1 to "
                                 f"{config.max_answer_tokens} (--am-max-answer-tokens)")
        return dataclasses.replace(self, questions=ids, answers=answers)

    def answer_length(self, index: int) -> int:
        """How many answer tokens question ``index`` is fitted to: the given answer's, else ``answer_tokens``."""
        answer = self.answers[index]
        return self.answer_tokens if answer is None else len(answer)

    def to_payload(self) -> dict:
        """JSON-ready fields (the scheduler rebuilds the request with ``from_payload``); questions as token ids."""
        if not all(_is_ids(question) for question in self.questions) or not all(
            answer is None or _is_ids(answer) for answer in self.answers
        ):
            raise ValueError("questions and answers must be token ids (with_question_ids) before they reach the scheduler")
        return {**dataclasses.asdict(self), "input_ids": None if self.input_ids is None else list(self.input_ids),
                "questions": [list(question) for question in self.questions],
                "answers": [None if answer is None else list(answer) for answer in self.answers]}

    @classmethod
    def from_payload(cls, payload: Mapping) -> RegistrationRequest:
        return cls(**{**payload, "input_ids": None if payload["input_ids"] is None else tuple(payload["input_ids"]),
                      "questions": tuple(tuple(question) for question in payload["questions"]),
                      "answers": tuple(None if answer is None else tuple(answer) for answer in payload["answers"]),
                      "messages": None if payload["messages"] is None else tuple(map(tuple, payload["messages"]))})

    @property
    def head_proportions(self) -> dict[tuple[int, int], float] | None:
        return None if self.head_budgets is None else load_head_proportions(self.head_budgets)


Question = tuple[int, ...] | str | tuple[tuple[str, str], ...]  # token ids, text, or chat messages
Answer = tuple[int, ...] | str  # token ids or text


def _is_ids(value) -> bool:
    return isinstance(value, tuple) and all(isinstance(token, int) for token in value)


def _checked_questions(config: ServerConfig, questions) -> tuple[tuple[Question, ...], tuple[Answer | None, ...]]:
    """At most ``max_questions`` questions, each a non-empty string, a list of token ids, a list of chat messages
    or ``{"question": <one of those>, "answer": <a string or token ids>}``; the questions and, per question,
    its answer (None where not given)."""
    if questions is None:
        return (), ()
    if not isinstance(questions, Sequence) or isinstance(questions, str) or not 1 <= len(questions) <= config.max_questions:
        raise ValueError(f"questions must be a list of 1 to {config.max_questions} prompts (--am-max-questions), "
                         'each a string, a list of token ids, a list of chat messages or {"question": ..., "answer": ...}')
    checked, answers = [], []
    for index, entry in enumerate(questions):
        answer = None
        if isinstance(entry, Mapping):
            if set(entry) != {"question", "answer"}:
                raise ValueError(f'questions[{index}] as an object must have exactly "question" and "answer"')
            entry, answer = entry["question"], _checked_text_or_ids(f"questions[{index}].answer", entry["answer"],
                                                                    config.max_answer_tokens)
        if isinstance(entry, Sequence) and not isinstance(entry, str) and entry and all(isinstance(m, Mapping) for m in entry):
            checked.append(checked_messages(entry, config.max_question_tokens * TEXT_CHARACTERS_PER_TOKEN,
                                            f"questions[{index}]"))
        else:
            checked.append(_checked_text_or_ids(f"questions[{index}]", entry, config.max_question_tokens))
        answers.append(answer)
    return tuple(checked), tuple(answers)


def _checked_text_or_ids(name: str, value, max_tokens: int) -> tuple[int, ...] | str:
    """A non-empty string (at most ``max_tokens`` times ``TEXT_CHARACTERS_PER_TOKEN`` characters) or 1 to
    ``max_tokens`` token ids."""
    longest_text = max_tokens * TEXT_CHARACTERS_PER_TOKEN
    if isinstance(value, str):
        if not value or len(value) > longest_text:
            raise ValueError(f"{name} must be a non-empty string of at most {longest_text} characters")
        return value
    if not isinstance(value, Sequence) or not 1 <= len(value) <= max_tokens or not all(
        isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= MAX_TOKEN_ID for t in value
    ):
        raise ValueError(f"{name} must be a string or a list of 1 to {max_tokens} token ids in [0, {MAX_TOKEN_ID}]")
    return tuple(value)


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
