"""The transformers adapter on tiny random Llama and Qwen3 models (GQA 4:2), built in the test."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from sglang_am.hf import (
    compact_prefix,
    forward_after_prefix,
    greedy_generate,
    model_fingerprint,
    pool_queries,
    recording_queries,
    use_sglang_am_attention,
)
from sglang_am.prefix import CompactedPrefix

COMMON = dict(
    vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0,
)


def _model(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**COMMON))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=16))
    return use_sglang_am_attention(model.eval())


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def model(request):
    return _model(request.param)


def _ids(length: int, seed: int) -> list[int]:
    return torch.randint(3, 97, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def _full_logits(model, document, question, **kwargs):
    with torch.no_grad():
        return model(torch.tensor([document + question]), **kwargs).logits[:, len(document) :]


def test_query_capture_shapes_and_gqa_pooling(model):
    with torch.no_grad(), recording_queries() as recorded:
        model(torch.tensor([_ids(12, 0)]))
    assert sorted(recorded) == [0, 1]
    queries = recorded[0][0]
    assert queries.shape == (1, 4, 12, 16)
    pooled = pool_queries(queries[0], num_kv_heads=2)
    assert pooled.shape == (2, 24, 16)
    # KV head 1 serves query heads 2 and 3, in that order.
    assert torch.equal(pooled[1, :12], queries[0, 2]) and torch.equal(pooled[1, 12:], queries[0, 3])


def test_identity_compaction_reproduces_full_context_logits(model):
    document, question = _ids(40, 1), _ids(6, 2)
    prefix = compact_prefix(model, document, budget=40, progress=False)
    assert prefix.num_slots == 40 and all((b == 0).all() for b in prefix.beta)
    logits, _ = forward_after_prefix(model, prefix, torch.tensor([question]))
    torch.testing.assert_close(logits, _full_logits(model, document, question), rtol=1e-4, atol=1e-4)


def test_new_tokens_take_positions_after_the_logical_length(model):
    # truncate keeps the first t tokens unchanged; the full model with the rest masked out and the
    # question at positions T, T+1, ... must give the same logits.
    document, question = _ids(40, 3), _ids(5, 4)
    prefix = compact_prefix(model, document, budget=16, method="truncate", progress=False)
    assert prefix.layer_slots == [16, 16] and prefix.logical_length == 40
    logits, _ = forward_after_prefix(model, prefix, torch.tensor([question]))
    mask = torch.ones(1, 45, dtype=torch.long)
    mask[0, 16:40] = 0
    expected = _full_logits(model, document, question, attention_mask=mask)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    # The same question at positions t, t+1, ... (no offset) would give different logits.
    shifted = _full_logits(model, document[:16], question)
    assert not torch.allclose(logits, shifted, atol=1e-3)


def test_bias_is_added_to_the_compacted_slots(model):
    # Two copies of every slot with beta = 0 is the same attention as one copy with beta = log 2.
    document, question = _ids(20, 5), _ids(4, 6)
    single = compact_prefix(model, document, budget=20, progress=False)
    doubled = CompactedPrefix(
        keys=[torch.cat([k, k], dim=1) for k in single.keys],
        values=[torch.cat([v, v], dim=1) for v in single.values],
        beta=[torch.cat([b, b], dim=1) for b in single.beta],
        logical_length=40, token_ids=document * 2, fingerprint=single.fingerprint, method="test",
    )
    weighted = CompactedPrefix(
        keys=single.keys, values=single.values, beta=[b + math.log(2) for b in single.beta],
        logical_length=40, token_ids=document * 2, fingerprint=single.fingerprint, method="test",
    )
    question_ids = torch.tensor([question])
    torch.testing.assert_close(
        forward_after_prefix(model, doubled, question_ids)[0],
        forward_after_prefix(model, weighted, question_ids)[0],
        rtol=1e-4, atol=1e-4,
    )
    unweighted = forward_after_prefix(model, CompactedPrefix(
        keys=single.keys, values=single.values, beta=single.beta, logical_length=40,
        token_ids=document * 2, fingerprint=single.fingerprint, method="test"), question_ids)[0]
    assert not torch.allclose(unweighted, forward_after_prefix(model, weighted, question_ids)[0], atol=1e-3)


@pytest.mark.parametrize(
    "query_source", ["context-prefill", "repeat-prefill", "self-study", "questions", "random", "ss-plus-repeat"]
)
def test_compaction_runs_for_every_query_source(model, query_source):
    document = _ids(48, 7)
    prefix = compact_prefix(
        model, document, budget=0.25, query_source=query_source, repeat_ids=[5, 6, 7],
        self_study_ids=[_ids(9, 20), _ids(5, 21)], question_ids=[_ids(6, 22), _ids(4, 23)], progress=False,
    )
    assert prefix.num_slots == 12 and prefix.logical_length == 48
    assert all(torch.isfinite(b).all() for b in prefix.beta)
    expected = {"self-study": 0.5, "repeat-prefill": 0.5} if query_source == "ss-plus-repeat" else {query_source: 1.0}
    assert prefix.timings["prefill_seconds"] > 0 and prefix.config["query_source"] == expected
    (generated,) = greedy_generate(model, prefix, [_ids(3, 8)], max_new_tokens=4)
    assert len(generated) == 4


def test_am_tracks_full_context_better_than_truncation(model):
    # Next-token distributions after the document: AM should stay closer to full context than keeping
    # the first t tokens.
    document = _ids(96, 9)
    questions = torch.tensor([_ids(4, 100 + i) for i in range(6)])
    with torch.no_grad():
        full = model(torch.cat([torch.tensor([document]).expand(6, -1), questions], dim=1)).logits[:, -1]
    def kl(method):
        prefix = compact_prefix(model, document, budget=0.25, method=method, progress=False)
        logits, _ = forward_after_prefix(model, prefix, questions)
        return torch.nn.functional.kl_div(logits[:, -1].log_softmax(-1), full.log_softmax(-1), log_target=True,
                                          reduction="batchmean")
    assert kl("AM-OMP") < kl("truncate")


def test_save_load_round_trip_and_refusals(model, tmp_path):
    prefix = compact_prefix(model, _ids(30, 10), budget=8, progress=False)
    path = prefix.save(tmp_path / "doc.safetensors")
    assert path == tmp_path / "doc.safetensors" and path.is_file()
    loaded = CompactedPrefix.load(path, expected_fingerprint=model_fingerprint(model))
    for a, b in zip(prefix.beta + prefix.keys + prefix.values, loaded.beta + loaded.keys + loaded.values):
        assert torch.equal(a, b)
    assert loaded.token_ids == prefix.token_ids and loaded.logical_length == 30 and loaded.method == prefix.method

    other = _model("llama" if model.config.model_type == "qwen3" else "qwen3", seed=1)
    with pytest.raises(ValueError, match="fingerprint"):
        CompactedPrefix.load(path, expected_fingerprint=model_fingerprint(other))
    with pytest.raises(ValueError, match="fingerprint"):
        forward_after_prefix(other, loaded, torch.tensor([[1, 2]]))

    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        CompactedPrefix.load(path)
    with pytest.raises(ValueError, match="cannot read"):
        CompactedPrefix.load(tmp_path / "nowhere.safetensors")


def test_fingerprint_sees_weights_and_geometry():
    a, b = _model("llama", seed=0), _model("llama", seed=0)
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.model.layers[1].self_attn.k_proj.weight[0, 0] += 1.0
    assert model_fingerprint(a) != model_fingerprint(b)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"budget": 0}, "budget"),
        ({"budget": 1.5}, "ratio"),
        ({"budget": 4, "query_source": "telepathy"}, "query_source"),
        ({"budget": 4, "query_source": "repeat-prefill"}, "repeat_ids"),
        ({"budget": 4, "query_source": "self-study"}, "self_study_ids"),
        ({"budget": 4, "query_source": "questions"}, "question_ids"),
        ({"budget": 4, "query_source": "questions", "question_ids": [[1], []]}, "question_ids"),
        ({"budget": 4, "query_source": {"random": 0.5, "context-prefill": 0.2}}, "sum to 1"),
        ({"budget": 4, "method": "nope"}, "method"),
    ],
)
def test_bad_arguments(model, kwargs, word):
    with pytest.raises(ValueError, match=word):
        compact_prefix(model, _ids(10, 0), progress=False, **kwargs)


def test_a_question_fit_reproduces_attention_at_that_questions_own_queries(model):
    """Fitted to a question's queries, the compacted layers attend like the full ones for that question."""
    from sglang_am.core import evaluate
    from sglang_am.core.plan import pool_queries
    from sglang_am.hf.compaction import _continuation_queries

    document, question = _ids(64, 30), _ids(8, 31)
    asked = compact_prefix(model, document, budget=0.0625, query_source="questions", question_ids=[question], progress=False)
    agnostic = compact_prefix(model, document, budget=0.0625, query_source="context-prefill", progress=False)
    with torch.no_grad():
        cache = model(torch.tensor([document]), use_cache=True).past_key_values
    document_kv = [(layer.keys[0], layer.values[0]) for layer in cache.layers]
    queries = _continuation_queries(model, document_kv, len(document), [question])
    heads = model.config.num_key_value_heads
    errors = {name: [float(evaluate(*document_kv[layer], (p.keys[layer], p.values[layer], p.beta[layer]),
                                    pool_queries(queries[layer], heads)).relative_l2.mean()) for layer in queries]
              for name, p in (("asked", asked), ("agnostic", agnostic))}
    assert asked.config["questions"] == 1
    assert all(mine < theirs for mine, theirs in zip(errors["asked"], errors["agnostic"])), errors


