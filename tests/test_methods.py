import math

import pytest
import torch

from sglang_am import compact, evaluate, get_method, pyramid_layer_budget


def test_kvzip_spends_the_global_budget_unevenly(small_block):
    b = small_block
    result = compact(b.keys, b.values, b.queries, 20, "KVzip")
    assert int(result.lengths.sum()) == 20 * b.keys.shape[0]
    assert len(set(result.lengths.tolist())) > 1, "global top-k should not give every head the same count"
    for h, n in enumerate(result.lengths.tolist()):
        assert torch.isneginf(result.beta[h, n:]).all() and (result.indices[h, n:] == -1).all()
        assert (result.beta[h, :n] == 0).all()
        assert torch.equal(result.values[h, :n], b.values[h, result.indices[h, :n]])


def test_eviction_baselines_keep_original_values_and_zero_beta(small_block):
    b = small_block
    for method in ("H2O+", "SnapKV", "KVzip-uniform", "random", "truncate"):
        result = compact(b.keys, b.values, b.queries, 12, method)
        assert (result.beta == 0).all(), method
        gathered = b.values.gather(1, result.indices.unsqueeze(-1).expand(-1, -1, b.values.shape[2]))
        assert torch.equal(result.values, gathered), method


def test_truncate_keeps_the_first_keys(small_block):
    result = compact(small_block.keys, small_block.values, small_block.queries, 9, "truncate")
    assert torch.equal(result.indices, torch.arange(9).expand(4, 9))


def test_random_is_deterministic_for_a_seed(small_block):
    b = small_block
    first = compact(b.keys, b.values, b.queries, 12, "random", seed=3)
    again = compact(b.keys, b.values, b.queries, 12, "random", seed=3)
    other = compact(b.keys, b.values, b.queries, 12, "random", seed=4)
    assert torch.equal(first.indices, again.indices)
    assert not torch.equal(first.indices, other.indices)


