"""On clustered synthetic blocks, Attention Matching must beat its ablations and the eviction baselines."""

import pytest

from sglang_am import compact, evaluate
from sglang_am.core.synthetic import clustered_block

AM_METHODS = ["AM-HighestAttnKeys", "AM-OMP-fast", "AM-OMP"]


@pytest.fixture(scope="module")
def block():
    return clustered_block(heads=4, length=1024, head_dim=32, num_queries=1024, num_heldout=256, num_clusters=32, seed=7)


def _error(block, budget, method, **options):
    """Held-out output error of attention over [block; suffix], the way a request uses the block."""
    result = compact(block.keys, block.values, block.queries, budget, method, **options)
    errors = evaluate(
        block.keys, block.values, result, block.heldout_queries,
        suffix_keys=block.suffix_keys, suffix_values=block.suffix_values,
    )
    return errors.mean()["relative_l2"]


@pytest.fixture(scope="module")
def baseline_errors(block):
    return {
        (ratio, method): _error(block, int(ratio * block.keys.shape[1]), method)
        for ratio in (0.05, 0.1)
        for method in ("H2O+", "SnapKV")
    }


@pytest.mark.parametrize("ratio", [0.05, 0.1])
@pytest.mark.parametrize("method", AM_METHODS)
def test_am_beats_ablations_and_eviction(block, baseline_errors, method, ratio):
    budget = int(ratio * block.keys.shape[1])
    full = _error(block, budget, method)
    zero_beta = _error(block, budget, method, fit_beta=False)
    direct_values = _error(block, budget, method, fit_values=False)
    report = (
        f"{method}@{ratio}: AM {full:.4f}, zero-beta {zero_beta:.4f}, direct {direct_values:.4f}, "
        f"H2O+ {baseline_errors[ratio, 'H2O+']:.4f}, SnapKV {baseline_errors[ratio, 'SnapKV']:.4f}"
    )
    assert full < zero_beta, report
    assert full < direct_values, report
    assert full < baseline_errors[ratio, "H2O+"], report
    assert full < baseline_errors[ratio, "SnapKV"], report


def test_beta_matches_mass_on_heldout_queries(block):
    budget = int(0.1 * block.keys.shape[1])
    fitted = compact(block.keys, block.values, block.queries, budget, "AM-HighestAttnKeys")
    zero = compact(block.keys, block.values, block.queries, budget, "AM-HighestAttnKeys", fit_beta=False)
    fitted_error = evaluate(block.keys, block.values, fitted, block.heldout_queries).mean()["mass_error"]
    zero_error = evaluate(block.keys, block.values, zero, block.heldout_queries).mean()["mass_error"]
    assert fitted_error < 0.5 * zero_error
