"""Refits from live traffic: a document registered with ``"adapt": true`` learns from the requests it serves.

Query-agnostic reference queries lose answers that need binding (docs/question-aware.md); the queries of
the questions actually asked keep them. An adapting document therefore keeps:

- ``LiveQueries``: a bounded reservoir of the query rows of the requests served from it (their prompt
  positions after the document and the decode steps of their answers' first ``answer_tokens``, as the
  registration fits answers, on every layer the solve compacts), a
  uniform sample of every such position seen (reservoir sampling, decided once per forward for the whole
  batch);
- its solve's inputs in host memory: the document's KV of the layers the solve reads, and the queries
  the registration captured, and the compacted layers of the version serving (``Adaptation.start``, on the
  solver thread, counted by admission).

When ``refit_every`` new positions have arrived and no refit runs, the solver thread first measures the
**live fidelity** of the version serving now: the relative attention-output error, against the full KV kept
for refits, of the positions that arrived since the last fit began (requests that version was never fitted
to), averaged over the compacted layers. Then it refits the document from those inputs, the live queries
joining its questions (``core.plan.with_questions``: they weigh ``QUESTION_SHARE``); the scheduler installs
the refit as a new version (``operations``). Running requests finish on the version they started with. The
fidelity guard reports the refit on held-out live queries; the next-token KL needs full-context logits, which
live traffic does not have, so refits report none.

Every other document the server compacts is **watched** (``--am-watch-documents``, on by default): it keeps the
same reservoir and the KV of its compacted layers (not what a refit reads), and its live fidelity is measured,
one watched document at a time within ``refits.WATCH_SHARE`` of the solver thread, but it is never refitted.
"""

from __future__ import annotations

import collections
import dataclasses
import random
import time
from collections.abc import Sequence

import torch

from ...core.evaluate import evaluate
from ...core.plan import pool_queries, with_questions
from ...prefix import CompactedPrefix
from .solve import SolveInputs, SolvePlan, heldout_questions


