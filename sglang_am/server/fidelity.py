"""The end-to-end half of the fidelity guard: the next-token KL at the questions' answer positions.

A question's capture request (document + question, one greedy token) already computes the full-context
next-token distribution there; it asks SGLang for its ``TOP_TOKENS`` most likely tokens. Once the
document is installed, a probe request per question (served from the compacted node, counted nowhere)
asks for the log-probabilities of exactly those tokens. The KL is taken over those tokens plus one
bucket for the rest of the vocabulary: a lower bound of the full KL (merging outcomes never raises it)
that is tight when the top tokens hold most of the mass, as they do at an answer position.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

TOP_TOKENS = 20
# Probability floor inside the logs: a top token SGLang reports at -inf on one side stays finite.
_FLOOR = 1e-12


def reference_tokens(meta_info: Mapping) -> list[tuple[int, float]]:
    """``(token id, log-probability)`` of the full context's top tokens at the first generated position."""
    return [(int(token), float(logprob)) for logprob, token, _ in meta_info["output_top_logprobs"][0]]


def probed_logprobs(meta_info: Mapping) -> dict[int, float]:
    """``{token id: log-probability}`` a probe reported for the tokens it asked about."""
    return {int(token): float(logprob) for logprob, token, _ in meta_info["output_token_ids_logprobs"][0]}


def next_token_kl(reference: Sequence[tuple[int, float]], compacted: Mapping[int, float]) -> float:
    """KL(full || compacted) over ``reference``'s tokens and one bucket for every other token."""
    p = [math.exp(logprob) for _, logprob in reference]
    q = [math.exp(compacted[token]) for token, _ in reference]
    p_rest, q_rest = max(0.0, 1.0 - sum(p)), max(0.0, 1.0 - sum(q))
    terms = [pi * (math.log(max(pi, _FLOOR)) - math.log(max(qi, _FLOOR))) for pi, qi in zip(p + [p_rest], q + [q_rest])
             if pi > 0]
    return max(0.0, sum(terms))


def summary(kls: Sequence[float]) -> dict:
    """What a document reports: the mean and the largest KL over its questions."""
    return {"next_token_kl": round(sum(kls) / len(kls), 5), "next_token_kl_max": round(max(kls), 5), "questions": len(kls)}
