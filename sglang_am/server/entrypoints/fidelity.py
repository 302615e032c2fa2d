"""The end-to-end half of the fidelity guard: what users see of a question's answer through a node.

A question's capture request teacher-forces the question and its answer after the full prefix, and asks
SGLang for the ``TOP_TOKENS`` most likely next tokens at every position that predicts the answer: the
full context's distributions there (``AnswerReference``). A node is then measured on the question by two
probes, served from it and counted nowhere:

- ``agreement``: the node's greedy answer against the full context's (the answer in the fit: generated
  greedily with the full prefix, or given by the client), position by position, as a user would read it;
- ``next_token_kl``: the question and its answer teacher-forced through the node, asking the
  log-probabilities of exactly the reference's top tokens at each answer position. The KL is taken over
  those tokens plus one bucket for the rest of the vocabulary: a lower bound of the full KL (merging
  outcomes never raises it) that is tight when the top tokens hold most of the mass.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

TOP_TOKENS = 20
# Probability floor inside the logs: a top token SGLang reports at -inf on one side stays finite.
_FLOOR = 1e-12


@dataclasses.dataclass(frozen=True)
class AnswerReference:
    """One question as the full context answers it: its prompt and answer (token ids after the document), and the
    full context's top tokens ``(token id, log-probability)`` at each position that predicts an answer token
    (without an answer: at the prompt's last position, which predicts the answer's first token)."""

    prompt: list[int]
    answer: list[int]
    top: list[list[tuple[int, float]]]

    @property
    def greedy(self) -> list[int]:
        """The tokens the node's greedy answer is compared with: the answer, or without one the full context's
        most likely next token."""
        return self.answer or [self.top[0][0][0]]

    @property
    def tokens(self) -> list[int]:
        """Every token whose log-probability a probe asks for (the reference's top tokens, at any position)."""
        return sorted({token for position in self.top for token, _ in position})


def answer_positions(meta_info: Mapping, prompt_length: int, field: str) -> list:
    """SGLang's per-position log-probability ``field`` (``top_logprobs`` or ``token_ids_logprobs``) at the answer
    positions of a request that teacher-forced prompt + answer after a document with ``logprob_start_len`` at
    the document's end: ``input_<field>[j]`` predicts the input token ``j`` places after the document, so the
    entries from ``prompt_length`` on predict the answer's tokens; without an answer, ``output_<field>[0]``
    predicts its first token."""
    return meta_info[f"input_{field}"][prompt_length:] or meta_info[f"output_{field}"][:1]


def reference_top(meta_info: Mapping, prompt_length: int) -> list[list[tuple[int, float]]]:
    """The full context's top tokens at each answer position, from a capture request's log-probabilities."""
    return [[(int(token), float(logprob)) for logprob, token, _ in position]
            for position in answer_positions(meta_info, prompt_length, "top_logprobs")]


def probed_logprobs(meta_info: Mapping, prompt_length: int) -> list[dict[int, float]]:
    """``{token id: log-probability}`` a teacher-forced probe reported at each answer position."""
    return [{int(token): float(logprob) for logprob, token, _ in position}
            for position in answer_positions(meta_info, prompt_length, "token_ids_logprobs")]


def next_token_kl(reference: Sequence[tuple[int, float]], compacted: Mapping[int, float]) -> float:
    """KL(full || compacted) over ``reference``'s tokens and one bucket for every other token."""
    p = [math.exp(logprob) for _, logprob in reference]
    q = [math.exp(compacted[token]) for token, _ in reference]
    p_rest, q_rest = max(0.0, 1.0 - sum(p)), max(0.0, 1.0 - sum(q))
    terms = [pi * (math.log(max(pi, _FLOOR)) - math.log(max(qi, _FLOOR))) for pi, qi in zip(p + [p_rest], q + [q_rest])
             if pi > 0]
    return max(0.0, sum(terms))


def agreement(expected: Sequence[int], served: Sequence[int]) -> list[bool]:
    """Per position of ``expected``: did the served answer have the same token there?"""
    return [index < len(served) and served[index] == token for index, token in enumerate(expected)]


@dataclasses.dataclass(frozen=True)
class AnswerFigures:
    """One question through a node: agreement per answer position, and the KL at each answer position."""

    agreed: list[bool]
    kls: list[float]


def summary(figures: Sequence[AnswerFigures]) -> dict:
    """What a node reports over its questions: the mean agreement (each question's share of answer tokens equal
    to the full context's), agreement by answer position, and the mean and largest next-token KL over every
    answer position."""
    kls = [kl for figure in figures for kl in figure.kls]
    longest = max(len(figure.agreed) for figure in figures)
    by_position = [[figure.agreed[index] for figure in figures if index < len(figure.agreed)] for index in range(longest)]
    return {
        "agreement": round(sum(sum(f.agreed) / len(f.agreed) for f in figures) / len(figures), 5),
        "agreement_by_position": [round(sum(column) / len(column), 3) for column in by_position],
        "next_token_kl": round(sum(kls) / len(kls), 5),
        "next_token_kl_max": round(max(kls), 5),
        "questions": len(figures),
    }