def test_template_tokens_are_kept_verbatim(model):
    document = _ids(40, 11)
    prefix = compact_prefix(model, document, budget=0.25, keep_first=5, keep_last=3, progress=False)
    assert prefix.num_slots == 5 + 8 + 3
    with torch.no_grad():
        cache = model(torch.tensor([document]), use_cache=True).past_key_values
    for layer in range(2):
        full_keys = cache.layers[layer].keys[0]
        assert torch.equal(prefix.keys[layer][:, :5], full_keys[:, :5])
        assert torch.equal(prefix.keys[layer][:, -3:], full_keys[:, -3:])
        assert (prefix.beta[layer][:, :5] == 0).all() and (prefix.beta[layer][:, -3:] == 0).all()
    with pytest.raises(ValueError, match="keep_first"):
        compact_prefix(model, document, budget=4, keep_first=30, keep_last=10, progress=False)


def test_chunked_compaction_splits_the_budget(model):
    document, question = _ids(60, 12), torch.tensor([_ids(4, 13)])
    chunked = compact_prefix(model, document, budget=0.2, chunk_size=20, progress=False)
    whole = compact_prefix(model, document, budget=0.2, progress=False)
    assert chunked.num_slots == whole.num_slots == 12
    assert not torch.equal(chunked.keys[0], whole.keys[0])  # each chunk keeps its own 4 slots
    # With the full budget every chunk is kept whole: chunking is then exact.
    exact = compact_prefix(model, document, budget=1.0, chunk_size=25, progress=False)
    logits, _ = forward_after_prefix(model, exact, question)
    torch.testing.assert_close(logits, _full_logits(model, document, question[0].tolist()), rtol=1e-4, atol=1e-4)


