"""Self-study continuations (after Cartridges): the model answers generic prompts about the document;
the queries of those answers are reference queries that look like real follow-up traffic."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..prompts import SELF_STUDY_PROMPTS, instruction_ids


def self_study_continuations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    input_ids: Sequence[int],
    kinds: Sequence[str] = tuple(SELF_STUDY_PROMPTS),
    samples_per_kind: int = 1,
    max_new_tokens: int = 128,
    temperature: float = 0.7,
    top_p: float = 0.8,
    top_k: int = 20,
    seed: int = 0,
) -> list[list[int]]:
    """Starter + sampled answer token ids for each prompt kind, to pass as ``self_study_ids``.

    The starter is ``"\\n\\n" + prompt`` after the document, closed into an assistant turn when the
    tokenizer has a chat template (``instruction_ids``); ``input_ids`` should then come from
    ``document_prompt`` so the document sits inside the user turn. Sampling uses
    the paper's non-thinking settings by default (T=0.7, top-p 0.8, top-k 20).
    """
    unknown = sorted(set(kinds) - set(SELF_STUDY_PROMPTS))
    if unknown or not kinds:
        raise ValueError(f"kinds must be taken from {sorted(SELF_STUDY_PROMPTS)}, got {list(kinds)}")
    if samples_per_kind < 1 or max_new_tokens < 1:
        raise ValueError("samples_per_kind and max_new_tokens must be >= 1")
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    continuations = []
    for kind in kinds:
        starter = instruction_ids(tokenizer, "\n\n" + SELF_STUDY_PROMPTS[kind])
        prompt = torch.tensor([list(input_ids) + starter], device=device)
        with torch.no_grad():
            output = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                do_sample=True,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                max_new_tokens=max_new_tokens,
                num_return_sequences=samples_per_kind,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            )
        for row in output:
            answer = row[prompt.shape[1] :].tolist()
            if tokenizer.eos_token_id in answer:
                answer = answer[: answer.index(tokenizer.eos_token_id) + 1]
            continuations.append(starter + answer)
    return continuations
