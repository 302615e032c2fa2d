"""The end-to-end figures of the fidelity guard, from SGLang's log-probability fields."""

import math

import pytest
import torch

from sglang_am.server.entrypoints.fidelity import (
    AnswerFigures,
    AnswerReference,
    agreement,
    next_token_kl,
    probed_logprobs,
    reference_top,
    summary,
)


def test_the_kl_over_the_top_tokens_and_a_rest_bucket_is_a_lower_bound_of_the_full_kl():
    generator = torch.Generator().manual_seed(0)
    full = torch.randn(1000, generator=generator).mul(3).log_softmax(0)
    compacted = (full + 0.5 * torch.randn(1000, generator=generator)).log_softmax(0)
    exact = float((full.exp() * (full - compacted)).sum())
    top = full.topk(20).indices.tolist()
    reference = [(token, float(full[token])) for token in top]
    bucketed = next_token_kl(reference, {token: float(compacted[token]) for token in top})
    assert 0 < bucketed <= exact + 1e-6
    assert next_token_kl(reference, {token: logprob for token, logprob in reference}) == pytest.approx(0, abs=1e-9)


def test_the_answer_positions_are_read_from_sglang_fields_after_the_prompt():
    # A 2-token prompt and a 2-token answer after the document (logprob_start_len at its end): input entry j
    # predicts the token j places after the document, so entries 2 and 3 predict the answer. Entry 0 has no
    # log-probability; the output's first entry predicts the token after the input, which nobody reads.
    top = lambda token: [(-0.1, token, None), (-2.5, token + 1, None)]
    meta = {"input_top_logprobs": [None, top(10), top(20), top(30)], "output_top_logprobs": [top(40)],
            "input_token_ids_logprobs": [None, [(-1.0, 1, None)], [(-0.2, 20, None)], [(-0.3, 30, None)]],
            "output_token_ids_logprobs": [[(-0.4, 40, None)]]}
    reference = reference_top(meta, prompt_length=2)
    assert reference == [[(20, -0.1), (21, -2.5)], [(30, -0.1), (31, -2.5)]]
    assert probed_logprobs(meta, prompt_length=2) == [{20: -0.2}, {30: -0.3}]
    answer = AnswerReference([5, 6], [20, 30], reference)
    assert answer.greedy == [20, 30] and answer.tokens == [20, 21, 30, 31]
    # Without an answer (the prompt alone teacher-forced), the output's entry predicts the answer's first token.
    unanswered = {**meta, "input_top_logprobs": meta["input_top_logprobs"][:2]}
    assert reference_top(unanswered, prompt_length=2) == [[(40, -0.1), (41, -2.5)]]
    assert AnswerReference([5, 6], [], reference_top(unanswered, 2)).greedy == [40]  # the most likely next token
    p, q = [math.exp(-0.1), math.exp(-2.5)], [math.exp(-0.2), math.exp(-3.0)]
    p.append(1 - sum(p))
    q.append(1 - sum(q))
    expected = sum(a * math.log(a / b) for a, b in zip(p, q))
    assert next_token_kl([(7, -0.1), (3, -2.5)], {7: -0.2, 3: -3.0}) == pytest.approx(expected)


def test_agreement_is_position_by_position_and_the_summary_weighs_questions_equally():
    assert agreement([1, 2, 3, 4], [1, 9, 3]) == [True, False, True, False]  # a shorter answer misses the rest
    figures = [AnswerFigures([True, False, True, False], [0.1, 0.3, 0.0, 0.2, 0.4]), AnswerFigures([True, True], [0.0, 0.6, 0.2])]
    assert summary(figures) == {"agreement": 0.75, "agreement_by_position": [1.0, 0.5, 1.0, 0.0],
                                "next_token_kl": 0.225, "next_token_kl_max": 0.6, "questions": 2}
