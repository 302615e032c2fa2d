"""The transformers adapter on the real pretrained Gemma-3-270M (slow: the first use writes its directory, about a
minute)."""

import pytest
import torch

from sglang_am.hf import compact_prefix, forward_after_prefix, full_prefix, next_token_kl
from sglang_am.hf.gemma import gemma3_270m_directory, load_gemma3_270m
from sglang_am.quality import needle_in_document

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    return load_gemma3_270m(gemma3_270m_directory())


@pytest.fixture(scope="module")
def document(gemma):
    _, tokenizer = gemma
    (doc,) = needle_in_document(num_sentences=40, num_questions=6, seed=0)
    return doc, tokenizer.encode(doc.text)


def test_identity_compaction_matches_full_context(gemma, document):
    model, tokenizer = gemma
    doc, ids = document
    question = tokenizer.encode(" " + doc.questions[0].question + " Answer: room", add_special_tokens=False)
    prefix = compact_prefix(model, ids, budget=len(ids), progress=False)
    assert prefix.layer_slots[5] == len(ids) and prefix.layer_slots[0] == model.config.sliding_window - 1
    logits, _ = forward_after_prefix(model, prefix, torch.tensor([question]))
    with torch.no_grad():
        expected = model(torch.tensor([ids + question])).logits[:, len(ids):]
    torch.testing.assert_close(logits, expected, rtol=1e-3, atol=1e-3)


def test_attention_matching_beats_eviction_on_next_token_kl(gemma, document):
    model, tokenizer = gemma
    doc, ids = document
    prompts = [
        tokenizer.encode(" " + q.question + " Answer: room", add_special_tokens=False) for q in doc.questions
    ]
    reference = full_prefix(model, ids)
    kl = {
        method: next_token_kl(model, reference, compact_prefix(model, ids, budget=0.1, method=method, progress=False), prompts)
        for method in ("AM-HighestAttnKeys", "H2O+", "truncate")
    }
    assert kl["AM-HighestAttnKeys"] < kl["H2O+"] and kl["AM-HighestAttnKeys"] < kl["truncate"], kl
