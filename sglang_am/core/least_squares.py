"""Batched least squares over heads with ragged column sets, and the bounded NNLS of the paper (Alg. 3)."""

from __future__ import annotations

import torch

from .cancel import checkpoint

CHOLESKY_RIDGE = 1e-6
POWER_ITERATIONS = 3


def masked_lstsq(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Solve ``min ||a x - b||`` per head using only the valid columns of ``a``.

    ``a`` ``[H, n, t]``, ``b`` ``[H, n, k]``, ``valid`` ``[H, t]`` bool. Invalid columns get ``x = 0``:
    they are zeroed and pinned by one extra identity row each, which leaves the valid columns' problem
    exactly as if the column had never existed, so ragged heads share one batched call. Heads of full rank
    are solved by Householder QR without pivoting (``_full_rank_qr_solve``); the others by
    ``torch.linalg.lstsq``, and heads where that fails or returns non-finite values fall back to Cholesky
    on the ridge-regularised normal equations (dual form when n < t).
    """
    h, n, t = a.shape
    mask = valid.to(a.dtype)
    a = a * mask.unsqueeze(1)
    if not bool(valid.all()):
        a = torch.cat([a, torch.diag_embed(1.0 - mask)], dim=1)
        b = torch.cat([b, b.new_zeros(h, t, b.shape[2])], dim=1)
    x, solved = _full_rank_qr_solve(a, b)
    if not bool(solved.all()):
        x[~solved] = _rank_revealing_lstsq(a[~solved], b[~solved])
    return x * mask.unsqueeze(-1)


def _full_rank_qr_solve(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares by unpivoted Householder QR (LAPACK's ``gels`` path; on this project's 2-core CPU 1.6x
    faster than the pivoting ``gelsy`` that ``torch.linalg.lstsq`` runs at n = 4096, t = 409, and 5x at
    n = 5000, t = 3276), and which heads it solved. A tall ``a`` (n >= t) is
    factored as ``a = QR``; a wide one as ``aᵀ = QR``, which gives the minimum-norm solution ``Q R⁻ᵀ b``, as
    ``lstsq`` does. A head whose ``R`` has a diagonal entry within ``lstsq``'s rank cut-off (``eps * max(n, t)``
    times its largest column), or whose smallest singular value (estimated from ``R``) is within that cut-off of
    its Frobenius norm, is rank-deficient as ``lstsq`` sees it, and its solution here is not used."""
    rows, cols = a.shape[1], a.shape[2]
    tall = rows >= cols
    factors, tau = torch.geqrf(a if tall else a.transpose(1, 2))
    diagonal = factors.diagonal(dim1=1, dim2=2).abs()
    rcond = torch.finfo(a.dtype).eps * max(rows, cols)
    cutoff = rcond * a.norm(dim=1).amax(dim=1, keepdim=True)
    r = factors[:, : min(rows, cols)].triu()
    solved = (diagonal > cutoff).all(dim=1) & torch.isfinite(diagonal).all(dim=1)
    # Without pivoting the diagonal does not reveal rank: a head can pass the cut-off with a smallest singular value
    # below lstsq's (a recall document's head: 2.9e-6 of its largest, its diagonal's smallest 2e-3; its solution
    # reached 2e5 against values below 7, past float16's range, where lstsq gave 373 and a smaller error).
    # The smallest singular value is estimated from R and held to lstsq's cut-off (Frobenius norm: an upper bound).
    solved &= _smallest_singular_value(r, solved) > rcond * a.norm(dim=(1, 2))
    if tall:
        projected = torch.ormqr(factors, tau, b, left=True, transpose=True)[:, :cols]
        x = torch.linalg.solve_triangular(r, projected, upper=True)
    else:
        y = torch.linalg.solve_triangular(r.transpose(1, 2), b, upper=False)
        x = torch.ormqr(factors, tau, torch.cat([y, y.new_zeros(y.shape[0], cols - rows, y.shape[2])], dim=1),
                        left=True, transpose=False)
    return x, solved & torch.isfinite(x).flatten(1).all(dim=1)


def _smallest_singular_value(r: torch.Tensor, invertible: torch.Tensor) -> torch.Tensor:
    """An estimate of each upper-triangular ``r``'s smallest singular value (from above), by inverse iteration on
    ``rᵀr`` (two triangular solves a step, from a seeded start); 0 where ``invertible`` is false."""
    r = torch.where(invertible[:, None, None], r, torch.eye(r.shape[1], dtype=r.dtype, device=r.device))
    generator = torch.Generator(device=r.device).manual_seed(0)
    x = torch.randn(r.shape[0], r.shape[1], 1, generator=generator, dtype=r.dtype, device=r.device)
    for _ in range(2 * POWER_ITERATIONS):
        x = x / x.norm(dim=1, keepdim=True)
        x = torch.linalg.solve_triangular(r, torch.linalg.solve_triangular(r.transpose(1, 2), x, upper=False), upper=True)
        growth = x.norm(dim=1).squeeze(-1)  # ||(rᵀr)⁻¹ x|| -> 1 / sigma_min²
    estimate = growth.rsqrt()
    return torch.where(invertible & torch.isfinite(estimate), estimate, torch.zeros_like(estimate))


def _rank_revealing_lstsq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    try:
        x = torch.linalg.lstsq(a, b).solution
        failed = ~torch.isfinite(x).flatten(1).all(dim=1)
    except RuntimeError:
        x = torch.empty(a.shape[0], a.shape[2], b.shape[2], dtype=a.dtype, device=a.device)
        failed = torch.ones(a.shape[0], dtype=torch.bool, device=a.device)
    if bool(failed.any()):
        x[failed] = _ridge_cholesky(a[failed], b[failed])
    return x


def _ridge_cholesky(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    rows, cols = a.shape[1], a.shape[2]
    at = a.transpose(1, 2)
    if rows >= cols:
        gram, rhs = at @ a, at @ b
    else:
        gram, rhs = a @ at, b
    # Relative to the Gram's scale, so an exactly singular problem still factors in float32.
    ridge = CHOLESKY_RIDGE * gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp(min=torch.finfo(a.dtype).tiny)
    gram = gram + ridge[:, None, None] * torch.eye(gram.shape[-1], dtype=a.dtype, device=a.device)
    factor, info = torch.linalg.cholesky_ex(gram)
    if bool((info != 0).any()):
        raise RuntimeError("least-squares fallback failed: the regularised normal matrix is not positive definite")
    solution = torch.cholesky_solve(rhs, factor)
    return solution if rows >= cols else at @ solution


def thin_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for a batched ``b`` of a few columns, computed as ``(bᵀ @ aᵀ)ᵀ``: CPU BLAS runs the batched
    product 2-6x faster in that orientation (measured at n = 4096, t = 300, k <= 4)."""
    return (b.transpose(1, 2) @ a.transpose(1, 2)).transpose(1, 2)


def spectral_norm_squared(m: torch.Tensor) -> torch.Tensor:
    """``sigma_max(m)^2`` per head ``[H]`` from a few power iterations on ``mᵀm`` (a lower estimate)."""
    v = torch.ones(m.shape[0], m.shape[2], 1, dtype=m.dtype, device=m.device)
    v = v / v.norm(dim=1, keepdim=True)
    mt = m.transpose(1, 2)
    for _ in range(POWER_ITERATIONS):
        v = thin_matmul(mt, thin_matmul(m, v))
        v = v / v.norm(dim=1, keepdim=True).clamp(min=torch.finfo(m.dtype).tiny)
    return thin_matmul(mt, thin_matmul(m, v)).norm(dim=1).squeeze(-1)


def nnls_box(
    m: torch.Tensor,
    y: torch.Tensor,
    valid: torch.Tensor,
    lo: float,
    hi: float,
    iters: int,
    start: torch.Tensor | None = None,
    or_unit: bool = False,
) -> torch.Tensor:
    """Bounded NNLS ``min_{lo <= w <= hi} ||m w - y||`` per head (paper Algorithm 3).

    Least-squares start (``start`` if the caller already has it), clamp, then ``iters`` projected-gradient
    steps with step ``1/L``, ``L = sigma_max(m)^2``. ``m`` ``[H, n, t]``, ``y`` ``[H, n]``; invalid
    columns return 0. With ``or_unit``, a head whose clamped start fits worse than ``w = 1`` (beta = 0, inside
    every box the methods use) starts from ``w = 1`` instead (``NNLS_STARTS``).
    """
    mask = valid.to(m.dtype)
    if start is None:
        start = masked_lstsq(m, y.unsqueeze(-1), valid).squeeze(-1)
    m = m * mask.unsqueeze(1)
    w = start.clamp(lo, hi)
    if or_unit:
        w = _better_start(m, y, w, torch.ones_like(start).clamp(lo, hi))
    if iters > 0:
        step = 1.0 / spectral_norm_squared(m).clamp(min=torch.finfo(m.dtype).tiny).unsqueeze(-1)
        for _ in range(iters):
            checkpoint()
            residual = thin_matmul(m, w.unsqueeze(-1)).squeeze(-1) - y
            grad = thin_matmul(m.transpose(1, 2), residual.unsqueeze(-1)).squeeze(-1)
            w = (w - step * grad).clamp(lo, hi)
    return w * mask


def _better_start(m: torch.Tensor, y: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Per head, whichever of two ``[H, t]`` weight vectors has the smaller residual ``||m w - y||``."""
    def residual(w: torch.Tensor) -> torch.Tensor:
        return (thin_matmul(m, w.unsqueeze(-1)).squeeze(-1) - y).norm(dim=1)
    return torch.where((residual(second) < residual(first)).unsqueeze(-1), second, first)


class IncrementalQR:
    """Thin QR of a growing, per-head set of columns, for repeated least-squares refits (OMP).

    ``append`` adds a block of columns per head: block classical Gram-Schmidt against the existing basis,
    twice (CGS2, for orthogonality in float32), then a Householder QR inside the block; O(n t k) for k
    columns. ``solve`` is then one triangular solve instead of a fresh O(n t^2) factorisation. Unused
    slots hold an identity diagonal and solve to 0. A head whose columns are numerically dependent (a new
    direction shorter than ``eps * max(n, t)`` times its largest column, the rank cut-off
    ``torch.linalg.lstsq`` uses) is marked ``degenerate``: callers refit it with ``masked_lstsq``, which
    handles rank deficiency.
    """

    def __init__(self, target: torch.Tensor, width: int):
        heads, rows = target.shape
        self.target = target
        self.basis = target.new_zeros(heads, width, rows)  # Q transposed: row j is the j-th direction
        self.r = torch.eye(width, dtype=target.dtype, device=target.device).repeat(heads, 1, 1)
        self.q_target = target.new_zeros(heads, width)
        self.largest_norm = target.new_zeros(heads)
        self.degenerate = torch.zeros(heads, dtype=torch.bool, device=target.device)
        self.tolerance = torch.finfo(target.dtype).eps * max(rows, width)

    def append(self, columns: torch.Tensor, slots: torch.Tensor) -> None:
        """Add ``columns[h, :, j]`` (``[H, n, k]``) at slot ``slots[h, j]`` wherever ``slots[h, j] >= 0``.

        Each head's used slots must be a prefix of its k entries and continue its own slot sequence.
        """
        taking = slots >= 0
        if not bool(taking.any()):
            return
        columns = columns * taking.unsqueeze(1)
        basis = self.basis[:, : int(slots.max()) + 1]  # later slots are still empty everywhere
        basis_t = basis.transpose(1, 2)
        coefficients = thin_matmul(basis, columns)
        orthogonal = columns - thin_matmul(basis_t, coefficients)
        correction = thin_matmul(basis, orthogonal)
        orthogonal = orthogonal - thin_matmul(basis_t, correction)
        coefficients = coefficients + correction
        q, r_block = torch.linalg.qr(orthogonal)
        adding = taking.any(dim=1)
        self.largest_norm = torch.where(
            adding, torch.maximum(self.largest_norm, columns.norm(dim=1).amax(dim=1)), self.largest_norm
        )
        short = r_block.diagonal(dim1=1, dim2=2).abs() <= self.tolerance * self.largest_norm.unsqueeze(1)
        self.degenerate |= (short & taking).any(dim=1)
        heads, js = taking.nonzero(as_tuple=True)
        slot = slots[heads, js]
        self.basis[heads, slot] = q[heads, :, js]
        self.r[heads, : basis.shape[1], slot] = coefficients[heads, :, js]
        pairs = taking.unsqueeze(2) & taking.unsqueeze(1) & torch.ones_like(r_block, dtype=torch.bool).triu()
        hs, i, j = pairs.nonzero(as_tuple=True)
        self.r[hs, slots[hs, i], slots[hs, j]] = r_block[hs, i, j]
        self.q_target[heads, slot] = (q[heads, :, js] * self.target[heads]).sum(dim=1)

    def solve(self, heads: torch.Tensor) -> torch.Tensor:
        """Least-squares coefficients ``[len(heads), t]`` of ``target`` on the columns of ``heads``."""
        return torch.linalg.solve_triangular(
            self.r[heads], self.q_target[heads].unsqueeze(-1), upper=True
        ).squeeze(-1)

    def rebuild(self, heads: torch.Tensor, columns: torch.Tensor, counts: torch.Tensor) -> None:
        """Refactor ``heads`` (bool ``[H]``) from the first ``counts[h]`` of ``columns[h]`` (``[H, n, t]``)."""
        if not bool(heads.any()):
            return
        self.basis[heads] = 0
        self.r[heads] = torch.eye(self.r.shape[1], dtype=self.r.dtype, device=self.r.device)
        self.q_target[heads] = 0
        self.largest_norm[heads] = 0
        self.degenerate[heads] = False
        used = max(1, int(counts[heads].max()))
        slots = torch.arange(used, device=counts.device).expand(len(counts), used)
        in_use = (slots < counts.unsqueeze(1)) & heads.unsqueeze(1)
        self.append(columns[:, :, :used], slots.masked_fill(~in_use, -1))
