"""The operator's settings of the extension: where documents are stored, and the bound on every kind of work
a client can ask for.

A server is a shared resource: every size, count and duration a client can make it spend has a bound
here. The launcher's ``--am-FIELD VALUE`` flags (``--am-store-dir``, ``--am-solve-timeout``, ...) write
them as JSON into ``SGLANG_AM_CONFIG``, which reaches every SGLang process (and also works with
``sglang serve`` directly); ``{}`` or no variable means the defaults.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import TypeVar

CONFIG_VARIABLE = "SGLANG_AM_CONFIG"
GiB = 1 << 30
MiB = 1 << 20


def default_store_dir() -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(cache) / "sglang-am" / "documents")


def check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """``value`` if it is an int (not a bool) in ``[low, high]``; else a ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an int {bounds}, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    store_dir: str = dataclasses.field(default_factory=default_store_dir)  # the only directory documents are written to
    store_quota_bytes: int = 10 * GiB  # bytes the store may hold; saves beyond it are refused (507)
    solve_timeout: float = 600.0  # seconds one solve may run before its registration fails
    max_registrations: int = 4  # registrations in progress at once (queued solves included); more get 503
    max_document_tokens: int = 32768
    max_self_study_tokens: int = 512  # per self-study answer the server samples
    max_queries_per_head: int = 20000
    max_questions: int = 64  # questions one registration may give
    max_question_tokens: int = 256  # tokens of each of them
    capture_memory_bytes: int = 1 * GiB  # captured reference queries of all registrations in progress
    adapt_memory_bytes: int = 2 * GiB  # host memory of all adapting documents: their refit inputs and live queries
    adapt_reservoir: int = 1024  # live query positions an adapting document keeps
    adapt_refit_every: int = 32  # new live query positions between an adapting document's refits (a repeated question adds one)
    rpc_timeout: float = 120.0  # seconds the HTTP process waits for one scheduler operation
    max_body_bytes: int = 8 * MiB  # request bodies of the /am/ routes
    bias_slots: int = 1 << 17  # compacted slots the GPU backends' bias table holds (at most the KV pool)
    load_store: bool = False  # install every stored document of the served model at start-up (a shared store)

    def __post_init__(self) -> None:
        if not isinstance(self.store_dir, str) or not self.store_dir:
            raise ValueError(f"store_dir must be a directory path, got {self.store_dir!r}")
        for name in ("store_quota_bytes", "max_registrations", "max_document_tokens", "max_self_study_tokens",
                     "max_queries_per_head", "max_questions", "max_question_tokens", "capture_memory_bytes",
                     "adapt_memory_bytes", "adapt_reservoir", "adapt_refit_every", "max_body_bytes", "bias_slots"):
            check_int(name, getattr(self, name), 1)
        if not isinstance(self.load_store, bool):
            raise ValueError(f"load_store must be true or false, got {self.load_store!r}")
        for name in ("solve_timeout", "rpc_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


Settings = TypeVar("Settings")


def from_environment(cls: type[Settings], variable: str) -> Settings | None:
    """``cls`` from the JSON object in ``variable`` (None when unset); a bad value raises ``ValueError``
    naming the variable and the field."""
    text = os.environ.get(variable)
    if not text:
        return None
    try:
        fields = json.loads(text)
        if not isinstance(fields, dict):
            raise ValueError("it must be a JSON object")
        return cls(**fields)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{variable} is not valid: {error}") from None


def server_config() -> ServerConfig:
    return from_environment(ServerConfig, CONFIG_VARIABLE) or ServerConfig()