def test_nonuniform_head_budgets(model):
    proportions = {(0, 0): 0.4, (0, 1): 0.1, (1, 0): 0.2, (1, 1): 0.3}
    prefix = compact_prefix(model, _ids(50, 14), budget=0.1, head_proportions=proportions, progress=False)
    lengths = [(torch.isfinite(b)).sum(dim=1).tolist() for b in prefix.beta]
    assert lengths == [[8, 2], [4, 6]]  # p * 0.1 * 50 * 4 heads
    with pytest.raises(ValueError, match="ratio"):
        compact_prefix(model, _ids(50, 14), budget=5, head_proportions=proportions, progress=False)
    with pytest.raises(ValueError, match="layer 1"):
        compact_prefix(model, _ids(50, 14), budget=0.1, head_proportions={(0, 0): 0.5, (0, 1): 0.5}, progress=False)


def test_metrics_against_direct_full_context_computation(model):
    from sglang_am.hf import (
        continuation_logprobs,
        full_prefix,
        multiple_choice_accuracy,
        next_token_kl,
        reconstruction_log_perplexity,
    )

    document, prompt = _ids(30, 15), _ids(3, 16)
    reference = full_prefix(model, document)
    choices = [_ids(2, 17), _ids(4, 18)]
    scored = continuation_logprobs(model, reference, prompt, choices)
    for choice, logprobs in zip(choices, scored):
        with torch.no_grad():
            logits = model(torch.tensor([document + prompt + choice])).logits[0].log_softmax(-1)
        start = len(document) + len(prompt)
        expected = logits[start - 1 : start - 1 + len(choice)].gather(1, torch.tensor(choice).unsqueeze(1)).squeeze(1)
        torch.testing.assert_close(logprobs, expected, rtol=1e-4, atol=1e-4)

    # The model's own greedy next token is, by definition, the most likely single-token choice.
    with torch.no_grad():
        greedy = int(model(torch.tensor([document + prompt])).logits[0, -1].argmax())
    others = [t for t in range(3, 97) if t != greedy][:4]
    questions = [(prompt, [[o] for o in others[:2]] + [[greedy]] + [[o] for o in others[2:]], 2)]
    assert multiple_choice_accuracy(model, reference, questions).accuracy == 1.0

    answer = _ids(5, 19)
    full_nll = reconstruction_log_perplexity(model, reference, [(prompt, answer)])
    (answer_logprobs,) = continuation_logprobs(model, reference, prompt, [answer])
    assert full_nll == pytest.approx(-float(answer_logprobs.mean()), rel=1e-5)
    assert next_token_kl(model, reference, reference, [prompt]) == pytest.approx(0.0, abs=1e-6)
    compacted = compact_prefix(model, document, budget=0.2, method="AM-OMP", progress=False)
    assert next_token_kl(model, reference, compacted, [prompt]) > 0
    with pytest.raises(ValueError, match="prompt"):
        multiple_choice_accuracy(model, reference, [([], [[1]], 0)])


