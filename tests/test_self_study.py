"""Self-study generation with a real (tiny, random) Qwen3 model and a byte-level BPE tokenizer."""

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from sglang_am.hf import (
    SELF_STUDY_PROMPTS,
    compact_prefix,
    model_fingerprint,
    self_study_continuations,
    use_sglang_am_attention,
)
from sglang_am.prefix import CompactedPrefix


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(list(SELF_STUDY_PROMPTS.values()) * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return use_sglang_am_attention(Qwen3ForCausalLM(config).eval())


def test_continuations_start_with_the_starter_and_are_seeded(model, tokenizer):
    document = tokenizer.encode("The keeper lit the lamp at nine every night.")
    runs = [self_study_continuations(model, tokenizer, document, max_new_tokens=8, seed=5) for _ in range(2)]
    assert runs[0] == runs[1]
    assert len(runs[0]) == 4
    for kind, continuation in zip(SELF_STUDY_PROMPTS, runs[0]):
        starter = tokenizer.encode("\n\n" + SELF_STUDY_PROMPTS[kind], add_special_tokens=False)
        assert continuation[: len(starter)] == starter
        assert len(starter) < len(continuation) <= len(starter) + 8
    other = self_study_continuations(model, tokenizer, document, max_new_tokens=8, seed=6)
    assert other != runs[0]
    with pytest.raises(ValueError, match="kinds"):
        self_study_continuations(model, tokenizer, document, kinds=["poem"])


def test_self_study_queries_change_the_compaction(model, tokenizer):
    document = tokenizer.encode("The keeper lit the lamp at nine every night. " * 4)
    continuations = self_study_continuations(model, tokenizer, document, samples_per_kind=2, max_new_tokens=6)
    assert len(continuations) == 8
    study = compact_prefix(model, document, budget=0.25, query_source="self-study",
                           self_study_ids=continuations, progress=False)
    context = compact_prefix(model, document, budget=0.25, progress=False)
    assert study.timings["self_study_seconds"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(study.beta, context.beta))


def test_documented_transformers_example_runs(model, tokenizer, tmp_path, monkeypatch):
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parent.parent / "docs" / "transformers.md").read_text()
    section = page.split("## With a transformers model", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    namespace = {"path": str(tmp_path / "model"), "text": "The keeper lit the lamp at nine. " * 8,
                 "questions": ["When was the lamp lit?", "Who lit it?"]}
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/transformers.md example", "exec"), namespace)
    assert len(namespace["answers"]) == 2 and all(1 <= len(a) <= 32 for a in namespace["answers"])
    (saved,) = (tmp_path / "compacted").iterdir()  # the example's one file, whatever its name
    loaded = CompactedPrefix.load(saved, expected_fingerprint=model_fingerprint(namespace["model"]))
    assert loaded.token_ids == namespace["prefix"].token_ids
