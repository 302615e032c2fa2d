import math

import pytest
import torch

from sglang_am.core import least_squares
from sglang_am.core.least_squares import masked_lstsq


def _problem(rows, cols, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, rows, cols, generator=g), torch.randn(3, rows, 2, generator=g)


def _rank_deficient(a):
    """Every head repeats its first column, so only the rank-revealing solver may answer."""
    a = a.clone()
    a[:, :, -1] = a[:, :, 0]
    return a


def test_ragged_columns_solve_as_if_absent():
    a, b = _problem(40, 6)
    valid = torch.tensor([[True] * 6, [True, True, True, False, False, False], [False, True, False, True, True, True]])
    x = masked_lstsq(a, b, valid)
    for h in range(3):
        cols = valid[h].nonzero().squeeze(1)
        expected = torch.linalg.lstsq(a[h][:, cols], b[h]).solution
        torch.testing.assert_close(x[h, cols], expected, rtol=1e-4, atol=1e-5)
        assert (x[h, ~valid[h]] == 0).all()


@pytest.mark.parametrize("rows, cols", [(40, 6), (4, 9)])  # primal and dual (n < t) fallback forms
def test_cholesky_fallback_when_lstsq_fails(monkeypatch, rows, cols):
    a, b = _problem(rows, cols, seed=1)
    a = _rank_deficient(a)
    valid = torch.ones(3, cols, dtype=torch.bool)
    expected = torch.linalg.lstsq(a, b, driver="gelsd").solution

    def failing_lstsq(*args, **kwargs):
        raise RuntimeError("simulated solver failure")

    monkeypatch.setattr(least_squares.torch.linalg, "lstsq", failing_lstsq)
    x = masked_lstsq(a, b, valid)
    torch.testing.assert_close(a @ x, a @ expected, rtol=1e-3, atol=1e-3)  # the solution is not unique


def test_non_finite_lstsq_heads_fall_back_individually(monkeypatch):
    a, b = _problem(40, 6, seed=2)
    a = _rank_deficient(a)
    valid = torch.ones(3, 6, dtype=torch.bool)
    real_lstsq = torch.linalg.lstsq
    expected = real_lstsq(a, b).solution

    def partly_nan(*args, **kwargs):
        result = real_lstsq(*args, **kwargs)
        result.solution[1] = float("nan")
        return result

    monkeypatch.setattr(least_squares.torch.linalg, "lstsq", partly_nan)
    x = masked_lstsq(a, b, valid)
    assert torch.isfinite(x).all()
    torch.testing.assert_close(a @ x, a @ expected, rtol=1e-3, atol=1e-3)


