import math

import pytest
import torch

from sglang_am import attention, compact, evaluate
from sglang_am.core.least_squares import nnls_box


@pytest.mark.parametrize("budget_offset", [0, 5])
@pytest.mark.parametrize("method", ["AM-HighestAttnKeys", "AM-OMP", "KVzip"])
def test_budget_at_least_length_is_identity(small_block, method, budget_offset):
    b = small_block
    length = b.keys.shape[1]
    result = compact(b.keys, b.values, b.queries, length + budget_offset, method=method)
    assert (result.beta == 0).all()
    assert (result.lengths == length).all()
    assert torch.equal(result.indices[0], torch.arange(length))
    out, lse = attention(b.heldout_queries, result.keys, result.values, result.beta)
    ref_out, ref_lse = attention(b.heldout_queries, b.keys, b.values)
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-6, atol=1e-6)
    errors = evaluate(b.keys, b.values, result, b.heldout_queries).mean()
    assert errors["relative_l2"] < 1e-6 and errors["cosine"] > 1 - 1e-6 and errors["mass_error"] < 1e-6


def test_mixed_budgets_keep_full_heads_exact_and_pad_the_rest(small_block):
    b = small_block
    length = b.keys.shape[1]
    budgets = [length, 10, length + 3, 25]
    result = compact(b.keys, b.values, b.queries, budgets)
    assert result.keys.shape == (4, length, b.keys.shape[2])
    assert result.lengths.tolist() == [length, 10, length, 25]
    for head in (0, 2):
        assert torch.equal(result.keys[head], b.keys[head])
        assert torch.equal(result.values[head], b.values[head])
        assert (result.beta[head] == 0).all()
    assert torch.isneginf(result.beta[1, 10:]).all() and (result.indices[1, 10:] == -1).all()
    assert (result.keys[1, 10:] == 0).all() and (result.values[1, 10:] == 0).all()
    assert torch.isfinite(result.beta[1, :10]).all()
    assert result.padding_slots == (length - 10) + (length - 25)
    solo = compact(b.keys[1:2], b.values[1:2], b.queries[1:2], 10)
    torch.testing.assert_close(result.values[1:2, :10], solo.values)


def _duplicated_block(seed):
    g = torch.Generator().manual_seed(seed)
    unique, dim = 8, 16
    multiplicity = torch.tensor([1, 2, 3, 4, 1, 2, 3, 4])
    base_keys = torch.randn(1, unique, dim, generator=g) * 1.5
    base_values = torch.randn(1, unique, dim, generator=g)
    owner = torch.repeat_interleave(torch.arange(unique), multiplicity)
    owner = owner[torch.randperm(len(owner), generator=g)]
    queries = torch.randn(1, 200, dim, generator=g)
    return base_keys[:, owner], base_values[:, owner], queries, owner, multiplicity


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beta_recovers_log_multiplicity_of_duplicated_keys(seed):
    keys, values, queries, owner, multiplicity = _duplicated_block(seed)
    result = compact(keys, values, queries, len(multiplicity), method="AM-OMP")
    chosen = owner[result.indices[0]]
    assert sorted(chosen.tolist()) == list(range(len(multiplicity))), "each distinct key picked once"
    torch.testing.assert_close(result.beta[0], multiplicity[chosen].float().log(), rtol=0, atol=1e-3)
    errors = evaluate(keys, values, result, torch.randn(1, 64, keys.shape[2]))
    assert errors.mass_error.max() < 1e-3 and errors.relative_l2.max() < 1e-3


def test_nnls_recovers_multiplicities_when_one_copy_of_each_key_is_kept():
    keys, _, queries, owner, multiplicity = _duplicated_block(3)
    first_copy = torch.tensor([int((owner == u).nonzero()[0]) for u in range(len(multiplicity))])
    logits = queries @ keys.transpose(1, 2) / math.sqrt(keys.shape[2])
    shift = logits.amax(dim=-1, keepdim=True)
    features = torch.exp(logits[:, :, first_copy] - shift)
    mass = torch.exp(logits - shift).sum(dim=-1)
    valid = torch.ones(1, len(first_copy), dtype=torch.bool)
    weights = nnls_box(features, mass, valid, lo=math.exp(-3), hi=math.exp(3), iters=2)
    torch.testing.assert_close(weights[0], multiplicity.float(), rtol=1e-4, atol=1e-4)


def test_nnls_box_respects_bounds_and_masks():
    g = torch.Generator().manual_seed(0)
    m = torch.rand(2, 50, 4, generator=g)
    inside = torch.tensor([0.1, 0.5, 2.0, 10.0])
    outside = torch.tensor([0.001, 1.0, 1.0, 100.0])
    y = (m @ torch.stack([inside, outside]).unsqueeze(-1)).squeeze(-1)
    lo, hi = math.exp(-3), math.exp(3)
    w = nnls_box(m, y, torch.ones(2, 4, dtype=torch.bool), lo=lo, hi=hi, iters=2)
    torch.testing.assert_close(w[0], inside, rtol=1e-4, atol=1e-4)  # feasible: exact solution kept
    assert (w[1] >= lo - 1e-7).all() and (w[1] <= hi + 1e-5).all()
    assert w[1, 3] == pytest.approx(hi)  # the entry far above the box stays at the bound
    # Projected-gradient steps never increase the residual of the clamped start.
    start = nnls_box(m, y, torch.ones(2, 4, dtype=torch.bool), lo=lo, hi=hi, iters=0)
    residual = lambda x: (m[1] @ x - y[1]).norm()
    assert residual(w[1]) <= residual(start[1]) + 1e-6
    masked = nnls_box(m, y, torch.tensor([[True, True, False, False]] * 2), lo=lo, hi=hi, iters=2)
    assert (masked[:, 2:] == 0).all() and (masked[:, :2] >= lo).all()


def test_nnls_or_unit_starts_from_unit_weights_where_the_clamped_least_squares_start_fits_worse():
    # A near-singular fit: y is m @ 1 plus a little noise along m's weakest direction, so the least-squares
    # weights are 1 + 100 v (far outside the box) and their clamp fits worse than w = 1, which the box holds.
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(40, 8, generator=g))
    v, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    singular = torch.tensor([4.0, 3.0, 2.0, 1.5, 1.0, 0.8, 0.5, 1e-4])
    m = (u * singular) @ v.T
    y = m @ torch.ones(8) + 1e-2 * u[:, -1]
    m, y, valid = m.unsqueeze(0), y.unsqueeze(0), torch.ones(1, 8, dtype=torch.bool)
    lo, hi = math.exp(-3), math.exp(3)
    residual = lambda w: float((m[0] @ w - y[0]).norm())
    clamped = torch.linalg.lstsq(m[0], y[0].unsqueeze(-1)).solution.squeeze(-1).clamp(lo, hi)
    assert residual(clamped) > 10 * residual(torch.ones(8))
    for iters in (0, 2):
        w = nnls_box(m, y, valid, lo=lo, hi=hi, iters=iters, or_unit=True)[0]
        assert residual(w) <= residual(torch.ones(8)) + 1e-6
    assert residual(nnls_box(m, y, valid, lo=lo, hi=hi, iters=0)[0]) > residual(torch.ones(8))  # the paper's start
