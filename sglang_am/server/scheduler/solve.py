"""The solve step: a document's KV and its captured queries become a ``CompactedPrefix``, with its fidelity.

It runs on the solver thread (``jobs``) while the scheduler keeps serving, so it only reads: the
document's KV stays locked in the tree (``cache.SourceHold``) until the scheduler has the result, and the
captured queries belong to the registration. The per-layer work is the core's ``LayerPlan``, the same
loop the transformers adapter runs; the result is the artifact that save, load and install all use.

The fidelity guard's attention half, in the prefix's ``config["fidelity"]``: each compacted layer's
relative attention-output error on queries held out of a fit, by source (``heldout``); with questions,
also the error at the positions that predict their answers (``answers``). A seeded tenth of each
query-agnostic source's positions is held out and stays out of the node's fit. Questions are served
positions, so the node is fitted to all of them; the held-out questions (``SolvePlan.heldout_questions``,
whole questions with their answers) and a seeded tenth of a refit's live positions are judged under a
second fit without them. With held-out questions that second fit is a whole prefix of its own
(``Solved.candidate``): the server installs it as a candidate and asks it the held-out questions, to see
what users would see of questions the node was not fitted to (``certify``).
The attention figure is the answers' error when there are questions, else the held-out error (of the live
queries, for a refit). With a
ladder of ratios (``"ratio": "auto"``) the solve walks it from the smallest and keeps the first whose
figure meets the bound: several budgets from one capture. Where the bound is ``required`` (automatic
documents), the top rung is solved first, and a document that not even it brings within the bound is refused
(422) after that one solve: the radix cache keeps serving its exact prefix.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from http import HTTPStatus

import torch

from ...core.evaluate import evaluate
from ...core.plan import LayerPlan, assemble_layer, heldout_positions, pad_layers, pool_queries, split_heldout
from ...prefix import CompactedPrefix
from .. import faults
from ..errors import DocumentError
from .layout import node_floor, window_slots

HELDOUT_FRACTION = 0.1
HELDOUT_MAX_QUERIES = 1000  # pooled held-out queries per KV head and source (the paper keeps 1,000)
# A registration's questions held out of its candidate, to see how the node serves questions it was not fitted to:
# half, so that their figure is an average over several questions (on SmolLM2, one held-out question's agreement
# was 0 or 1 where the questions not given averaged 0.3 to 0.7: docs/question-aware.md).
HELDOUT_QUESTION_FRACTION = 0.5


class NonFiniteInput(Exception):
    """A solve's input holds NaN or Inf: an internal fault (the model, or KV read that the solve does not hold)."""


def heldout_questions(count: int) -> frozenset[int]:
    """A seeded half of ``count`` questions (at least one), none below two: one must stay in the fit."""
    if count < 2:
        return frozenset()
    take = max(1, round(HELDOUT_QUESTION_FRACTION * count))
    return frozenset(torch.randperm(count, generator=torch.Generator().manual_seed(0))[:take].tolist())


def check_finite(layer: int, what: str, tensor: torch.Tensor) -> None:
    """``NonFiniteInput`` naming the layer, the input and the positions (dimension 1 of ``[H, n, ...]``) that
    hold NaN or Inf."""
    bad = ~torch.isfinite(tensor)
    if bool(bad.any()):
        positions = bad.flatten(2).any(dim=2).any(dim=0).nonzero().flatten().tolist()
        raise NonFiniteInput(f"layer {layer}: {what} hold {int(bad.sum())} NaN or Inf entries, at positions "
                             f"{positions[:16]}{' ...' if len(positions) > 16 else ''} of {tensor.shape[1]}")


