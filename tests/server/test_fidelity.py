"""The next-token KL of the fidelity guard, from SGLang's log-probability fields."""

import math

import pytest
import torch

from sglang_am.server.fidelity import next_token_kl, probed_logprobs, reference_tokens, summary


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


def test_sglang_log_probability_fields_are_read_and_summarised():
    meta = {"output_top_logprobs": [[(-0.1, 7, None), (-2.5, 3, None)]],
            "output_token_ids_logprobs": [[(-0.2, 7, None), (-3.0, 3, None)]]}
    reference, probed = reference_tokens(meta), probed_logprobs(meta)
    assert reference == [(7, -0.1), (3, -2.5)] and probed == {7: -0.2, 3: -3.0}
    p, q = [math.exp(-0.1), math.exp(-2.5)], [math.exp(-0.2), math.exp(-3.0)]
    p.append(1 - sum(p))
    q.append(1 - sum(q))
    assert next_token_kl(reference, probed) == pytest.approx(sum(a * math.log(a / b) for a, b in zip(p, q)))
    assert summary([0.1, 0.3]) == {"next_token_kl": 0.2, "next_token_kl_max": 0.3, "questions": 2}