def test_full_rank_heads_use_qr_and_rank_deficient_heads_use_lstsq(monkeypatch):
    a, b = _problem(50, 8, seed=3)
    a[1, :, 5] = 2 * a[1, :, 2]  # head 1 is rank-deficient
    valid = torch.ones(3, 8, dtype=torch.bool)
    real_lstsq, asked = torch.linalg.lstsq, []

    def recording_lstsq(a, b, *args, **kwargs):
        asked.append(a.shape[0])
        return real_lstsq(a, b, *args, **kwargs)

    monkeypatch.setattr(least_squares.torch.linalg, "lstsq", recording_lstsq)
    x = masked_lstsq(a, b, valid)
    assert asked == [1]  # only the rank-deficient head
    for h in (0, 2):
        torch.testing.assert_close(x[h], real_lstsq(a[h], b[h]).solution, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a[1] @ x[1], a[1] @ real_lstsq(a[1], b[1]).solution, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(x).all()


def test_wide_full_rank_heads_get_the_minimum_norm_solution(monkeypatch):
    a, b = _problem(7, 12, seed=4)  # fewer rows than columns: many exact solutions
    valid = torch.ones(3, 12, dtype=torch.bool)
    expected = torch.linalg.lstsq(a.double(), b.double(), driver="gelsd").solution.float()

    def unexpected_lstsq(*args, **kwargs):
        raise AssertionError("full-rank heads must not need lstsq")

    monkeypatch.setattr(least_squares.torch.linalg, "lstsq", unexpected_lstsq)
    x = masked_lstsq(a, b, valid)
    torch.testing.assert_close(x, expected, rtol=1e-4, atol=1e-4)


def _lstsq_on(columns, target, count):
    return torch.linalg.lstsq(columns[:, :, :count], target.unsqueeze(-1)).solution.squeeze(-1)


def test_incremental_qr_matches_lstsq_through_ragged_appends_and_rebuild():
    g = torch.Generator().manual_seed(0)
    heads, rows, width = 3, 60, 12
    columns = torch.rand(heads, rows, width, generator=g)
    target = torch.rand(heads, rows, generator=g)
    qr = least_squares.IncrementalQR(target, width)
    counts = torch.zeros(heads, dtype=torch.long)
    for step_sizes in ([2, 1, 0], [3, 0, 4], [1, 4, 2]):  # ragged: heads add different numbers per step
        sizes = torch.tensor(step_sizes)
        k = int(sizes.max())
        slots = counts.unsqueeze(1) + torch.arange(k)
        slots = slots.masked_fill(torch.arange(k) >= sizes.unsqueeze(1), -1)
        block = columns.gather(2, slots.clamp(min=0).unsqueeze(1).expand(-1, rows, -1))
        qr.append(block, slots)
        counts += sizes
        solution = qr.solve(torch.arange(heads))
        for h in range(heads):
            n = int(counts[h])
            if n:
                expected = _lstsq_on(columns[h : h + 1], target[h : h + 1], n)[0]
                torch.testing.assert_close(solution[h, :n], expected, rtol=1e-3, atol=1e-4)
            assert (solution[h, n:] == 0).all()
    assert not qr.degenerate.any()
    # Drop the first column of head 1 and refactor it; the others are untouched.
    columns[1] = torch.cat([columns[1, :, 1:], torch.zeros(rows, 1)], dim=1)
    counts[1] -= 1
    qr.rebuild(torch.tensor([False, True, False]), columns, counts)
    solution = qr.solve(torch.tensor([1]))
    expected = _lstsq_on(columns[1:2], target[1:2], int(counts[1]))[0]
    torch.testing.assert_close(solution[0, : counts[1]], expected, rtol=1e-3, atol=1e-4)


def test_incremental_qr_flags_dependent_columns():
    g = torch.Generator().manual_seed(1)
    columns = torch.rand(2, 30, 3, generator=g)
    columns[0, :, 2] = columns[0, :, 0]  # head 0 repeats a column, head 1 does not
    qr = least_squares.IncrementalQR(torch.rand(2, 30, generator=g), 3)
    qr.append(columns[:, :, :2], torch.tensor([[0, 1], [0, 1]]))
    assert not qr.degenerate.any()
    qr.append(columns[:, :, 2:], torch.tensor([[2], [2]]))
    assert qr.degenerate.tolist() == [True, False]


def test_a_head_whose_qr_diagonal_hides_its_rank_is_solved_as_lstsq_solves_it():
    """Kahan's matrix: its R is itself, every diagonal entry above lstsq's cut-off (the smallest 0.016), its
    smallest singular value 5e-11 of its largest. Solved by unpivoted QR its solution reached 3e9 (past float16:
    a recall document's registration failed on such a head with "values contains NaN or Inf")."""
    t, theta = 60, 1.2
    sine, cosine = math.sin(theta), math.cos(theta)
    kahan = torch.triu(torch.full((t, t), -cosine, dtype=torch.float64), diagonal=1) + torch.eye(t, dtype=torch.float64)
    kahan = torch.diag(torch.tensor([sine ** i for i in range(t)], dtype=torch.float64)) @ kahan
    a = torch.cat([kahan, torch.zeros(20, t, dtype=torch.float64)]).float()[None]
    b = torch.randn(1, 80, 3, generator=torch.Generator().manual_seed(0))
    solution = masked_lstsq(a, b, torch.ones(1, t, dtype=torch.bool))
    reference = torch.linalg.lstsq(a, b, driver="gelsy").solution
    torch.testing.assert_close(solution, reference, rtol=1e-3, atol=1e-3)
    assert solution.abs().max() < 1e3