@dataclasses.dataclass(frozen=True)
class SolveInputs:
    """What a solve reads, layer by layer: the document's KV and the reference queries."""

    kv: Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # layer -> keys, values [H_kv, T, D]
    queries: Callable[[int], dict[str, torch.Tensor]]  # layer -> {source: [H_q, n, D]}
    scales: Mapping[int, float]  # each compacted layer's softmax scale, as the model runs it
    num_layers: int
    num_kv_heads: int
    # {source: bool [n]}: the rows that predict a question's answer (never held out one by one)
    answers: Mapping[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    # {"questions": int64 [n]}: the question each row belongs to; -1 for a live request's row (a refit's)
    parts: Mapping[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    kv_origin: str = "the document's KV read from the pool"  # named when it holds NaN or Inf


@dataclasses.dataclass(frozen=True)
class Solved:
    """A solver or store job's result: the prefix to install and, for an adapting document, its refit inputs;
    with held-out questions, the ``candidate`` fitted without them."""

    prefix: CompactedPrefix
    adaptation: object = None  # adapt.Adaptation
    candidate: CompactedPrefix | None = None


@dataclasses.dataclass(frozen=True)
class SolvePlan:
    """How a document is solved: the per-layer plan, and for ``"ratio": "auto"`` the ladder and the bound
    (``required``: refuse the document rather than install a rung above it)."""

    layers: LayerPlan
    ladder: Sequence[float] | None = None
    bound: float | None = None
    required: bool = False
    heldout_questions: frozenset[int] = frozenset()  # questions judged under a fit without them (``Solved.candidate``)


def pool_kv(pool, source: torch.Tensor) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """Layer -> the keys and values ``[H_kv, T, D]`` in pool ``source`` slots (locked by the caller)."""
    def kv(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        # In the pool's dtype: the solver computes in float32, and its GPU path runs FlashInfer in this dtype.
        keys, values = pool.k_buffer[layer][source].permute(1, 0, 2), pool.v_buffer[layer][source].permute(1, 0, 2)
        if faults.enabled("nonfinite_kv"):
            values = values.clone()
            values[:, 0] = float("nan")
        return keys, values

    return kv


def pool_inputs(pool, source: torch.Tensor, capture) -> SolveInputs:
    """A registration's inputs: its KV in pool ``source`` slots and its capture."""
    return SolveInputs(pool_kv(pool, source), capture.queries, capture.scales, pool.layer_num, pool.head_num,
                       capture.answer_positions(), capture.parts_of_rows())


def solve_document(inputs: SolveInputs, plan: SolvePlan, token_ids: list[int], windows: tuple[int | None, ...],
                   fingerprint: dict, config: dict) -> CompactedPrefix:
    """The prefix alone (``solve``)."""
    return solve(inputs, plan, token_ids, windows, fingerprint, config)[0]


def solve(inputs: SolveInputs, plan: SolvePlan, token_ids: list[int], windows: tuple[int | None, ...],
          fingerprint: dict, config: dict) -> tuple[CompactedPrefix, CompactedPrefix | None]:
    """Compact every global layer of the document; a sliding-window layer (``windows``) keeps its window of
    the document, verbatim or compacted (``compact_windows``), as the transformers adapter does. With a
    ladder, the smallest ratio on it whose held-out error is at most the bound, else its largest. With
    held-out questions, also the candidate fitted without them (else None)."""
    started = time.perf_counter()
    clock = {"selection": 0.0, "beta": 0.0, "values": 0.0}
    solutions = {}  # budget -> (layers, fidelity, the second fit's layers)
    walked = {}  # the rungs asked, in order: ratio -> its budget
    floor = node_floor(windows, len(token_ids), plan.layers.compact_windows)

    def meets(ratio: float, give_up: bool = False) -> bool:
        """Solve at ``ratio`` (once per budget it gives); whether it meets the bound (a fixed ratio always
        does). With ``give_up``, ``_OverBound`` as soon as it cannot."""
        budget = walked.setdefault(ratio, node_budget(ratio, floor, len(token_ids), plan.layers))
        if budget not in solutions:
            solutions[budget] = _solve(inputs, dataclasses.replace(plan.layers, budget=budget), len(token_ids),
                                       windows, clock, plan.heldout_questions,
                                       give_up_above=plan.bound if give_up else None)
        figure = solutions[budget][1]["relative_l2"]
        if give_up and (figure is None or figure > plan.bound):
            raise _OverBound(figure)
        return plan.ladder is None or (figure is not None and figure <= plan.bound)

    rungs = plan.ladder or [plan.layers.budget]
    if plan.required:
        try:
            meets(rungs[-1], give_up=True)
        except _OverBound as over:
            raise DocumentError(HTTPStatus.UNPROCESSABLE_ENTITY, f"no ratio up to {rungs[-1]} brings the held-out "
                                f"attention error within the fidelity bound {plan.bound} (at {rungs[-1]}: "
                                f"{over.figure}); the prefix stays uncompacted") from None
    chosen = next((ratio for ratio in rungs if meets(ratio)), rungs[-1])
    solved, fidelity, second = solutions[walked[chosen]]
    if plan.ladder is not None:
        tried = [{"ratio": ratio, "relative_l2": solutions[budget][1]["relative_l2"]} for ratio, budget in walked.items()]
        fidelity = {**fidelity, "ladder": tried, "bound": plan.bound, "ratio": chosen}
    timings = {f"{stage}_seconds": round(seconds, 4) for stage, seconds in clock.items()}
    timings["solve_seconds"] = round(time.perf_counter() - started, 4)

    def prefix(layers, prefix_config: dict) -> CompactedPrefix:
        keys, values, betas = pad_layers(*layers, fixed=[w is not None for w in windows])
        return CompactedPrefix(keys=keys, values=values, beta=betas, logical_length=len(token_ids),
                               token_ids=list(token_ids), fingerprint=fingerprint, method=plan.layers.method,
                               config=prefix_config, timings=timings)

    candidate = None
    if plan.heldout_questions:
        candidate = prefix(second, {**config, "candidate": sorted(plan.heldout_questions)})
    return prefix(solved, {**config, "fidelity": fidelity}), candidate


def node_budget(ratio: int | float, floor: int, length: int, plan: LayerPlan) -> int | float:
    """The compacted span's budget at ``ratio``: at least the node's ``floor`` (``layout.node_floor``) less the
    kept tokens. A node is as wide on every layer as its widest verbatim window (Gemma-3: 511 slots), so
    compacted layers narrower than that would leave slots that cost memory unused. Per-head budgets keep
    ``ratio``: their widest head would outgrow the floor."""
    span = length - plan.keep_first
    spare = min(floor - plan.keep_first, span)
    if plan.head_proportions is not None or spare <= 0:
        return ratio
    if isinstance(ratio, int):
        return max(ratio, spare)
    return max(ratio, spare / span)


class _OverBound(Exception):
    def __init__(self, figure: float | None):
        super().__init__(figure)
        self.figure = figure if figure is None else round(figure, 5)  # the guard's figure, or a lower bound of it


def _solve(inputs: SolveInputs, plan: LayerPlan, length: int, windows: tuple[int | None, ...], clock: dict,
           heldout_questions: frozenset[int] = frozenset(), give_up_above: float | None = None):
    """Every layer at ``plan``'s budget: ``(keys, values, betas)``, the held-out fidelity and the layers of the
    second fit, without the held-out questions. With ``give_up_above``, ``_OverBound`` as soon as the layers
    solved so far put the figure above it."""
    layers, second, errors = ([], [], []), ([], [], []), {}
    compacted = sum(window_slots(window, length) is None or plan.compact_windows for window in windows)
    for layer in range(inputs.num_layers):
        faults.inject("solve")
        faults.inject("solver_exit")
        span = _Span(inputs, plan, layer, window_slots(windows[layer], length), length, clock)
        if not span.compacted:
            (layer_k, layer_v, layer_b), _ = span.fit(None)
            second_kvb = (layer_k, layer_v, layer_b)
        else:
            # The same split and subsample on every layer and every rung of the ladder.
            captured = inputs.queries(layer)
            for source, rows in captured.items():
                check_finite(layer, f"the captured {source} queries", rows)
            group = max(1, next(iter(captured.values())).shape[0] // inputs.num_kv_heads)
            generator = torch.Generator().manual_seed(0)
            agnostic = {source: rows for source, rows in captured.items() if source != "questions"}
            held_in, heldout = split_heldout(agnostic, HELDOUT_FRACTION, math.ceil(HELDOUT_MAX_QUERIES / group), generator)
            if "questions" in captured:
                # A question's positions are served positions: one left out of the node's fit computes its KV wrong
                # for every request that asks it, and the answer after it follows (3 questions of a Gemma document:
                # held-out error 1.0, next-token KL 0.9). The node is fitted to all of them; the held-out ones are
                # judged under a second fit without them.
                asked = captured["questions"]
                judged_out = _heldout_question_rows(inputs, asked.shape[1], heldout_questions, group, generator)
                held_in["questions"] = asked[:, ~judged_out.to(asked.device)]
                if judged_out.any():
                    heldout["questions"] = asked[:, judged_out.to(asked.device)]
            served = {**held_in, "questions": captured["questions"]} if "questions" in captured else held_in
            (layer_k, layer_v, layer_b), slots = span.fit(served)
            second_kvb, second_slots = (layer_k, layer_v, layer_b), slots
            if "questions" in heldout:
                second_kvb, second_slots = span.fit(held_in)
            judged = {name: (rows, second_slots if name == "questions" else slots) for name, rows in heldout.items()}
            if "questions" in inputs.answers:
                asked = captured["questions"]
                judged["answers"] = asked[:, inputs.answers["questions"].to(asked.device)], slots
            figures = {name: _relative_l2(span.kv, judged_slots, rows, inputs.num_kv_heads, inputs.scales.get(layer))
                       for name, (rows, judged_slots) in judged.items()}
            answers = figures.pop("answers", None)
            errors[layer] = {"heldout": figures, **({"answers": answers} if answers is not None else {})}
            if give_up_above is not None:
                # The figure averages the compacted layers' figures, none negative: these alone already exceed it.
                floor = sum(filter(None, map(_layer_figure, errors.values()))) / compacted
                if floor > give_up_above:
                    raise _OverBound(floor)
        for part, kept in zip(layers, (layer_k, layer_v, layer_b)):
            part.append(kept)
        for part, kept in zip(second, second_kvb):
            part.append(kept)
    as_float = lambda kvb: (kvb[0], kvb[1], [beta.float() for beta in kvb[2]])
    return as_float(layers), _fidelity(errors), as_float(second)


def _heldout_question_rows(inputs: SolveInputs, count: int, heldout_questions: frozenset[int], group: int,
                           generator: torch.Generator) -> torch.Tensor:
    """Bool ``[count]``: the question rows judged under a fit without them: every row of a held-out question,
    and a seeded tenth of a refit's live rows."""
    parts = inputs.parts.get("questions")
    if parts is None:
        parts = torch.full((count,), -1, dtype=torch.long)
    held = heldout_positions(parts == -1, HELDOUT_FRACTION, math.ceil(HELDOUT_MAX_QUERIES / group), generator)
    return held | torch.isin(parts, torch.tensor(sorted(heldout_questions), dtype=torch.long))


class _Span:
    """One layer's compacted span: its document KV (a window layer's window) and fits of it to queries."""

    def __init__(self, inputs: SolveInputs, plan: LayerPlan, layer: int, window: int | None, length: int, clock: dict):
        self.inputs, self.plan, self.layer, self.window, self.length, self.clock = inputs, plan, layer, window, length, clock
        self.keys, self.values = inputs.kv(layer)
        for part, tensor in (("keys", self.keys), ("values", self.values)):
            check_finite(layer, f"{inputs.kv_origin} ({part})", tensor)
        self.compacted = window is None or plan.compact_windows
        kept = plan.keep_first
        # The pool's whole document, or a host copy's window.
        self.kv = ((self.keys[:, -window:], self.values[:, -window:]) if window is not None
                   else (self.keys[:, kept:], self.values[:, kept:]))

    def fit(self, sources: dict[str, torch.Tensor] | None):
        """The layer's (keys, values, β), and the span's slots, fitted to ``sources`` (None: a verbatim window)."""
        plan, inputs, layer, kept = self.plan, self.inputs, self.layer, self.plan.keep_first
        queries = None if sources is None else plan.reference_queries(sources, inputs.num_kv_heads,
                                                                      torch.Generator().manual_seed(0))
        scale = inputs.scales.get(layer)
        if self.window is not None:
            layer_kvb = plan.compact_window(*self.kv, queries, self.length - kept, layer, inputs.num_layers, scale)
            return layer_kvb, layer_kvb
        result = plan.compact_span(*self.kv, queries, self.length - kept, range(self.length - kept), layer,
                                   inputs.num_layers, scale)
        for stage, seconds in result.timings.items():
            self.clock[stage] += seconds
        empty = self.keys[:, :0], self.values[:, :0]
        layer_kvb = assemble_layer((self.keys[:, :kept], self.values[:, :kept]), [result], empty)
        return layer_kvb, (result.keys, result.values, result.beta)


def _relative_l2(span_kv, slots, rows: torch.Tensor, num_kv_heads: int, scale: float | None) -> float:
    """Relative attention-output error of held-out ``rows`` ``[H_q, n, D]``, averaged over KV heads."""
    queries = pool_queries(rows, num_kv_heads).to(span_kv[0])
    error = evaluate(*span_kv, tuple(t.to(span_kv[0]) for t in slots), queries, scale=scale)
    return round(float(error.relative_l2.mean()), 5)


def _fidelity(errors: dict[int, dict]) -> dict:
    """The guard's figure, averaged over the compacted layers: the error at the questions' answer positions
    when the document has questions (the answers depend on those queries), else the held-out error of the
    questions (a refit's live queries), else of every held-out source."""
    figure = [_layer_figure(layer) for layer in errors.values()]
    known = [value for value in figure if value is not None]
    return {"relative_l2": round(sum(known) / len(known), 5) if known else None,
            "layers": {str(layer): figures for layer, figures in errors.items()}}


def _layer_figure(layer: dict) -> float | None:
    """One compacted layer's share of the guard's figure (``_fidelity``)."""
    heldout = layer["heldout"]
    if "answers" in layer or "questions" in heldout:
        return layer.get("answers", heldout.get("questions"))
    return sum(heldout.values()) / len(heldout) if heldout else None
