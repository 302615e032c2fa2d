"""AM-OMP and AM-OMP-fast: greedy orthogonal matching pursuit on the mass features (paper Algorithms 1, 2).

All heads advance in lockstep through one set of tensor ops; per-head state (how many keys each head
holds, its iteration count, which keys it has excluded) lives in tensors, so heads with different
budgets or drop rounds never need a Python loop. The selector returns keys and their mass weights.

Refits solve the same least-squares problem as ``torch.linalg.lstsq`` (then clamp, as the paper's NNLS
with no gradient steps), but from a QR factorisation that grows with the selection (``IncrementalQR``),
so the refits of exact OMP cost O(n t^2) in total instead of O(n t^3). Heads whose selected columns are
numerically dependent are refit with the rank-revealing ``lstsq`` instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..block import Block
from ..cancel import checkpoint
from ..least_squares import IncrementalQR, nnls_box, thin_matmul
from .base import CompactionOptions, Selection, register_method

# (up to this many selected keys, keys per step, refit every this many steps); None = no upper bound.
PROGRESSIVE_SCHEDULE: tuple[tuple[int | None, int, int], ...] = ((300, 1, 1), (1500, 2, 2), (None, 4, 2))


@dataclass
class OMPOptions(CompactionOptions):
    """keys_per_step, refit_every: k and tau of the greedy loop (1, 1 is exact OMP).
    schedule: optional ``((up_to, k, tau), ...)`` that overrides k and tau by how many keys a head holds,
        e.g. ``PROGRESSIVE_SCHEDULE``.
    drop_below, drop_rounds: after the loop, keys with ``beta < drop_below`` are dropped, excluded for good
        and their slots refilled, at most ``drop_rounds`` times.
    memory_bytes (shared with every method) also bounds the greedy loop: the mass features (n x T floats per
        head), the selected columns and their factorisation (2 x n x t). Heads are solved in groups that fit;
        when one head does not fit with every key, its candidates are the keys with the largest first-step
        correlation (``Phi^T m``) that do, which may change the selection.
    The NNLS box defaults to ``w in [1e-12, e^7]`` with no gradient steps (lstsq + clamp)."""

    beta_min: float = math.log(1e-12)
    beta_max: float = 7.0
    nnls_iters: int = 0
    keys_per_step: int = 1
    refit_every: int = 1
    schedule: tuple[tuple[int | None, int, int], ...] | None = None
    drop_below: float = -7.0
    drop_rounds: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.keys_per_step < 1 or self.refit_every < 1:
            raise ValueError(
                f"keys_per_step and refit_every must be >= 1, got {self.keys_per_step}, {self.refit_every}"
            )
        if self.drop_rounds < 0:
            raise ValueError(f"drop_rounds must be >= 0, got {self.drop_rounds}")
        if self.schedule is not None:
            self.schedule = tuple(tuple(stage) for stage in self.schedule)
            for stage in self.schedule:
                if len(stage) != 3 or stage[1] < 1 or stage[2] < 1 or (stage[0] is not None and stage[0] < 1):
                    raise ValueError(f"schedule stages must be (up_to >= 1 or None, k >= 1, tau >= 1), got {stage}")


@dataclass
class OMPFastOptions(OMPOptions):
    keys_per_step: int = 4
    refit_every: int = 2


class _GreedyState:
    def __init__(self, phi: torch.Tensor, mass: torch.Tensor, budgets: torch.Tensor, options: OMPOptions):
        heads, num_queries, length = phi.shape
        device = phi.device
        self.phi, self.mass, self.budgets, self.options = phi, mass, budgets.to(device), options
        self.lo, self.hi = math.exp(options.beta_min), math.exp(options.beta_max)
        width = int(budgets.max())
        self.selected = torch.full((heads, width), -1, dtype=torch.long, device=device)
        self.weights = phi.new_zeros(heads, width)
        self.columns = phi.new_zeros(heads, num_queries, width)  # phi's columns of the selected keys
        self.count = torch.zeros(heads, dtype=torch.long, device=device)
        self.taken = torch.zeros(heads, length, dtype=torch.bool, device=device)  # selected or excluded
        self.iteration = torch.zeros(heads, dtype=torch.long, device=device)
        self.refit_next = torch.zeros(heads, dtype=torch.bool, device=device)  # set by a drop: refit whatever tau says
        self.residual = mass.clone()
        # phi^T residual changes only when a refit changes a residual: OMP-fast (tau = 2) reuses it every
        # other step instead of reading all of phi again (the loop's largest cost).
        self.correlation: torch.Tensor | None = None
        self.factorization = IncrementalQR(mass, width) if num_queries >= width else None
        # Columns taken since the last refit: they join the factorization in one block when it is next
        # needed, so OMP-fast's non-refit steps cost no pass over the basis.
        self._unfactored: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _step_sizes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys per step and refit interval of each head: the first schedule stage it is still within."""
        opts = self.options
        stages = opts.schedule or ((None, opts.keys_per_step, opts.refit_every),)
        keys = torch.full_like(self.count, stages[-1][1])
        taus = torch.full_like(self.count, stages[-1][2])
        for up_to, k, tau in reversed(stages):
            within = torch.ones_like(self.taken[:, 0]) if up_to is None else self.count < up_to
            keys.masked_fill_(within, k)
            taus.masked_fill_(within, tau)
        return keys, taus

    def refit(self, heads: torch.Tensor) -> None:
        """Refit the mass weights and residuals of ``heads`` (bool ``[H]``)."""
        if not bool(heads.any()):
            return
        self._factor_taken_columns()
        width = max(1, int(self.count.max()))
        columns, valid = self.columns[:, :, :width], self.selected[:, :width] >= 0
        lstsq_heads = heads if self.factorization is None else heads & self.factorization.degenerate
        for group, start in ((lstsq_heads, None), (heads & ~lstsq_heads, self.factorization)):
            if not bool(group.any()):
                continue
            rows = group.nonzero().squeeze(1)
            weights = nnls_box(
                columns[rows],
                self.mass[rows],
                valid[rows],
                self.lo,
                self.hi,
                self.options.nnls_iters,
                start=None if start is None else start.solve(rows)[:, :width],
                or_unit=self.options.nnls_or_unit,
            )
            self.weights[rows, :width] = weights
        residual = self.mass - thin_matmul(columns, self.weights[:, :width].unsqueeze(-1)).squeeze(-1)
        self.residual = torch.where(heads.unsqueeze(1), residual, self.residual)
        self.correlation = None

    def _factor_taken_columns(self) -> None:
        if not self._unfactored:
            return
        columns = torch.cat([block for block, _ in self._unfactored], dim=2)
        slots = torch.cat([block_slots for _, block_slots in self._unfactored], dim=1)
        self._unfactored.clear()
        order = torch.argsort((slots < 0).to(torch.int8), dim=1, stable=True)  # each head's taken slots first
        self.factorization.append(columns.gather(2, order.unsqueeze(1).expand_as(columns)), slots.gather(1, order))

    def _step(self) -> bool:
        quota = self.budgets - self.count
        active = (quota > 0) & ~self.taken.all(dim=1)
        if not bool(active.any()):
            return False
        keys, taus = self._step_sizes()
        if self.correlation is None:
            self.correlation = (self.residual.unsqueeze(1) @ self.phi).squeeze(1)  # signed, as in the reference
        correlation = self.correlation.masked_fill(self.taken, -math.inf)
        to_take = torch.minimum(keys, quota).masked_fill(~active, 0)
        values, candidates = correlation.topk(int(to_take.max()), dim=1)
        take = (torch.arange(values.shape[1], device=values.device) < to_take.unsqueeze(1)) & torch.isfinite(values)
        slot_grid = (self.count.unsqueeze(1) + take.cumsum(dim=1) - 1).masked_fill(~take, -1)
        rows, js = take.nonzero(as_tuple=True)
        slots, chosen = slot_grid[take], candidates[take]
        self.selected[rows, slots] = chosen
        # One gather of the candidates' columns serves both copies (indexing phi per key is strided and slow).
        gathered = self.phi.gather(2, candidates.unsqueeze(1).expand(-1, self.phi.shape[1], -1))
        self.columns[rows, :, slots] = gathered[rows, :, js]
        if self.factorization is not None:
            self._unfactored.append((gathered, slot_grid))
        self.weights[rows, slots] = self.lo  # placeholder until the next refit
        self.taken[rows, chosen] = True
        self.count += take.sum(dim=1)
        # The reference tests the count before it grows: steps 1, 1 + tau, ... refit, so the second step
        # already sees the first step's residual.
        due = active & ((self.iteration % taus == 0) | self.refit_next)
        self.refit_next &= ~active
        self.iteration += active.long()
        self.refit(due)
        return True

    def run_greedy(self) -> None:
        while self._step():
            checkpoint()

    def drop(self, bad: torch.Tensor) -> None:
        """Remove ``bad`` slots; they stay in ``taken``, so they are never selected again."""
        self._factor_taken_columns()  # while the taken columns still sit at the slots they were taken into
        keep = (self.selected >= 0) & ~bad
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
        keep = keep.gather(1, order)
        self.selected = self.selected.gather(1, order).masked_fill(~keep, -1)
        self.weights = self.weights.gather(1, order) * keep
        self.columns = self.columns.gather(2, order.unsqueeze(1).expand_as(self.columns)) * keep.unsqueeze(1)
        self.count = keep.sum(dim=1)
        changed = bad.any(dim=1)
        if self.factorization is not None:
            self.factorization.rebuild(changed, self.columns, self.count)
        # As the reference: a drop counts as a step, and the first refill step refits.
        self.iteration += changed.long()
        self.refit_next |= changed


