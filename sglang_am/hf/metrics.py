"""Quality metrics of a compacted prefix, computed the way the paper does, with any transformers model.

Every metric takes a ``CompactedPrefix``; the full-context reference is the same document compacted at
budget = T (``full_prefix``), which is the uncompacted cache with beta = 0, so both sides run the same
code. Inputs are token ids; tokenisation is the caller's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from ..core.evaluate import CompactionError, evaluate
from ..core.plan import pool_queries
from ..prefix import CompactedPrefix
from .attention import recording_queries
from .compaction import _sliding_layers, compact_prefix, forward_after_prefix, right_padded


def full_prefix(model: PreTrainedModel, input_ids: Sequence[int]) -> CompactedPrefix:
    """The uncompacted document as a prefix (every token kept, beta = 0): the full-context reference."""
    return compact_prefix(model, input_ids, budget=len(input_ids), progress=False)


def continuation_logprobs(
    model: PreTrainedModel, prefix: CompactedPrefix, prompt: Sequence[int], continuations: Sequence[Sequence[int]]
) -> list[torch.Tensor]:
    """Log-probabilities of each continuation's tokens after ``prefix + prompt`` (one batched forward)."""
    if not continuations or any(len(c) == 0 for c in continuations):
        raise ValueError("continuations must be non-empty token lists")
    rows, _ = right_padded([list(prompt) + list(c) for c in continuations], next(model.parameters()).device)
    logits, _ = forward_after_prefix(model, prefix, rows)
    logprobs = logits.float().log_softmax(dim=-1)
    start = len(prompt)
    out = []
    for row, continuation in enumerate(continuations):
        # The token at position start + i is predicted by the logits at start + i - 1 (the prompt's
        # last token predicts the first; with an empty prompt that is the document's last token, which is
        # not in this forward, so prompts must be non-empty).
        predicted = logprobs[row, start - 1 : start - 1 + len(continuation)]
        target = torch.tensor(continuation, device=predicted.device).unsqueeze(1)
        out.append(predicted.gather(1, target).squeeze(1))
    return out


@dataclass(frozen=True)
class ChoiceResult:
    accuracy: float
    predictions: list[int]


def multiple_choice_accuracy(
    model: PreTrainedModel,
    prefix: CompactedPrefix,
    questions: Sequence[tuple[Sequence[int], Sequence[Sequence[int]], int]],
    length_normalize: bool = False,
) -> ChoiceResult:
    """Accuracy of picking the most likely choice: ``questions`` are ``(prompt_ids, choice_ids, answer)``."""
    if not questions:
        raise ValueError("questions is empty")
    predictions = []
    for prompt, choices, _ in questions:
        if not prompt:
            raise ValueError("each question needs a non-empty prompt")
        scores = [lp.mean() if length_normalize else lp.sum() for lp in continuation_logprobs(model, prefix, prompt, choices)]
        predictions.append(int(torch.stack(scores).argmax()))
    correct = sum(int(p == answer) for p, (_, _, answer) in zip(predictions, questions))
    return ChoiceResult(accuracy=correct / len(questions), predictions=predictions)


def reconstruction_log_perplexity(
    model: PreTrainedModel, prefix: CompactedPrefix, samples: Sequence[tuple[Sequence[int], Sequence[int]]]
) -> float:
    """Mean token NLL of ``(prompt_ids, answer_ids)`` pairs under ``prefix`` (the paper's reconstruction
    loss when the answers are the full-context model's own greedy answers)."""
    if not samples:
        raise ValueError("samples is empty")
    total, count = 0.0, 0
    for prompt, answer in samples:
        if not prompt:
            raise ValueError("each sample needs a non-empty prompt")
        (logprobs,) = continuation_logprobs(model, prefix, prompt, [answer])
        total -= float(logprobs.sum())
        count += len(answer)
    return total / count


def next_token_kl(
    model: PreTrainedModel, reference: CompactedPrefix, prefix: CompactedPrefix, prompts: Sequence[Sequence[int]]
) -> float:
    """Mean KL(reference || prefix) of the next-token distribution after each prompt."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be non-empty token lists")
    total = 0.0
    for prompt in prompts:
        ids = torch.tensor([list(prompt)], device=next(model.parameters()).device)
        expected = forward_after_prefix(model, reference, ids)[0][0, -1].float().log_softmax(-1)
        actual = forward_after_prefix(model, prefix, ids)[0][0, -1].float().log_softmax(-1)
        total += float((expected.exp() * (expected - actual)).sum())
    return total / len(prompts)


def attention_errors(
    model: PreTrainedModel, prefix: CompactedPrefix, prompts: Sequence[Sequence[int]]
) -> dict[int, CompactionError]:
    """Per compacted layer, per KV head: how well the prefix reproduces attention for held-out queries.

    The queries are each prompt's last token after the full document (full-context states, so every
    layer is judged on the same inputs); the prompt's own keys/values are the suffix both sides attend
    to, which is where beta matters. Errors are averaged over prompts (``CompactionError`` per layer).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be non-empty token lists")
    device = next(model.parameters()).device
    document, length = list(prefix.token_ids), prefix.logical_length
    global_layers = [i for i, window in enumerate(_sliding_layers(model)) if not window]
    totals: dict[int, list[CompactionError]] = {layer: [] for layer in global_layers}
    for prompt in prompts:
        with torch.no_grad(), recording_queries() as recorded:
            cache = model(torch.tensor([document + list(prompt)], device=device), use_cache=True).past_key_values
        for layer in global_layers:
            keys, values = cache.layers[layer].keys[0], cache.layers[layer].values[0]
            queries = pool_queries(recorded[layer][0][0][:, -1:], keys.shape[0])
            compacted = tuple(t.to(keys) for t in (prefix.keys[layer], prefix.values[layer], prefix.beta[layer]))
            totals[layer].append(evaluate(
                keys[:, :length], values[:, :length], compacted, queries,
                scale=getattr(model.model.layers[layer].self_attn, "scaling", None),
                suffix_keys=keys[:, length:], suffix_values=values[:, length:],
            ))
    mean = lambda errors, name: torch.stack([getattr(e, name) for e in errors]).mean(dim=0)
    return {
        layer: CompactionError(*(mean(errors, name) for name in ("relative_l2", "cosine", "lse_error", "mass_error")))
        for layer, errors in totals.items()
    }
