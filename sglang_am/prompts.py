"""Token ids around a document, in the tokenizer's chat template when it has one, and the instructions
both adapters append to it (the repeat instruction, the self-study prompts).

A document sits in the user turn: ``[template head][document][instruction][end of turn + assistant
header]``. The head and everything after the document stay uncompacted (``keep_first`` and the
question), so these helpers return the pieces separately. Without a chat template the document is
plain text (with the tokenizer's special tokens, e.g. ``<bos>``) and instructions follow it directly.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

REPEAT_INSTRUCTION = "\nRepeat the previous context."
# Our wording of the paper's four prompt kinds (the reference texts are not published in the paper).
SELF_STUDY_PROMPTS = {
    "summarize": "Summarize the document above in a few sentences.",
    "structure_json": "Rewrite the key facts of the document above as a JSON object.",
    "aggregate": "List every name, number, date and key term that appears in the document above.",
    "3_question": "Write three multiple-choice questions about the document above and answer each one.",
}
_SENTINEL = "\u2063sglang-am document\u2063"  # never produced by a tokenizer's own text


@dataclass(frozen=True)
class DocumentPrompt:
    """``input_ids`` = template head + document; ``keep_first`` = length of the head (kept verbatim)."""

    input_ids: list[int]
    keep_first: int


def _rendered_around_document(tokenizer: PreTrainedTokenizerBase, instruction: str) -> tuple[str, str]:
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": _SENTINEL + instruction}], tokenize=False, add_generation_prompt=True
    )
    head, found, tail = rendered.partition(_SENTINEL)
    if not found:
        raise ValueError("the tokenizer's chat template does not render the user message verbatim")
    return head, tail


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def document_prompt(tokenizer: PreTrainedTokenizerBase, document: str) -> DocumentPrompt:
    """The ids a request starts with when it carries ``document`` (the part a compacted prefix replaces)."""
    document_ids = tokenizer.encode(document, add_special_tokens=False)
    if not has_chat_template(tokenizer):
        # The tokenizer's leading special tokens (e.g. <bos>) are the head; trailing ones (an <eos>) are
        # dropped because questions follow the document.
        ids = tokenizer.encode(document)
        head = next(k for k in range(len(ids) - len(document_ids) + 1) if ids[k : k + len(document_ids)] == document_ids)
        return DocumentPrompt(ids[:head] + document_ids, keep_first=head)
    head, _ = _rendered_around_document(tokenizer, "")
    head_ids = tokenizer.encode(head, add_special_tokens=False)
    return DocumentPrompt(head_ids + document_ids, keep_first=len(head_ids))


def instruction_ids(tokenizer: PreTrainedTokenizerBase, instruction: str) -> list[int]:
    """Ids following the document to ask ``instruction``: the rest of the user turn and, with a chat
    template, the end of turn and the assistant header, so the model's answer comes next."""
    if not has_chat_template(tokenizer):
        return tokenizer.encode(instruction, add_special_tokens=False)
    _, tail = _rendered_around_document(tokenizer, instruction)
    return tokenizer.encode(tail, add_special_tokens=False)


def repeat_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens between the two copies of the document for ``repeat-prefill``:
    ``{C}`` + these + ``{C}`` teacher-forces the model repeating its context."""
    return instruction_ids(tokenizer, REPEAT_INSTRUCTION)
