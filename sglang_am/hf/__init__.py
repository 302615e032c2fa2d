"""transformers adapter: compact a document's KV cache with a real model and generate after it."""

from ..core.plan import QUERY_MIXTURES, QUERY_SOURCES, pool_queries
from ..fingerprint import model_fingerprint
from ..prompts import REPEAT_INSTRUCTION, SELF_STUDY_PROMPTS, DocumentPrompt, document_prompt, instruction_ids, repeat_ids
from .attention import ATTENTION_NAME, prefix_bias, recording_queries, use_sglang_am_attention
from .compaction import compact_prefix, forward_after_prefix, greedy_generate, prefix_cache
from .metrics import (
    ChoiceResult,
    attention_errors,
    continuation_logprobs,
    full_prefix,
    multiple_choice_accuracy,
    next_token_kl,
    reconstruction_log_perplexity,
)
from .self_study import self_study_continuations

__all__ = [
    "ATTENTION_NAME",
    "ChoiceResult",
    "attention_errors",
    "DocumentPrompt",
    "REPEAT_INSTRUCTION",
    "document_prompt",
    "instruction_ids",
    "repeat_ids",
    "continuation_logprobs",
    "full_prefix",
    "multiple_choice_accuracy",
    "next_token_kl",
    "reconstruction_log_perplexity",
    "QUERY_MIXTURES",
    "QUERY_SOURCES",
    "SELF_STUDY_PROMPTS",
    "compact_prefix",
    "forward_after_prefix",
    "greedy_generate",
    "model_fingerprint",
    "pool_queries",
    "prefix_bias",
    "prefix_cache",
    "recording_queries",
    "self_study_continuations",
    "use_sglang_am_attention",
]