def _greedy(phi: torch.Tensor, mass: torch.Tensor, budgets: torch.Tensor, options: OMPOptions) -> Selection:
    """OMP over the columns of ``phi`` ``[h, n, C]``: their indices and log mass weights."""
    state = _GreedyState(phi, mass, budgets, options)
    state.run_greedy()
    state.refit(state.count > 0)  # always refit at the end (the reference skips this when tau == 1)
    drop_threshold = math.exp(options.drop_below)
    for _ in range(options.drop_rounds):
        bad = (state.selected >= 0) & (state.weights < drop_threshold)
        if not bool(bad.any()):
            break
        changed = bad.any(dim=1)
        state.drop(bad)
        state.refit(changed)
        state.run_greedy()
        state.refit(changed)
    valid = state.selected >= 0
    log_weights = state.weights.clamp(min=state.lo).log().masked_fill(~valid, -math.inf)
    return Selection(state.selected, log_weights)


def memory_plan(heads: int, queries: int, length: int, width: int, memory_bytes: int) -> tuple[int, int]:
    """Heads per group and candidate keys per head such that the greedy state, ``n x (C + 2t)`` floats per
    head, fits ``memory_bytes`` (at least one head, and at least ``2t`` candidates, whatever the bound)."""
    per_key = queries * 4
    candidates = min(length, max(2 * width, memory_bytes // per_key - 2 * width))
    per_head = per_key * (candidates + 2 * width)
    return max(1, min(heads, memory_bytes // per_head)), candidates


def _select_omp(block: Block, budgets: torch.Tensor, options: OMPOptions) -> Selection:
    width = int(budgets.max())
    group, count = memory_plan(block.num_heads, block.num_queries, block.length, width, options.memory_bytes)
    candidates = None if count == block.length else block.first_correlation().topk(count, dim=1).indices
    indices = torch.full((block.num_heads, width), -1, dtype=torch.long, device=budgets.device)
    log_weights = torch.full((block.num_heads, width), -math.inf, device=budgets.device)
    for start in range(0, block.num_heads, group):
        heads = torch.arange(start, min(start + group, block.num_heads), device=budgets.device)
        chosen = None if candidates is None else candidates[heads]
        phi, mass = block.mass_features(heads, chosen)
        selection = _greedy(phi, mass, budgets[heads], options)
        del phi
        picked = selection.indices
        if chosen is not None:  # candidate positions back to key indices
            picked = chosen.gather(1, picked.clamp(min=0)).masked_fill(picked < 0, -1)
        indices[heads, : picked.shape[1]] = picked
        log_weights[heads, : picked.shape[1]] = selection.log_weights
    return Selection(indices, log_weights)


register_method(
    "AM-OMP",
    OMPOptions,
    query_source="ss-plus-repeat",
    description="OMP key selection (k=1, refit every step), beta <= 7 with drop-and-reselect, least-squares values",
)(_select_omp)

register_method(
    "AM-OMP-fast",
    OMPFastOptions,
    query_source="ss-plus-repeat",
    description="OMP with 4 keys per step and a refit every 2 steps; 4-8x faster than AM-OMP",
)(_select_omp)
