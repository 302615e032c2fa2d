"""Online re-compaction of one long sequence (method.md §13, the paper's reasoning experiment).

Whenever the physical cache reaches ``max_cache`` slots, every slot but the ``keep_recent`` most recent
ones (earlier compacted slots included) is compacted to ``ratio`` of its size, and the sequence goes on.
Earlier compacted slots enter with their beta as a bias on the original keys, so each kept slot's new
beta is its total bias. New tokens keep their logical RoPE positions (the count of tokens seen), while
they sit at the next physical cache index. The reference queries are the ones the model computed for the
latest tokens (at most ``max_queries`` per query head), captured as the sequence runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from transformers import DynamicCache, PreTrainedModel

from ..core import compact, get_method
from ..core.plan import pool_queries
from .attention import prefix_bias, recording_queries, use_sglang_am_attention
from .compaction import _sliding_layers


@dataclasses.dataclass(frozen=True)
class OnlineCompaction:
    max_cache: int  # physical slots that trigger a compaction
    keep_recent: int = 20  # the paper's setting: the last 20 tokens stay verbatim
    ratio: float = 0.5  # the paper compacts to 50%
    method: str = "AM-HighestAttnKeys"
    max_queries: int = 1024  # reference queries kept per query head (the most recent)

    def __post_init__(self):
        for name, minimum in (("keep_recent", 0), ("max_queries", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        if isinstance(self.max_cache, bool) or not isinstance(self.max_cache, int) or self.max_cache < self.keep_recent + 2:
            raise ValueError(f"max_cache must be an int >= keep_recent + 2 = {self.keep_recent + 2}, got {self.max_cache!r}")
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 < self.ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio!r}")
        get_method(self.method)  # ValueError naming the known methods


class OnlineSession:
    """One sequence (batch 1) whose cache is compacted whenever it reaches the policy's size."""

    def __init__(self, model: PreTrainedModel, policy: OnlineCompaction):
        if any(_sliding_layers(model)):
            raise ValueError("online compaction needs a model without sliding-window layers")
        self.model, self.policy = use_sglang_am_attention(model), policy
        self.cache = DynamicCache(config=model.config)
        self.betas: list[torch.Tensor | None] = [None] * model.config.num_hidden_layers  # on the first t slots
        self.queries: dict[int, torch.Tensor] = {}  # layer -> [H_q, n, D], the latest tokens' queries
        self.position = 0  # logical tokens seen
        self.compactions = 0

    @property
    def physical_length(self) -> int:
        return self.cache.get_seq_length(0)

    def forward(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Logits ``[len(token_ids), V]`` of the next tokens; compacts afterwards if the cache is full."""
        if len(token_ids) == 0:
            raise ValueError("token_ids must not be empty")
        device = next(self.model.parameters()).device
        ids = torch.tensor([list(token_ids)], device=device)
        positions = torch.arange(self.position, self.position + ids.shape[1], device=device).unsqueeze(0)
        with torch.no_grad(), prefix_bias(self.betas), recording_queries() as recorded:
            logits = self.model(ids, past_key_values=self.cache, position_ids=positions, use_cache=True).logits[0]
        self.position += ids.shape[1]
        for layer, chunks in recorded.items():
            latest = torch.cat([q[0] for q in chunks], dim=1)  # [H_q, L, D]
            if layer in self.queries:
                latest = torch.cat([self.queries[layer], latest], dim=1)
            self.queries[layer] = latest[:, -self.policy.max_queries :]
        if self.physical_length >= self.policy.max_cache:
            self.compact()
        return logits

    def compact(self) -> None:
        policy = self.policy
        for layer, cached in enumerate(self.cache.layers):
            keys, values = cached.keys[0], cached.values[0]  # [H_kv, S, D]
            span = keys.shape[1] - policy.keep_recent
            bias = torch.zeros(keys.shape[0], span, device=keys.device)
            if self.betas[layer] is not None:
                bias[:, : self.betas[layer].shape[1]] = self.betas[layer]
            queries = pool_queries(self.queries[layer], keys.shape[0]).to(keys)
            scale = getattr(self.model.model.layers[layer].self_attn, "scaling", None)
            result = compact(keys[:, :span], values[:, :span], queries, max(1, round(policy.ratio * span)), policy.method,
                             key_bias=bias.to(keys.dtype), scale=scale)
            cached.keys = torch.cat([result.keys, keys[:, span:]], dim=1).unsqueeze(0)
            cached.values = torch.cat([result.values, values[:, span:]], dim=1).unsqueeze(0)
            self.betas[layer] = result.beta.float()
        self.compactions += 1

    def greedy(self, prompt: Sequence[int], max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
        """Greedy continuation of ``prompt`` (compacting as the cache fills up)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        tokens: list[int] = []
        logits = self.forward(prompt)
        while len(tokens) < max_new_tokens:
            tokens.append(int(logits[-1].argmax()))
            if tokens[-1] == eos_token_id or len(tokens) == max_new_tokens:
                break
            logits = self.forward(tokens[-1:])
        return tokens
