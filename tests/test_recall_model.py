"""The embedded recall model: a committed Qwen3 checkpoint that recalls keys at 1-2k tokens."""

import json

import pytest

from sglang_am.recall_model import CHECKPOINT_DIR, build_tokenizer, load_recall_model, recall_task
from sglang_am.recall_model.train import encode, evaluate


@pytest.fixture(scope="module")
def recall_model():
    return load_recall_model()


def test_tokenizer_is_one_token_per_word_and_drops_marks():
    tokenizer = build_tokenizer()
    (document,) = recall_task(num_pairs=3, num_questions=1, num_choices=2, seed=0)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(document.text)["input_ids"])
    assert tokens[0] == "<bos>" and len(tokens) == 1 + 2 * 3 and tokens[1].startswith("K")
    question = tokenizer.convert_ids_to_tokens(tokenizer(document.questions[0].question, add_special_tokens=False)["input_ids"])
    assert question[:5] == ["What", "is", "the", "value", "of"] and question[-1].startswith("K")
    assert tokenizer.unk_token_id not in tokenizer(document.text)["input_ids"]


def test_committed_checkpoint_matches_its_tokenizer_and_record(recall_model):
    model, tokenizer = recall_model
    assert model.config.model_type == "qwen3" and model.config.vocab_size == len(build_tokenizer())
    assert tokenizer.get_vocab() == build_tokenizer().get_vocab()
    record = json.loads((CHECKPOINT_DIR / "training.json").read_text())
    assert record["seconds"] <= 35 * 60
    size = sum(f.stat().st_size for f in CHECKPOINT_DIR.iterdir())
    assert size < 20 * 2**20


@pytest.mark.parametrize("pairs", [500, 900])
def test_recall_with_full_context_at_1k_to_2k_tokens(recall_model, pairs):
    model, tokenizer = recall_model
    (document,) = recall_task(num_pairs=pairs, num_questions=32, num_choices=2, seed=777)
    ids, _ = encode(tokenizer, document, document.questions)
    assert 1000 <= len(ids) <= 2100
    assert evaluate(model, tokenizer, pairs, documents=2, seed=777) >= 0.95
