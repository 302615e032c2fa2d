"""The Attention Matching solver core: pure torch, no SGLang or transformers imports, any device."""

from .attention import attention
from .compact import compact
from .evaluate import CompactionError, evaluate
from .methods import available_methods, get_method, register_method
from .types import CompactedKV

__all__ = [
    "CompactedKV", "CompactionError", "attention", "available_methods", "compact", "evaluate", "get_method", "register_method",
]
