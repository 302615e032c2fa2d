"""Gemma-3-style models: sliding-window layers keep their window uncompacted; global layers are compacted."""

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from sglang_am.hf import compact_prefix, forward_after_prefix, greedy_generate, use_sglang_am_attention
from sglang_am.hf.compaction import _OnPolicyContinuations

WINDOW = 8


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=WINDOW, max_position_embeddings=512,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    )
    return use_sglang_am_attention(Gemma3ForCausalLM(config).eval())


def _ids(length, seed):
    return torch.randint(3, 97, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_identity_compaction_reproduces_full_context(model):
    document, question = _ids(30, 1), _ids(5, 2)
    prefix = compact_prefix(model, document, budget=30, progress=False)
    assert prefix.layer_slots == [WINDOW - 1, 30, WINDOW - 1, 30]
    logits, _ = forward_after_prefix(model, prefix, torch.tensor([question]))
    with torch.no_grad():
        expected = model(torch.tensor([document + question])).logits[:, 30:]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_window_layers_keep_their_original_window(model):
    document = _ids(40, 3)
    prefix = compact_prefix(model, document, budget=0.2, method="AM-OMP-fast", progress=False)
    with torch.no_grad():
        cache = model(torch.tensor([document]), use_cache=True).past_key_values
    for layer in (0, 2):
        assert torch.equal(prefix.keys[layer], cache.layers[layer].keys[0])
        assert (prefix.beta[layer] == 0).all()
    assert prefix.layer_slots[1] == prefix.layer_slots[3] == 8


@pytest.mark.parametrize("query_source", ["context-prefill", "repeat-prefill"])
def test_on_policy_states_match_a_full_forward_past_the_window(model, query_source):
    document, continuation = _ids(40, 4), _ids(12, 5)  # longer than the window
    prefix = compact_prefix(model, document, budget=0.25, query_source=query_source, repeat_ids=[5, 6],
                            progress=False)
    policy = _OnPolicyContinuations(model, [continuation], 40)
    for layer in range(4):
        policy.advance(layer, prefix.keys[layer], prefix.values[layer], prefix.beta[layer])
    with torch.no_grad():
        logits = model.lm_head(model.model.norm(policy.hidden))
    expected, _ = forward_after_prefix(model, prefix, torch.tensor([continuation]))
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_on_policy_self_study_and_generation(model):
    document = _ids(40, 6)
    prefix = compact_prefix(model, document, budget=0.25, query_source="self-study",
                            self_study_ids=[_ids(10, 7), _ids(6, 8)], on_policy=True, progress=False)
    prompts = [_ids(3, 9), _ids(3, 10)]
    batched = greedy_generate(model, prefix, prompts, max_new_tokens=4)
    assert batched == [greedy_generate(model, prefix, [p], max_new_tokens=4)[0] for p in prompts]
    with pytest.raises(ValueError, match="ragged"):
        greedy_generate(model, prefix, [_ids(3, 9), _ids(5, 10)], max_new_tokens=2)


@pytest.mark.parametrize("query_source", ["self-study", "ss-plus-repeat"])
def test_off_policy_self_study_uses_the_documents_window(model, query_source):
    document, continuations = _ids(40, 11), [_ids(10, 12)]
    prefix = compact_prefix(model, document, budget=0.25, query_source=query_source, repeat_ids=[5, 6],
                            self_study_ids=continuations, progress=False)
    assert prefix.layer_slots == [WINDOW - 1, 10, WINDOW - 1, 10]
    with torch.no_grad():
        window = model(torch.tensor([document]), use_cache=True).past_key_values.layers[0].keys[0]
    assert torch.equal(prefix.keys[0], window)  # the first copy's window, also with repeat-prefill


def test_compacted_windows_take_the_span_budget_in_source_order(model):
    document = _ids(40, 13)
    prefix = compact_prefix(model, document, budget=0.1, compact_windows=True, progress=False)
    assert prefix.layer_slots == [4, 4, 4, 4]
    with torch.no_grad():
        window = model(torch.tensor([document]), use_cache=True).past_key_values.layers[0].keys[0]  # [H, 7, D]
    for head in range(window.shape[0]):  # selected window keys, in the order of the tokens they came from
        matches = [int((window[head] == key).all(dim=1).nonzero()) for key in prefix.keys[0][head]]
        assert matches == sorted(matches) and len(set(matches)) == 4
    assert torch.isfinite(prefix.beta[0]).all() and bool(prefix.beta[0].ne(0).any())
    # A budget at least the window keeps it verbatim, as without the option.
    verbatim = compact_prefix(model, document, budget=0.25, compact_windows=True, progress=False)
    assert verbatim.layer_slots == [WINDOW - 1, 10, WINDOW - 1, 10] and (verbatim.beta[0] == 0).all()


@pytest.mark.parametrize("on_policy", [False, True])
def test_compacted_windows_decode_step_by_step_as_in_one_pass(model, on_policy):
    """Decoding one token at a time, the window cache drops the compacted slots a window behind, and the
    beta of the remaining ones must follow them (``_visible_beta``): the same logits as one forward."""
    document, continuation = _ids(40, 14), _ids(14, 15)  # longer than the window
    prefix = compact_prefix(model, document, budget=0.1, query_source="self-study", self_study_ids=[_ids(10, 16)],
                            on_policy=on_policy, compact_windows=True, progress=False)
    expected, _ = forward_after_prefix(model, prefix, torch.tensor([continuation]))
    cache, steps = None, []
    for token in continuation:
        logits, cache = forward_after_prefix(model, prefix, torch.tensor([[token]]), cache)
        steps.append(logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, dim=1), expected, rtol=1e-4, atol=1e-4)