def test_continuation_queries_are_the_continuations_after_the_document(model):
    from sglang_am.hf.compaction import _continuation_queries

    document, continuation = _ids(20, 22), _ids(6, 23)
    with torch.no_grad():
        cache = model(torch.tensor([document]), use_cache=True).past_key_values
        with recording_queries() as recorded:
            model(torch.tensor([document + continuation]))
    document_kv = [(layer.keys[0], layer.values[0]) for layer in cache.layers]
    queries = _continuation_queries(model, document_kv, 20, [continuation, continuation[:3]])
    expected = recorded[1][0][0, :, 20:]  # the continuation's queries in one full forward
    assert queries[1].shape == (4, 9, 16)
    torch.testing.assert_close(queries[1][:, :6], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(queries[1][:, 6:], expected[:, :3], rtol=1e-4, atol=1e-4)


def test_on_policy_reextracts_self_study_queries_in_linear_layer_forwards(model):
    document, continuations = _ids(40, 24), [_ids(8, 25), _ids(5, 26)]
    calls = []
    hooks = [layer.register_forward_hook(lambda *_: calls.append(1)) for layer in model.model.layers]
    try:
        on = compact_prefix(model, document, budget=0.25, query_source="self-study",
                            self_study_ids=continuations, on_policy=True, progress=False)
    finally:
        for hook in hooks:
            hook.remove()
    layers = model.config.num_hidden_layers
    assert len(calls) == layers + 2 * layers  # one prefill, then capture + advance per layer
    off = compact_prefix(model, document, budget=0.25, query_source="self-study",
                         self_study_ids=continuations, progress=False)
    # Layer 0 sees the same queries either way; deeper layers see compacted layers below them.
    assert torch.equal(on.beta[0], off.beta[0])
    assert not torch.equal(on.beta[1], off.beta[1])
    with pytest.raises(ValueError, match="on_policy"):
        compact_prefix(model, document, budget=0.25, on_policy=True, progress=False)


def test_on_policy_advance_matches_a_full_forward_over_the_compacted_prefix(model):
    from sglang_am.hf.compaction import _OnPolicyContinuations

    document, continuation = _ids(30, 27), _ids(6, 28)
    prefix = compact_prefix(model, document, budget=0.3, progress=False)
    policy = _OnPolicyContinuations(model, [continuation], 30)
    for layer in range(model.config.num_hidden_layers):
        policy.advance(layer, prefix.keys[layer], prefix.values[layer], prefix.beta[layer])
    with torch.no_grad():
        final = model.model.norm(policy.hidden)
        logits = model.lm_head(final)
    expected, _ = forward_after_prefix(model, prefix, torch.tensor([continuation]))
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_batched_ragged_generation_matches_one_prompt_at_a_time(model):
    document = _ids(40, 29)
    prompts = [_ids(3, 30), _ids(7, 31), _ids(1, 32)]
    for prefix in (compact_prefix(model, document, budget=40, progress=False),
                   compact_prefix(model, document, budget=0.25, method="AM-OMP-fast", progress=False)):
        batched = greedy_generate(model, prefix, prompts, max_new_tokens=5)
        for prompt, answer in zip(prompts, batched):
            assert greedy_generate(model, prefix, [prompt], max_new_tokens=5) == [answer]
    # Against the full model: the identity prefix answers like plain greedy decoding with the document.
    prefix = compact_prefix(model, document, budget=40, progress=False)
    (answer,) = greedy_generate(model, prefix, [prompts[1]], max_new_tokens=5)
    sequence = document + prompts[1]
    for token in answer:
        with torch.no_grad():
            assert int(model(torch.tensor([sequence])).logits[0, -1].argmax()) == token
        sequence = sequence + [token]


def test_generation_stops_at_eos(model):
    prefix = compact_prefix(model, _ids(20, 33), budget=20, progress=False)
    (free,) = greedy_generate(model, prefix, [_ids(2, 34)], max_new_tokens=6)
    (stopped,) = greedy_generate(model, prefix, [_ids(2, 34)], max_new_tokens=6, eos_token_id=free[1])
    assert stopped == free[:2]


def test_text_chunking_with_one_chunk_is_kv_chunking(model):
    document = _ids(40, 7)
    kv = compact_prefix(model, document, budget=0.25, keep_first=1, progress=False)
    text = compact_prefix(model, document, budget=0.25, keep_first=1, chunk_size=39, chunking="text", progress=False)
    for a, b in zip(kv.keys + kv.values + kv.beta, text.keys + text.values + text.beta):
        torch.testing.assert_close(a, b)
    assert text.config["chunking"] == "text"


def test_text_chunks_are_rotated_to_their_place(model):
    document = _ids(50, 8)
    full = compact_prefix(model, document, budget=1.0, progress=False)
    text = compact_prefix(model, document, budget=1.0, keep_first=1, keep_last=3, chunk_size=15,
                          chunking="text", progress=False)
    assert text.layer_slots == full.layer_slots
    # Layer 0 keys see no context, only their token and position: after the RoPE shift every chunk's
    # keys (and the kept tail's) are the full prefill's. Deeper layers lost the cross-chunk context.
    torch.testing.assert_close(text.keys[0], full.keys[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(text.keys[1][:, 20:], full.keys[1][:, 20:], atol=1e-3)
    # Without the shift the keys would sit at the wrong positions.
    unshifted = compact_prefix(model, document[:1] + document[16:31], budget=1.0, progress=False)
    assert not torch.allclose(unshifted.keys[0][:, 1:], full.keys[0][:, 16:31], atol=1e-3)


def test_chunking_arguments_are_checked(model):
    with pytest.raises(ValueError, match="chunking"):
        compact_prefix(model, _ids(20, 0), budget=0.5, chunking="tokens", progress=False)
    with pytest.raises(ValueError, match="on_policy"):
        compact_prefix(model, _ids(20, 0), budget=0.5, chunking="text", chunk_size=5, on_policy=True,
                       query_source="self-study", self_study_ids=[[1, 2]], progress=False)


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_identity_compaction_on_more_architectures(kind):
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config_class, model_class = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "mistral": (MistralConfig, MistralForCausalLM)}[kind]
    other = use_sglang_am_attention(model_class(config_class(**COMMON)).eval())
    document, question = _ids(30, 1), _ids(5, 2)
    with torch.no_grad(), recording_queries() as recorded:
        other(torch.tensor([document]))
    assert recorded[1][0].shape == (1, 4, 30, 16)
    prefix = compact_prefix(other, document, budget=30, progress=False)
    logits, _ = forward_after_prefix(other, prefix, torch.tensor([question]))
    torch.testing.assert_close(logits, _full_logits(other, document, question), atol=1e-4, rtol=1e-4)


def test_attention_errors_are_zero_for_identity_and_grow_with_compaction(model):
    from sglang_am.hf import attention_errors

    document, prompts = _ids(60, 3), [_ids(4, 4), _ids(6, 5)]
    identity = attention_errors(model, compact_prefix(model, document, budget=60, progress=False), prompts)
    assert sorted(identity) == [0, 1]
    for errors in identity.values():
        assert errors.relative_l2.shape == (2,) and float(errors.relative_l2.max()) < 1e-4
        assert float(errors.mass_error.max()) < 1e-4
    compacted = attention_errors(model, compact_prefix(model, document, budget=0.1, progress=False), prompts)
    assert all(float(errors.relative_l2.mean()) > 1e-3 for errors in compacted.values())