@pytest.mark.parametrize("method", ["AM-HighestAttnKeys", "AM-OMP-fast"])
def test_repeated_runs_are_bit_identical(small_block, method):
    b = small_block
    first = compact(b.keys, b.values, b.queries, 15, method)
    again = compact(b.keys, b.values, b.queries, 15, method)
    for name in ("keys", "values", "beta", "indices", "lengths"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name


def test_snapkv_pools_scores_along_positions(small_block):
    b = small_block
    pooled = compact(b.keys, b.values, b.queries, 12, "SnapKV")
    unpooled = compact(b.keys, b.values, b.queries, 12, "SnapKV", pooling=None)
    plain_mean = compact(b.keys, b.values, b.queries, 12, "H2O+")
    assert torch.equal(unpooled.indices, plain_mean.indices)
    assert not torch.equal(pooled.indices, unpooled.indices)


def test_pyramid_schedule_falls_with_depth_and_keeps_the_mean():
    budgets = [pyramid_layer_budget(100, layer, 8) for layer in range(8)]
    assert budgets == sorted(budgets, reverse=True)
    assert budgets[0] == 195 and budgets[-1] == 5
    assert abs(sum(budgets) / 8 - 100) <= 1
    assert pyramid_layer_budget(100, 0, 1) == 100
    with pytest.raises(ValueError, match="layer"):
        pyramid_layer_budget(100, 8, 8)


def test_pyramidkv_uses_the_layer_budget(small_block):
    b = small_block
    top = compact(b.keys, b.values, b.queries, 10, "PyramidKV", layer=0, num_layers=4)
    bottom = compact(b.keys, b.values, b.queries, 10, "PyramidKV", layer=3, num_layers=4)
    assert top.lengths.tolist() == [pyramid_layer_budget(10, 0, 4)] * 4
    assert bottom.lengths.tolist() == [pyramid_layer_budget(10, 3, 4)] * 4


def test_low_precision_inputs_return_input_dtype_and_exact_keys(small_block):
    b = small_block
    keys, values, queries = b.keys.bfloat16(), b.values.bfloat16(), b.queries.bfloat16()
    result = compact(keys, values, queries, 16, "AM-OMP-fast")
    assert result.keys.dtype == result.values.dtype == result.beta.dtype == torch.bfloat16
    gathered = keys.gather(1, result.indices.unsqueeze(-1).expand(-1, -1, keys.shape[2]))
    assert torch.equal(result.keys, gathered)
    as_float = compact(keys.float(), values.float(), queries.float(), 16, "AM-OMP-fast")
    assert torch.equal(result.indices, as_float.indices)
    error = evaluate(keys.float(), values.float(), result, b.heldout_queries).mean()["relative_l2"]
    assert error < 1.05 * evaluate(keys.float(), values.float(), as_float, b.heldout_queries).mean()["relative_l2"] + 0.01


@pytest.mark.parametrize("method", ["AM-HighestAttnKeys", "AM-OMP-fast"])
def test_bfloat16_score_products_keep_the_error(small_block, method):
    b = small_block
    errors, values = {}, {}
    for score_dtype in ("float32", "bfloat16"):
        result = compact(b.keys, b.values, b.queries, 16, method, score_dtype=score_dtype)
        assert result.values.dtype == torch.float32
        values[score_dtype] = result.values
        errors[score_dtype] = evaluate(b.keys, b.values, result, b.heldout_queries).mean()["relative_l2"]
    assert not torch.equal(values["bfloat16"], values["float32"])  # the products did run in bfloat16
    assert errors["bfloat16"] < 1.05 * errors["float32"] + 0.005
    with pytest.raises(ValueError, match="score_dtype"):
        compact(b.keys, b.values, b.queries, 16, method, score_dtype="float16")


def test_fits_in_head_groups_match_one_batch(small_block):
    b = small_block
    whole = compact(b.keys, b.values, b.queries, [16, 12, 16, 9])  # ragged: padded slots in some heads
    grouped = compact(b.keys, b.values, b.queries, [16, 12, 16, 9], memory_bytes=1)  # one head per fit
    assert torch.equal(whole.indices, grouped.indices)
    torch.testing.assert_close(grouped.beta, whole.beta, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grouped.values, whole.values, rtol=1e-3, atol=1e-3)


def test_ablations_only_change_what_they_name(small_block):
    b = small_block
    full = compact(b.keys, b.values, b.queries, 15)
    zero = compact(b.keys, b.values, b.queries, 15, fit_beta=False)
    direct = compact(b.keys, b.values, b.queries, 15, fit_values=False)
    assert torch.equal(full.indices, zero.indices) and torch.equal(full.indices, direct.indices)
    assert (zero.beta == 0).all() and torch.equal(direct.beta, full.beta)
    assert torch.equal(direct.values, b.values.gather(1, full.indices.unsqueeze(-1).expand(-1, -1, 32)))


def test_method_metadata():
    method = get_method("AM-OMP-fast")
    options = method.make_options()
    assert (options.keys_per_step, options.refit_every) == (4, 2)
    assert math.isclose(options.beta_max, 7.0) and math.isclose(math.exp(options.beta_min), 1e-12)
    assert get_method("H2O+").query_source == "context-prefill"
    assert get_method("KVzip").query_source == "repeat-prefill"


def test_kvzip_can_leave_a_head_empty_without_nans():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(2, 64, 8, generator=g)
    queries = torch.randn(2, 32, 8, generator=g)
    queries[0] = 0  # head 0 attends uniformly (every score 1/T); head 1 has sharp peaks that win globally
    queries[1] *= 6
    for fit in (False, True):
        result = compact(keys, keys, queries, 4, "KVzip", fit_beta=fit, fit_values=fit)
        assert result.lengths.tolist() == [0, 8]
        assert torch.isneginf(result.beta[0]).all() and (result.indices[0] == -1).all()
        assert torch.isfinite(result.values).all() and torch.isfinite(result.beta[1]).all()


@pytest.mark.parametrize("method", ["AM-HighestAttnKeys", "AM-OMP-fast", "H2O+"])
def test_stage_timings_are_reported(small_block, method):
    result = compact(small_block.keys, small_block.values, small_block.queries, budget=8, method=method)
    assert set(result.timings) == {"selection", "beta", "values"}
    assert all(seconds >= 0 for seconds in result.timings.values()) and result.timings["selection"] > 0
    unchanged = compact(small_block.keys, small_block.values, small_block.queries, budget=10_000, method=method)
    assert unchanged.timings == {}  # nothing was solved
