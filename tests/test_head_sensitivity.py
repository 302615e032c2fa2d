"""Per-head sensitivity curves and the budgets they give, on a tiny random Qwen3 model (2 layers, 2 KV heads)."""

import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Qwen3Config, Qwen3ForCausalLM

from sglang_am import load_head_proportions
from sglang_am.hf import compact_prefix
from sglang_am.hf.head_sensitivity import SensitivityDocument, _with_head, _without_span, head_sensitivity_curves


def _model():
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
    return Qwen3ForCausalLM(config).eval()


def _ids(length, seed):
    return torch.randint(3, 97, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_splicing_one_head_changes_only_that_head():
    model = _model()
    document = _ids(60, 0)
    small, large = (compact_prefix(model, document, ratio, progress=False) for ratio in (0.1, 0.5))
    mixed = _with_head(model, small, large, layer=1, head=0)
    width = large.keys[1].shape[1]
    assert all(k.shape[1] == width for k in mixed.keys)  # every layer padded to the widest
    assert torch.equal(mixed.keys[0][:, : small.keys[0].shape[1]], small.keys[0])
    assert torch.equal(mixed.keys[1][0], large.keys[1][0])
    assert torch.equal(mixed.keys[1][1, : small.keys[1].shape[1]], small.keys[1][1])
    assert torch.isneginf(mixed.beta[1][1, small.keys[1].shape[1] :]).all()  # the narrow head is padded


def test_curves_have_one_row_per_head_and_agree_at_the_baseline():
    model = _model()
    documents = [SensitivityDocument(_ids(80, seed), keep_first=1, prompts=[_ids(4, 10 + seed), _ids(3, 20 + seed)])
                 for seed in range(2)]
    sweep = [0.0, 0.05, 0.25, 1.0]
    curves = head_sensitivity_curves(model, documents, sweep, baseline_ratio=0.05, max_new_tokens=3, progress=False)
    assert curves.heads == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert curves.losses.shape == (4, 4)
    # At the baseline ratio every head's mix is the baseline itself.
    assert torch.allclose(curves.losses[:, 1], curves.losses[0, 1].expand(4), atol=1e-9)
    # Removing a head's whole span hurts differently from head to head, and the budgets sum to 1.
    assert len(set(round(v, 9) for v in curves.losses[:, 0].tolist())) > 1
    proportions = curves.proportions()
    assert abs(sum(proportions.values()) - 1) < 1e-9
    assert load_head_proportions({f"L{l}H{h}": p for (l, h), p in proportions.items()}) == proportions


def test_a_sliding_window_model_gets_curves_for_its_global_heads_only():
    """Gemma-3-style: window layers keep their window (ratio 0 masks only the global layers' spans), and
    prompts of different lengths are answered one by one."""
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8,
                              max_position_embeddings=512,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    model = Gemma3ForCausalLM(config).eval()
    document = SensitivityDocument(_ids(60, 3), keep_first=0, prompts=[_ids(4, 4), _ids(6, 5)])
    curves = head_sensitivity_curves(model, [document], [0.0, 0.1, 1.0], baseline_ratio=0.1, max_new_tokens=3,
                                     progress=False)
    assert curves.heads == [(1, 0)]
    assert abs(float(curves.losses[0, 2])) < 1e-4  # the head uncompacted: the full context's own answers
    assert float(curves.losses[0, 0]) > float(curves.losses[0, 2])  # the global span removed costs something
    masked = _without_span(model, compact_prefix(model, document.input_ids, 0.1, progress=False), 0)
    assert torch.isfinite(masked.beta[0]).all() and torch.isneginf(masked.beta[1]).all()
