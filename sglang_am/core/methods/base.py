"""The contract every compaction method implements, and the registry that names them.

A method is a key selector: given the block and per-head budgets it returns which original positions
to keep (and, for OMP, their mass weights). The shared pipeline then fits beta and values, or skips
those fits as the options say, so eviction baselines and ablations run through the same code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..block import SCORE_DTYPES, STATS_BACKENDS, Block

NNLS_STARTS = ("least-squares", "least-squares-or-unit")


@dataclass
class CompactionOptions:
    """Options every method accepts. Defaults are the paper's for AM-HighestAttnKeys.

    fit_beta: solve the bounded NNLS mass problem for beta; ``False`` sets beta = 0 (the "zero beta"
        ablation; eviction baselines default to it).
    fit_values: fit the compacted values by least squares; ``False`` copies ``V[S]`` (the "direct
        values" ablation; eviction baselines default to it).
    beta_min, beta_max: box on beta for the NNLS fit (``w = exp(beta)`` in ``[e^beta_min, e^beta_max]``).
    nnls_iters: projected-gradient steps after the least-squares start.
    nnls_start: where those steps start (``NNLS_STARTS``): ``"least-squares"`` (the paper's: the clamped
        least-squares weights) or ``"least-squares-or-unit"`` (per head, whichever of those and w = 1, beta = 0,
        fits the mass better). With about as many slots as query positions the least-squares weights swing
        far outside the box and their clamp can fit worse than no beta: question-aware documents on
        Gemma-3-270M lost answers to that start (one document 0.62 against 1.00 at 511 slots), while nodes
        learned from a few hundred live positions kept more with it (docs/methods.md).
    scale: attention scale; ``None`` means ``1/sqrt(D)``.
    query_chunk: queries per chunk when streaming over the ``n x T`` scores; peak memory is about
        ``H x query_chunk x T`` floats. ``None`` sizes chunks to a 16 MiB score tile.
    seed: seed for any randomness (only the ``random`` baseline draws).
    stats_backend: where the attention statistics (targets, key scores) are computed: ``"torch"``,
        ``"gpu"`` (FlashInfer + Triton kernels) or ``"auto"`` (``"gpu"`` for CUDA fp16/bf16 blocks).
    memory_bytes: what the solver may hold beyond its streamed score tiles: the n x t weight matrices of the
        beta and value fits (heads are fitted in groups that fit, ``fit_head_groups``), and AM-OMP's greedy state.
    score_dtype: precision of the n x T products run in torch (scores and attention outputs on the torch
        stats backend, OMP's mass features): ``"float32"``, or ``"bfloat16"`` (about 2x faster matmuls on CPUs
        with AVX512-BF16; errors in docs/benchmarks.md). Reductions, exps and the beta and value fits stay float32.
    """

    fit_beta: bool = True
    fit_values: bool = True
    beta_min: float = -3.0
    beta_max: float = 3.0
    nnls_iters: int = 2
    nnls_start: str = "least-squares-or-unit"
    scale: float | None = None
    query_chunk: int | None = None
    seed: int = 0
    stats_backend: str = "auto"
    score_dtype: str = "float32"
    memory_bytes: int = 1 << 30

    def __post_init__(self) -> None:
        for name in ("fit_beta", "fit_values"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not self.beta_min < self.beta_max:
            raise ValueError(f"beta_min ({self.beta_min}) must be below beta_max ({self.beta_max})")
        if self.nnls_iters < 0:
            raise ValueError(f"nnls_iters must be >= 0, got {self.nnls_iters}")
        if self.nnls_start not in NNLS_STARTS:
            raise ValueError(f"nnls_start must be one of {NNLS_STARTS}, got {self.nnls_start!r}")
        if self.scale is not None and not self.scale > 0:
            raise ValueError(f"scale must be positive, got {self.scale}")
        if self.query_chunk is not None and self.query_chunk < 1:
            raise ValueError(f"query_chunk must be >= 1, got {self.query_chunk}")
        if self.stats_backend not in STATS_BACKENDS:
            raise ValueError(f"stats_backend must be one of {STATS_BACKENDS}, got {self.stats_backend!r}")
        if self.memory_bytes < 1:
            raise ValueError(f"memory_bytes must be >= 1, got {self.memory_bytes}")
        if self.score_dtype not in SCORE_DTYPES:
            raise ValueError(f"score_dtype must be one of {sorted(SCORE_DTYPES)}, got {self.score_dtype!r}")

    @property
    def nnls_or_unit(self) -> bool:
        """Does the bounded NNLS fall back to w = 1 where the clamped least-squares start fits worse?"""
        return self.nnls_start == "least-squares-or-unit"


@dataclass
class EvictionOptions(CompactionOptions):
    """Eviction baselines: keep original keys and values, no bias."""

    fit_beta: bool = False
    fit_values: bool = False


@dataclass(frozen=True)
class Selection:
    """Kept positions ``[H, t]`` (``-1`` pads heads with fewer slots) and optional log mass weights."""

    indices: torch.Tensor
    log_weights: torch.Tensor | None = None


Selector = Callable[[Block, torch.Tensor, CompactionOptions], Selection]


@dataclass(frozen=True)
class Method:
    name: str
    options_class: type[CompactionOptions]
    select: Selector
    query_source: str  # the reference queries the paper pairs with this method
    description: str

    def make_options(self, **options: object) -> CompactionOptions:
        names = {f.name for f in dataclasses.fields(self.options_class)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for method {self.name!r}; valid: {sorted(names)}")
        return self.options_class(**options)


_REGISTRY: dict[str, Method] = {}


def register_method(
    name: str, options_class: type[CompactionOptions], query_source: str, description: str
) -> Callable[[Selector], Selector]:
    def decorator(select: Selector) -> Selector:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered")
        _REGISTRY[name] = Method(name, options_class, select, query_source, description)
        return select

    return decorator


def get_method(name: str) -> Method:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; available: {sorted(_REGISTRY)}") from None


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def top_k_per_head(scores: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
    """Positions of the ``budgets[h]`` highest scores of each head ``[H, max budget]``, ``-1`` padded.

    Ties (e.g. plateaus after max pooling) go to the earlier position, so a head's selection does not
    depend on which other heads share the call.
    """
    width = int(budgets.max())
    indices = scores.sort(dim=1, descending=True, stable=True).indices[:, :width]
    keep = torch.arange(width, device=scores.device).unsqueeze(0) < budgets.to(scores.device).unsqueeze(1)
    return indices.masked_fill(~keep, -1)