class LiveQueries:
    """Up to ``capacity`` query positions of live requests, each with its rows on ``layers`` and the request it
    came from (``parts``: an observed request's number; -1 where requests are not told apart, as in refits)."""

    def __init__(self, layers: Sequence[int], capacity: int, seed: int = 0):
        self.layers, self.capacity = tuple(layers), capacity
        self.rows: dict[int, torch.Tensor] = {}  # layer -> [capacity, H_q, D], allocated on the first record
        self.scales: dict[int, float] = {}  # each layer's softmax scale, as the model runs it
        self.valid = torch.zeros(capacity, dtype=torch.bool)  # every layer holds this slot's current position
        self.arrival = torch.zeros(capacity, dtype=torch.long)  # which position seen (1, 2, ...) each slot holds
        self.parts = torch.full((capacity,), -1, dtype=torch.long)
        self.seen = 0  # positions offered so far
        self.requests: set[int] = set()  # the observed requests a position was kept of (counted once planned)
        self._random = random.Random(seed)

    def plan(self, count: int, parts: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For ``count`` new positions (of observed requests ``parts``, one per position): (which of them to keep,
        the slots they go to), or None. Algorithm R: the kept positions are a uniform sample of all positions
        seen; a slot being rewritten is invalid until its last layer is written."""
        kept, slots = [], []
        for position in range(count):
            self.seen += 1
            slot = self.seen - 1 if self.seen <= self.capacity else self._random.randrange(self.seen)
            if slot < self.capacity:
                kept.append(position)
                slots.append(slot)
        if not kept:
            return None
        slots = torch.tensor(slots)
        self.valid[slots] = False
        kept = torch.tensor(kept)
        self.arrival[slots] = kept + self.seen - count + 1
        if parts is not None:
            kept_parts = torch.tensor(parts)[kept]
            self.parts[slots] = kept_parts
            self.requests.update(kept_parts.tolist())
        return kept, slots

    def record(self, layer: int, queries: torch.Tensor, slots: torch.Tensor, scale: float) -> None:
        """Called inside the forward pass with this forward's kept rows ``[n, H_q, D]`` of ``layer``."""
        if layer not in self.layers:
            return
        if layer not in self.rows:
            self.rows[layer] = queries.new_empty((self.capacity, *queries.shape[1:]))
        self.rows[layer][slots.to(queries.device)] = queries
        self.scales[layer] = scale
        if layer == self.layers[-1]:
            self.valid[slots] = True

    def snapshot(self, after: int = 0) -> dict[int, torch.Tensor]:
        """The valid rows of each layer ``[H_q, n, D]`` of the positions that arrived after the first ``after``,
        copied (the reservoir keeps changing)."""
        valid = self.valid & (self.arrival > after)
        return {layer: rows[valid.to(rows.device)].transpose(0, 1).clone() for layer, rows in self.rows.items()}

    def snapshot_parts(self) -> torch.Tensor:
        """The request of each row of ``snapshot()``, in its order."""
        return self.parts[self.valid].clone()

    @property
    def size(self) -> int:
        return int(self.valid.sum())


def host_layers(prefix: CompactedPrefix, layers: Sequence[int]) -> dict[int, tuple[torch.Tensor, ...]]:
    """``prefix``'s (keys, values, β) of ``layers``, in host memory."""
    return {layer: tuple(part[layer].cpu() for part in (prefix.keys, prefix.values, prefix.beta)) for layer in layers}


def nbytes(layers: int, capacity: int, query_heads: int, head_dim: int, itemsize: int) -> int:
    """What a reservoir holds at most."""
    return layers * capacity * query_heads * head_dim * itemsize


@dataclasses.dataclass(eq=False)
class Adaptation:
    """One adapting document's refit inputs (host memory), live queries and refit state."""

    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]  # per layer the solve reads (host)
    fitted: dict[int, dict[str, torch.Tensor]]  # per compacted layer, the registration's queries by source (host)
    answers: torch.Tensor | None  # among fitted["questions"], the rows that predict the questions' answers
    parts: torch.Tensor | None  # the question each of fitted["questions"] belongs to
    scales: dict[int, float]
    num_kv_heads: int
    plan: SolvePlan  # the registration's, with the live queries joining its questions
    live: LiveQueries
    refit_every: int
    nbytes: int
    answer_steps: int  # a live request's decode steps sampled: those of the answer tokens a registration fits
    serving: dict[int, tuple[torch.Tensor, ...]]  # per compacted layer, the serving version's (keys, values, β) (host)
    live_fidelity: dict | None = None  # the serving version's error on live positions it was not fitted to
    # "adapt": refit whenever due. "watch" (a document registered without adapt, or a learned one at a fixed ratio:
    # capacity chosen over fidelity) only measures. A learned document at ratio auto (``refits``): "guard" refits
    # only when its live figure is above ``bound`` and goes back to observing when a refit does not bring it back.
    mode: str = "adapt"
    bound: float | None = None
    over_bound: int = 0  # live measurements in a row above ``bound``
    refits: int = 0
    refit_failures: int = 0
    last_error: str | None = None  # why the last failed refit failed
    seen_at_fit: int = 0  # live positions seen when the running or last refit started
    job: object = None  # jobs.Job of the running refit
    audit: AnswerAudit | None = None  # a learned document's answers checked against the full prefix's

    @classmethod
    def start(cls, inputs: SolveInputs, plan: SolvePlan, layers: Sequence[int], windows: Sequence[int | None],
              length: int, capacity: int, refit_every: int, reserved_bytes: int, answer_steps: int,
              prefix: CompactedPrefix, mode: str = "adapt", bound: float | None = None) -> Adaptation:
        """On the solver thread, right after the registration's solve gave ``prefix``: copy what a refit reads to
        host memory (``mode`` "watch", which never refits: only the compacted layers' KV, which the live figure
        reads). ``layers``: the layers the solve compacts (a window layer's window is all of it the solve reads)."""
        refits = mode != "watch"
        kv = {}
        for layer in range(inputs.num_layers) if refits else layers:
            keys, values = inputs.kv(layer)
            if windows[layer] is not None:
                keys, values = keys[:, -min(windows[layer], length) :], values[:, -min(windows[layer], length) :]
            kv[layer] = keys.cpu().clone(), values.cpu().clone()
        refit = dataclasses.replace(plan.layers, query_fractions=with_questions(plan.layers.query_fractions))
        fitted = {layer: {source: rows.cpu().clone() for source, rows in inputs.queries(layer).items()
                          if source in refit.query_fractions} for layer in layers} if refits else {}
        answers, parts = inputs.answers.get("questions"), inputs.parts.get("questions")
        return cls(kv, fitted, None if answers is None else answers.cpu(), None if parts is None else parts.cpu(),
                   dict(inputs.scales), inputs.num_kv_heads,
                   dataclasses.replace(plan, layers=refit, heldout_questions=frozenset()), LiveQueries(layers, capacity),
                   refit_every, reserved_bytes, answer_steps, host_layers(prefix, layers), mode=mode, bound=bound)

    def due(self) -> bool:
        return self.job is None and self.live.size > 0 and self.live.seen - self.seen_at_fit >= self.refit_every

    def unfitted(self) -> dict[int, torch.Tensor]:
        """The live rows that arrived since the last fit began: no version serving now was fitted to them."""
        return self.live.snapshot(after=self.seen_at_fit)

    def measure_live(self, rows: dict[int, torch.Tensor]) -> None:
        """On the solver thread: the serving version's relative attention-output error on ``rows`` (from
        ``unfitted``) against the document's full KV, averaged over the compacted layers (``live_fidelity``)."""
        serving, figures = self.serving, []
        for layer, queries in rows.items():
            if queries.shape[1]:
                keys, values = self.kv[layer]
                error = evaluate(keys, values, serving[layer], pool_queries(queries.cpu().float(), self.num_kv_heads),
                                 scale=self.scales.get(layer))
                figures.append(float(error.relative_l2.mean()))
        if figures:
            self.live_fidelity = {"relative_l2": round(sum(figures) / len(figures), 5),
                                  "positions": next(iter(rows.values())).shape[1], "version": self.refits}
            over = self.bound is not None and self.live_fidelity["relative_l2"] > self.bound
            self.over_bound = self.over_bound + 1 if over else 0

    def needs_refit(self) -> bool:
        """After ``measure_live``: does this adapting or guarded document refit now (``mode``)?"""
        return self.mode == "adapt" or self.over_bound > 0

    def refit_inputs(self, device) -> SolveInputs:
        """The registration's inputs with a snapshot of the live queries joining its questions."""
        live = self.live.snapshot()
        self.seen_at_fit = self.live.seen

        def kv(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
            return tuple(tensor.to(device) for tensor in self.kv[layer])

        def queries(layer: int) -> dict[str, torch.Tensor]:
            sources = dict(self.fitted[layer])
            asked = [rows for rows in (sources.get("questions"), live[layer].cpu()) if rows is not None]
            sources["questions"] = torch.cat(asked, dim=1)
            return {source: rows.to(device) for source, rows in sources.items()}

        answers, parts = {}, {}
        if self.answers is not None:  # the registration's questions stay in the fit; live rows (-1) may be held out
            count = next(iter(live.values())).shape[1]
            answers["questions"] = torch.cat([self.answers, torch.zeros(count, dtype=torch.bool)])
            parts["questions"] = torch.cat([self.parts, torch.full((count,), -1, dtype=torch.long)])
        return SolveInputs(kv, queries, self.scales, len(self.kv), self.num_kv_heads, answers, parts,
                           "the document's KV kept in host memory for refits")

    def describe(self) -> dict:
        described = {"mode": self.mode, "queries_seen": self.live.seen, "reservoir": self.live.size,
                     "host_bytes": self.nbytes, "live_fidelity": self.live_fidelity}
        if self.audit is not None:
            described["answer_audit"] = self.audit.describe()
        if self.mode != "watch":  # refitting: solving, or solved and waiting for the scheduler to install it
            described.update(refits=self.refits, refit_failures=self.refit_failures, last_error=self.last_error,
                             queries_fitted=self.seen_at_fit, refitting=self.job is not None)
        return described

    def stop(self, why: str = "the document was dropped") -> None:
        """The document is dropped or reverted (``why``): cancel a running refit (its result is never installed)."""
        if self.job is not None and not self.job.done():
            self.job.cancel(why)


# Observed greedy requests whose answers are kept for certification, and the longest prompt kept (tokens).
ANSWERS_KEPT = 64
MAX_PROMPT_KEPT = 4096
AUDIT_SAMPLE = 8  # an installed learned node's latest greedy requests that an answer audit asks the full prefix again
# Requests asking prompts a learned document never saw that make its audit due: each of them is a request the node
# was not fitted to, so a few tell a drift (on Gemma's drift stream, 8 let the old node serve 20 requests of the new
# questions before its revert, at 0.83 agreement).
NEW_PROMPTS_BEFORE_AUDIT = 4
PROMPTS_REMEMBERED = 4096  # distinct prompts a learned document remembers, to tell a new question from a repeat


@dataclasses.dataclass(frozen=True)
class ServedAnswer:
    """What an observed greedy request was served with the full prefix: its prompt after the prefix and its answer."""

    prompt: list[int]
    answer: list[int]


class AnswerAudit:
    """What an installed learned node's live attention figure does not see: whether its recent greedy requests
    got the full prefix's answers. It keeps the last ``AUDIT_SAMPLE`` greedy requests the installed version served
    (prompt after the prefix, first ``answer_steps`` answer tokens); they are handed to the HTTP process
    (``refits.Refits.audits``), which asks the full prefix the same prompts greedily, and the agreement decides
    (``refits.Refits.audit_learned``). An audit is due every ``every`` such requests, or as soon as
    ``NEW_PROMPTS_BEFORE_AUDIT`` of them asked a prompt the document had never seen (``known``, seeded with the
    prompts it was learned from), and then asks the latest ``AUDIT_SAMPLE`` requests that did: new questions are
    what a node may not answer, so a drift is caught while it begins."""

    def __init__(self, every: int, answer_steps: int, known: PromptDigests | None = None):
        self.every, self.answer_steps = every, answer_steps
        self.recent: collections.deque[ServedAnswer] = collections.deque(maxlen=AUDIT_SAMPLE)
        self.recent_new: collections.deque[ServedAnswer] = collections.deque(maxlen=AUDIT_SAMPLE)  # new prompts'
        self.known = PromptDigests() if known is None else known
        self.since = 0  # greedy requests served since the last audit was handed out
        self.new_since = 0  # of them, those whose prompt the document had never seen
        self.out_for: int | None = None  # the version whose audit the HTTP process holds
        self.answer_by = 0.0  # when the HTTP process's answer is given up for (``time.monotonic``)
        self.last: dict | None = None  # the last audit's figures (or its error)

    def note(self, prompt: Sequence[int], answer: Sequence[int]) -> None:
        if answer and len(prompt) <= MAX_PROMPT_KEPT:
            served, new = ServedAnswer(list(prompt), list(answer[: self.answer_steps])), self.known.add(prompt)
            self.since += 1
            self.new_since += new
            self.recent.append(served)
            if new:
                self.recent_new.append(served)

    def due(self) -> bool:
        """An audit that was never answered holds back the next one only until its ``answer_by``."""
        waiting = self.out_for is not None and time.monotonic() <= self.answer_by
        return not waiting and (self.since >= self.every or self.new_since >= NEW_PROMPTS_BEFORE_AUDIT)

    def hand_out(self, version: int, answer_by: float) -> list[ServedAnswer]:
        sample = self.recent_new if self.new_since >= NEW_PROMPTS_BEFORE_AUDIT else self.recent
        self.out_for, self.answer_by, self.since, self.new_since = version, answer_by, 0, 0
        return list(sample)

    def restart(self) -> None:
        """A new version serves: the answers kept were another version's."""
        self.recent.clear()
        self.recent_new.clear()
        self.since = self.new_since = 0

    def describe(self) -> dict:
        return {"every": self.every, "since_last": self.since, "new_prompts_since_last": self.new_since,
                "auditing": self.out_for is not None, "last": self.last}


class PromptDigests:
    """The digests of the distinct prompts a learned document has seen, at most ``PROMPTS_REMEMBERED`` (then new
    prompts are still told apart from the ones remembered, but no longer remembered themselves)."""

    def __init__(self):
        self.digests: set[int] = set()

    def add(self, prompt: Sequence[int]) -> bool:
        """Remember ``prompt``: was it new?"""
        digest = hash(tuple(prompt))
        if digest in self.digests:
            return False
        if len(self.digests) < PROMPTS_REMEMBERED:
            self.digests.add(digest)
        return True


@dataclasses.dataclass
class LearnedCertification:
    """A learned document's candidate (fitted without the held-out requests) is installed, waiting for the HTTP
    process to ask it their questions (``handed_out``: it has them) until ``deadline`` (``time.monotonic``)."""

    heldout: list[ServedAnswer]
    deadline: float
    handed_out: bool = False


@dataclasses.dataclass(eq=False)
class Observation:
    """An automatic document learning its node from the requests that reuse its prefix, which are served in full
    meanwhile, as without the extension: their query rows after the prefix (prompt positions and their answers'
    first ``answer_steps`` decode steps, on every layer the solve compacts), tagged by request. Once
    ``requests_needed`` distinct requests are in the reservoir, ``refits`` solves the node from them and certifies
    it on a seeded half held out of a second fit: the guard's figure is how the node serves requests it was not
    fitted to. Greedy requests also leave what they were served (``note_answer``): the held-out ones' questions
    are then asked of a candidate fitted without them (``certifying``), and the node is installed only if its
    greedy answers agree with theirs. A refused solve waits for twice as many requests, ``tries`` times at most;
    after a refusal by the answers, the next solve starts from the rung above (``lowest_ratio``). After a revert the
    answers must agree more (``agreement_bound``, set by ``refits``)."""

    live: LiveQueries
    requests_needed: int
    answer_steps: int
    tagged: int = 0  # requests tagged so far
    tries: int = 0  # solves the guard refused
    last_error: str | None = None
    answers: dict[int, ServedAnswer] = dataclasses.field(default_factory=dict)  # request number -> its greedy answer
    prompts: PromptDigests = dataclasses.field(default_factory=PromptDigests)  # every greedy request's prompt
    heldout: frozenset[int] = frozenset()  # the requests held out of the last solve's second fit
    certifying: LearnedCertification | None = None  # a candidate being asked the held-out requests' questions
    lowest_ratio: float = 0.0  # the smallest rung the next solve may pick
    agreement_bound: float | None = None  # the held-out answers' bound where stricter than the policy's
    pin_tried_at: int = -1  # requests tagged when a client's learning document last looked for its prefix (``refits``)

    def tag(self) -> int:
        """A new request reusing the prefix: its number."""
        self.tagged += 1
        return self.tagged - 1

    def note_answer(self, part: int, input_ids: Sequence[int], start: int, answer: Sequence[int]) -> None:
        """A greedy observed request ended: its prompt after the prefix (``input_ids`` from ``start``) and the first
        ``answer_steps`` tokens it was served, for the first ``ANSWERS_KEPT`` such requests (the reservoir holds the
        early requests anyway); copied only when kept. Every prompt is remembered (``prompts``): an installed node's
        answer audit tells new questions by them."""
        self.prompts.add(input_ids[start:])
        if len(self.answers) < ANSWERS_KEPT and answer and len(input_ids) - start <= MAX_PROMPT_KEPT:
            self.answers[part] = ServedAnswer(list(input_ids[start:]), list(answer[: self.answer_steps]))

    def heldout_answers(self) -> list[ServedAnswer]:
        """The held-out requests' answers to certify a candidate with (none: the attention figure alone decides)."""
        return [self.answers[part] for part in sorted(self.heldout) if part in self.answers]

    def due(self) -> bool:
        return self.certifying is None and len(self.live.requests) >= self.requests_needed << self.tries

    def fit_inputs(self, kv, num_layers: int, num_kv_heads: int) -> tuple[SolveInputs, frozenset[int]]:
        """The solve's inputs (``kv``: layer -> the prefix's keys and values, copied from the pool) and the requests
        held out of the second fit: among those whose answers were kept, where two or more were (greedy traffic),
        so that the candidate is certified by their answers and not by its attention figure alone."""
        rows, parts = self.live.snapshot(), self.live.snapshot_parts()
        present = torch.unique(parts).tolist()
        answered = [part for part in present if part in self.answers]
        pool = answered if len(answered) >= 2 else present
        heldout = self.heldout = frozenset(pool[index] for index in heldout_questions(len(pool)))
        return SolveInputs(kv, lambda layer: {"questions": rows[layer]}, dict(self.live.scales), num_layers, num_kv_heads,
                           {}, {"questions": parts}, "the prefix's KV copied from the pool"), heldout

    def describe(self) -> dict:
        return {"requests_tagged": self.tagged, "requests_observed": len(self.live.requests),
                "requests_needed": self.requests_needed << self.tries, "reservoir": self.live.size, "tries": self.tries,
                "answers_kept": len(self.answers), "certifying": self.certifying is not None,
                "lowest_ratio": self.lowest_ratio or None, "agreement_bound": self.agreement_bound,
                "last_error": self.last_error}
