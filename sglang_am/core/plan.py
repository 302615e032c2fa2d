"""How a document is compacted layer by layer, shared by the transformers and SGLang adapters: query
sources, GQA pooling and the query cap, per-head slot budgets, the solve of one span, the kept slots
around it, and one width for every compacted layer. No model library imports."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch

from .compact import compact
from .head_budgets import head_budgets
from .methods import get_method
from .types import CompactedKV

QUERY_SOURCES = ("context-prefill", "repeat-prefill", "self-study", "questions", "random")
# Named unions of sources: each gets this fraction of the per-head query cap.
QUERY_MIXTURES = {"ss-plus-repeat": {"self-study": 0.5, "repeat-prefill": 0.5}}
# "questions": the prompts that will follow the document, teacher-forced after it. They are few and they
# decide the answers, so a fraction given to them is their weight in the fit: their queries are repeated to
# fill their share (``fill_queries``) instead of being outweighed by a query-agnostic source's thousands.
# Given questions, they are the only source by default: on Gemma-3-270M's real-text QA (60 questions),
# questions alone answered 49 at ratio 0.1, as many as full context, and 46 at 0.05; mixtures with
# repeat-prefill did no better at 0.1 and worse at 0.05 (a quarter of it: 42, half: 31), and no mixture
# served the questions not given better (docs/question-aware.md has the tables).
QUESTION_SHARE = 1.0


def source_fractions(query_source: str | Mapping[str, float]) -> dict[str, float]:
    if isinstance(query_source, str):
        fractions = QUERY_MIXTURES.get(query_source, {query_source: 1.0})
    else:
        fractions = dict(query_source)
    unknown = sorted(set(fractions) - set(QUERY_SOURCES))
    if unknown or not fractions:
        raise ValueError(
            f"query_source must be one of {QUERY_SOURCES}, a mixture {sorted(QUERY_MIXTURES)} or a mapping of "
            f"sources to fractions; got {query_source!r}"
        )
    if any(not f > 0 for f in fractions.values()) or abs(sum(fractions.values()) - 1) > 1e-6:
        raise ValueError(f"query_source fractions must be positive and sum to 1, got {fractions}")
    return fractions


def with_questions(fractions: Mapping[str, float], share: float = QUESTION_SHARE) -> dict[str, float]:
    """``fractions`` (query-agnostic sources) with ``questions`` added at ``share``, the others scaled to the rest;
    a mixture that names ``questions`` already is returned as it is."""
    if "questions" in fractions:
        return dict(fractions)
    if not 0 < share <= 1:
        raise ValueError(f"the questions' share must be in (0, 1], got {share}")
    mixed = {source: fraction * (1 - share) for source, fraction in fractions.items() if share < 1}
    return {"questions": share, **mixed}


def pool_queries(queries: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``[H_q, L, D]`` -> ``[H_kv, G*L, D]``: KV head k gets query heads k*G .. k*G+G-1 (GQA grouping)."""
    heads, length, dim = queries.shape
    if heads % num_kv_heads:
        raise ValueError(f"{heads} query heads do not split into {num_kv_heads} KV-head groups")
    return queries.reshape(num_kv_heads, heads // num_kv_heads * length, dim)


def check_budget(budget: int | float) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"budget must be an int (slots) or a float ratio, got {budget!r}")
    if isinstance(budget, float) and not 0 < budget <= 1:
        raise ValueError(f"budget ratio must be in (0, 1], got {budget}")
    if isinstance(budget, int) and budget < 1:
        raise ValueError(f"budget must be >= 1 slot, got {budget}")


def chunk_budgets(
    budget: int | float,
    span: int,
    chunk: range,
    layer: int,
    num_kv_heads: int,
    head_proportions: dict[tuple[int, int], float] | None,
    max_ratio_per_head: float,
) -> list[int]:
    """Slots per KV head for one chunk of the compacted span (the chunk gets its share of the budget)."""
    ratio = budget if isinstance(budget, float) else budget / span
    if head_proportions is None:
        return [max(1, round(ratio * len(chunk)))] * num_kv_heads
    per_layer = head_budgets(head_proportions, min(1.0, ratio), len(chunk), max_ratio_per_head, min_budget=1)
    if layer not in per_layer or len(per_layer[layer]) != num_kv_heads:
        raise ValueError(f"head proportions have no entries for the {num_kv_heads} KV heads of layer {layer}")
    return per_layer[layer]


