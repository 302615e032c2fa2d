"""Online re-compaction on the embedded recall model (transformers): bookkeeping exact against the plain
model, the physical cache bounded, and a compacted document still answering."""

import pytest
import torch

from sglang_am.hf.online import OnlineCompaction, OnlineSession
from sglang_am.recall_model import load_recall_model, recall_task


@pytest.fixture(scope="module")
def recall():
    model, tokenizer = load_recall_model(dtype=torch.float32)
    (doc,) = recall_task(num_pairs=60, num_questions=6, seed=21)
    return model, tokenizer, doc


def plain_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_identity_compactions_keep_the_plain_models_logits(recall):
    """Ratio 1 keeps every slot, so repeated 'compactions' must change nothing: positions continuing at
    the logical length, the cache rebuilt layer by layer, the (zero) bias carried. The bias carry itself
    is checked in test_key_bias.py."""
    model, tokenizer, doc = recall
    ids = tokenizer.encode(doc.text + "\n" + doc.questions[0].question)
    session = OnlineSession(model, OnlineCompaction(max_cache=len(ids) - 10, ratio=1.0))
    logits = [session.forward(ids[:-12])]
    logits += [session.forward([token]) for token in ids[-12:]]
    assert session.compactions >= 10
    torch.testing.assert_close(torch.cat(logits), plain_logits(model, ids), atol=1e-4, rtol=1e-4)


def test_the_cache_stays_bounded_and_the_document_still_answers(recall):
    model, tokenizer, doc = recall
    policy = OnlineCompaction(max_cache=100, ratio=0.5, keep_recent=20)
    session = OnlineSession(model, policy)
    session.forward(tokenizer.encode(doc.text))  # 121 tokens: compacted right away
    assert session.compactions == 1 and session.physical_length == 20 + round(0.5 * 101)
    answers = 0
    for q in doc.questions:
        for token in tokenizer.encode("\n" + q.question, add_special_tokens=False):
            logits = session.forward([token])
            assert session.physical_length < policy.max_cache
        answer = tokenizer.decode([int(logits[-1].argmax())]).strip()
        answers += answer == q.answer
        session.forward(tokenizer.encode(" " + q.answer, add_special_tokens=False))
    assert session.position == len(tokenizer.encode(doc.text)) + sum(
        len(tokenizer.encode("\n" + q.question, add_special_tokens=False))
        + len(tokenizer.encode(" " + q.answer, add_special_tokens=False))
        for q in doc.questions)
    assert session.compactions >= 2 and answers >= 1


def test_bad_policies_name_the_field():
    with pytest.raises(ValueError, match="ratio"):
        OnlineCompaction(max_cache=64, ratio=0)
    with pytest.raises(ValueError, match="max_cache"):
        OnlineCompaction(max_cache=10, keep_recent=20)
    with pytest.raises(ValueError, match="nope"):
        OnlineCompaction(max_cache=64, method="nope")
