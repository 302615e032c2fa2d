"""``compact(..., key_bias=...)``: compacting a block whose keys already carry a logit bias (the step that
online re-compaction repeats), checked against the biased block's own attention."""

import math

import pytest
import torch

from sglang_am.core import compact
from sglang_am.core.attention import attention
from sglang_am.core.synthetic import clustered_block


def relative_error(block, queries, keys, values, beta):
    reference, reference_lse = attention(queries, block["keys"], block["values"], block["bias"])
    out, lse = attention(queries, keys, values, beta)
    return float((out - reference).norm() / reference.norm()), float((lse - reference_lse).abs().mean())


@pytest.fixture(scope="module")
def block():
    data = clustered_block(heads=2, length=512, head_dim=32, num_queries=512, num_heldout=128, seed=3)
    bias = 0.8 * torch.randn(2, 512, generator=torch.Generator().manual_seed(0))
    return {"keys": data.keys, "values": data.values, "bias": bias, "queries": data.queries, "heldout": data.heldout_queries}


def test_unchanged_heads_return_the_key_bias(block):
    result = compact(block["keys"], block["values"], block["queries"], [512, 64], key_bias=block["bias"])
    assert torch.equal(result.beta[0], block["bias"][0])
    assert result.lengths.tolist() == [512, 64]


@pytest.mark.parametrize("method", ["AM-HighestAttnKeys", "AM-OMP-fast", "H2O+"])
def test_the_bias_is_part_of_the_target_and_of_the_returned_beta(block, method):
    """Compacting with the bias reproduces the biased attention; ignoring it does not."""
    aware = compact(block["keys"], block["values"], block["queries"], 64, method, key_bias=block["bias"])
    blind = compact(block["keys"], block["values"], block["queries"], 64, method)
    aware_error = relative_error(block, block["heldout"], aware.keys, aware.values, aware.beta)
    blind_error = relative_error(block, block["heldout"], blind.keys, blind.values, blind.beta)
    assert aware_error[1] < blind_error[1]  # the mass (log-sum-exp) follows the biased original
    assert aware_error[0] < 1.05 * blind_error[0]
    if method == "H2O+":  # eviction keeps each kept key's own bias
        kept = block["bias"].gather(1, aware.indices)
        assert torch.equal(aware.beta, kept)


def test_a_constant_bias_only_shifts_beta(block):
    shift = 0.5
    plain = compact(block["keys"], block["values"], block["queries"], 64, beta_min=-10.0, beta_max=10.0)
    shifted = compact(block["keys"], block["values"], block["queries"], 64, beta_min=-10.0, beta_max=10.0,
                      key_bias=torch.full((2, 512), shift))
    assert torch.equal(plain.indices, shifted.indices)  # softmax weights, hence scores, are unchanged
    active = plain.beta > -9.0  # slots the NNLS left at its lower bound stay there with or without a shift
    assert active.float().mean() > 0.5
    torch.testing.assert_close(shifted.beta[active], plain.beta[active] + shift, atol=1e-3, rtol=0)
    torch.testing.assert_close(shifted.values, plain.values, atol=1e-3, rtol=1e-3)


def test_twice_compacted_block_matches_the_original(block):
    """Online re-compaction's step: compact, then compact the compacted block with its beta as key bias."""
    data = {**block, "bias": torch.zeros(2, 512)}
    first = compact(data["keys"], data["values"], data["queries"], 128)
    second = compact(first.keys, first.values, data["queries"], 64, key_bias=first.beta)
    ignored = compact(first.keys, first.values, data["queries"], 64)
    with_bias = relative_error(data, data["heldout"], second.keys, second.values, second.beta)
    without = relative_error(data, data["heldout"], ignored.keys, ignored.values, ignored.beta)
    assert with_bias[1] < without[1] and with_bias[0] < 0.5
    assert math.isfinite(with_bias[1])


def test_key_bias_shape_is_checked(block):
    with pytest.raises(ValueError, match="key_bias"):
        compact(block["keys"], block["values"], block["queries"], 64, key_bias=torch.zeros(2, 10))