def subsample_queries(queries: torch.Tensor, cap: int, generator: torch.Generator) -> torch.Tensor:
    """At most ``cap`` queries per head, uniformly without replacement (same indices for every head)."""
    if queries.shape[1] <= cap:
        return queries
    keep = torch.randperm(queries.shape[1], generator=generator)[:cap].sort().values
    return queries[:, keep.to(queries.device)]


def fill_queries(queries: torch.Tensor, rows: int, generator: torch.Generator) -> torch.Tensor:
    """Exactly ``rows`` queries per head: a uniform subsample when there are more, every query repeated
    equally often (a seeded few once more) when there are fewer. Repeating a query weighs it in the fit."""
    count = queries.shape[1]
    if count >= rows:
        return subsample_queries(queries, rows, generator)
    repeats, remainder = divmod(rows, count)
    index = torch.cat([torch.arange(count).repeat(repeats), torch.randperm(count, generator=generator)[:remainder]])
    return queries[:, index.sort().values.to(queries.device)]


def heldout_positions(eligible: torch.Tensor, fraction: float, max_positions: int,
                      generator: torch.Generator) -> torch.Tensor:
    """Bool ``[n]``: a seeded ``fraction`` of the ``eligible`` positions (a bool mask ``[n]``), at most
    ``max_positions``, and never all of them (the fit keeps at least one)."""
    candidates = eligible.cpu().nonzero().squeeze(1)
    take = min(max_positions, int(fraction * len(candidates)), len(candidates) - 1)
    chosen = torch.zeros(len(eligible), dtype=torch.bool)
    if take > 0:
        chosen[candidates[torch.randperm(len(candidates), generator=generator)[:take]]] = True
    return chosen


