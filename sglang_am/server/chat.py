"""Documents given as chat messages, rendered by the server's own chat API.

``POST /am/documents`` with ``messages`` (the leading messages of the conversations to come, for example a
system message holding the document) is registered as the token ids that every
``/v1/chat/completions`` request starting with those messages will have. SGLang's chat handler
(``OpenAIServingChat._process_messages``, with the model's template or ``--chat-template``) renders the
messages followed by each of ``PROBES``, user turns that differ from their first character on; the
document is the longest common prefix of those renders. Everything up to there is fixed by the leading
messages whatever turn follows; past it, the next turn (or text merged across the boundary by the
tokenizer) can change the tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from http import HTTPStatus

from .errors import DocumentError

ROLES = ("system", "developer", "user", "assistant")
MAX_MESSAGES = 64
# The next user turn: a letter, a digit after a newline, a space, punctuation, so that neither the
# template's text nor a tokenizer merge across the boundary is mistaken for part of the document.
PROBES = ("A", "\n1", " z?", "1.")


def checked_messages(messages, max_characters: int, name: str = "messages") -> tuple[tuple[str, str], ...]:
    """``messages`` (the field ``name``) as ``((role, content), ...)``: 1 to ``MAX_MESSAGES`` of them, text content only."""
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not 1 <= len(messages) <= MAX_MESSAGES:
        raise ValueError(f"{name} must be a list of 1 to {MAX_MESSAGES} chat messages")
    checked, total = [], 0
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or set(message) != {"role", "content"}:
            raise ValueError(f'{name}[{index}] must be an object with exactly "role" and "content"')
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise ValueError(f"{name}[{index}].role must be one of {list(ROLES)}, got {str(role)[:40]!r}")
        if not isinstance(content, str) or not content:
            raise ValueError(f"{name}[{index}].content must be a non-empty string (documents are text)")
        total += len(content)
        checked.append((role, content))
    if total > max_characters:
        raise ValueError(f"{name} hold {total} characters; this server takes at most {max_characters}")
    return tuple(checked)


def common_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading token ids ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def common_prefix(renders: Sequence[Sequence[int]]) -> list[int]:
    """The longest list of token ids that every one of ``renders`` starts with."""
    first = renders[0]
    return list(first[: min((common_length(first, ids) for ids in renders[1:]), default=len(first))])


class ChatRenderer:
    """Renders leading messages with the chat handler SGLang's HTTP server set up (``app.state``)."""

    def __init__(self, app):
        self.app = app

    def document_ids(self, messages: tuple[tuple[str, str], ...]) -> list[int]:
        return common_prefix([self.render((*messages, ("user", probe)), "messages") for probe in PROBES])

    def turn_ids(self, messages: tuple[tuple[str, str], ...], turn: tuple[tuple[str, str], ...], document: list[int],
                 name: str) -> list[int]:
        """The ids a ``/v1/chat/completions`` request of ``messages`` followed by ``turn`` (the field ``name``)
        has after ``document`` (the ids of ``messages``), up to where the assistant's answer begins."""
        rendered = self.render((*messages, *turn), name)
        if rendered[: len(document)] != document or len(rendered) == len(document):
            raise ValueError(f"{name}: the chat template renders it in a way that changes the document's tokens")
        return rendered[len(document):]

    def render(self, messages: tuple[tuple[str, str], ...], name: str) -> list[int]:
        """``messages`` as the chat handler renders a request of them, with the generation prompt."""
        from sglang.srt.entrypoints.openai.protocol import ChatCompletionRequest

        chat = getattr(self.app.state, "openai_serving_chat", None)
        if chat is None:  # set in the server's lifespan, before it accepts requests
            raise DocumentError(HTTPStatus.SERVICE_UNAVAILABLE, "the chat API is not up yet; retry")
        if chat.tokenizer_manager.model_config.is_multimodal:
            raise ValueError("messages: documents through the chat API need a text-only model; register input_ids")
        request = ChatCompletionRequest(messages=[{"role": role, "content": content} for role, content in messages])
        try:
            processed = chat._process_messages(request, False)
        except Exception as error:  # the template's own complaint (roles out of order, no template, ...)
            raise ValueError(f"{name}: the server's chat template cannot render it: {str(error)[:300]}") from None
        if not isinstance(processed.prompt_ids, list) or not processed.prompt_ids:
            raise ValueError(f"{name}: this server's chat handler renders text, not token ids; register "
                             "input_ids rendered by the client")
        return processed.prompt_ids