def split_heldout(queries: Mapping[str, torch.Tensor], fraction: float, max_positions: int,
                  generator: torch.Generator) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Each source's positions ``[H_q, n, D]`` split into (fit, held out) by ``heldout_positions``: a source with
    too few positions to spare lends none."""
    fit, heldout = {}, {}
    for source, rows in queries.items():
        chosen = heldout_positions(torch.ones(rows.shape[1], dtype=torch.bool), fraction, max_positions, generator)
        device_mask = chosen.to(rows.device)
        fit[source] = rows[:, ~device_mask]
        if chosen.any():
            heldout[source] = rows[:, device_mask]
    return fit, heldout


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """One document's compaction settings, applied to each layer (and each chunk of its span).

    ``query_fractions`` comes from ``source_fractions``: each source gets that share of
    ``max_queries_per_head`` pooled queries per KV head, at most (``questions``: exactly, see
    ``QUESTION_SHARE``). ``options`` are fields of the method's options
    dataclass; the model's attention scale and, for methods that take them, ``layer``/``num_layers``
    are filled in per layer unless given. ``compact_windows``: sliding-window layers' windows are compacted
    too (``compact_window``), not kept verbatim.
    """

    method: str
    budget: int | float
    query_fractions: Mapping[str, float]
    max_queries_per_head: int = 5000
    keep_first: int = 0  # tokens before the compacted span, stored verbatim
    head_proportions: dict[tuple[int, int], float] | None = None
    max_ratio_per_head: float = 1.0
    options: Mapping[str, object] = dataclasses.field(default_factory=dict)
    compact_windows: bool = False

    def reference_queries(self, queries: Mapping[str, torch.Tensor], num_kv_heads: int,
                          generator: torch.Generator) -> torch.Tensor:
        """Each source's queries ``[H_q, n, D]`` pooled per KV head and capped at its share; ``[H_kv, n', D]``."""
        parts = []
        mixed = len(self.query_fractions) > 1  # alone, repeating the questions would change nothing but the cost
        for source, fraction in self.query_fractions.items():
            cap = max(1, round(fraction * self.max_queries_per_head))
            sample = fill_queries if source == "questions" and mixed else subsample_queries
            parts.append(sample(pool_queries(queries[source], num_kv_heads), cap, generator))
        return torch.cat(parts, dim=1)

    def compact_span(self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor, span_length: int,
                     chunk: range, layer: int, num_layers: int, scale: float | None) -> CompactedKV:
        """Compact ``keys``/``values`` ``[H_kv, len(chunk), D]``, one chunk of the compacted span, with its
        share of the budget."""
        budgets = chunk_budgets(self.budget, span_length, chunk, layer, keys.shape[0], self.head_proportions,
                                self.max_ratio_per_head)
        return compact(keys, values, queries.to(keys), budgets, self.method, **self._options(layer, num_layers, scale))

    def compact_window(self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor, span_length: int,
                       layer: int, num_layers: int, scale: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A sliding-window layer's window ``[H_kv, w, D]`` (the document's last w tokens): kept verbatim
        (beta 0), or with ``compact_windows`` compacted to the span's uniform per-head budget when that is
        smaller than w. Compacted slots come in the order of the tokens they were selected from, padding
        first: they stand at the window's last positions, so the earliest leaves a later query's window first."""
        heads, window = keys.shape[:2]
        slots = chunk_budgets(self.budget, span_length, range(span_length), layer, heads, None, 1.0)[0]
        if not self.compact_windows or slots >= window:
            return keys, values, keys.new_zeros((heads, window))
        result = compact(keys, values, queries.to(keys), slots, self.method, **self._options(layer, num_layers, scale))
        order = result.indices.argsort(dim=1)  # padding (index -1) first, then by source position
        gather = lambda tensor: tensor.gather(1, order.view(*order.shape, *[1] * (tensor.ndim - 2)).expand_as(tensor))
        return gather(result.keys), gather(result.values), gather(result.beta)

    def _options(self, layer: int, num_layers: int, scale: float | None) -> dict[str, object]:
        options = dict(self.options)
        options.setdefault("scale", scale)
        fields = {field.name for field in dataclasses.fields(get_method(self.method).options_class)}
        if {"layer", "num_layers"} <= fields:
            options.setdefault("layer", layer)
            options.setdefault("num_layers", num_layers)
        return options


def assemble_layer(head: tuple[torch.Tensor, torch.Tensor], pieces: Sequence[CompactedKV],
                   tail: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One layer's slots ``[kept head | compacted pieces | kept tail]``: keys, values and beta (0 on kept
    tokens, which are stored verbatim)."""
    zero_beta = lambda keys: keys.new_zeros(keys.shape[:2])
    parts = [(*head, zero_beta(head[0])), *((p.keys, p.values, p.beta) for p in pieces), (*tail, zero_beta(tail[0]))]
    return tuple(torch.cat([part[i] for part in parts], dim=1) for i in range(3))


def pad_layers(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], betas: Sequence[torch.Tensor],
               fixed: Sequence[bool] | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Compacted layers may differ in width (PyramidKV, head budgets), but one node (or one attention mask)
    serves every layer: pad them to the widest with masked slots (zero keys/values, beta = -inf). Layers
    marked ``fixed`` (sliding-window layers holding their window) are left as they are."""
    fixed = fixed or [False] * len(keys)
    width = max(k.shape[1] for k, keep in zip(keys, fixed) if not keep)

    def pad(tensor: torch.Tensor, fill: float, keep: bool) -> torch.Tensor:
        if keep:
            return tensor
        return torch.nn.functional.pad(tensor, (0, 0) * (tensor.ndim - 2) + (0, width - tensor.shape[1]), value=fill)

    return ([pad(k, 0.0, f) for k, f in zip(keys, fixed)], [pad(v, 0.0, f) for v, f in zip(values, fixed)],
            [pad(b, float("-inf"), f) for b, f in zip(betas, fixed)])
