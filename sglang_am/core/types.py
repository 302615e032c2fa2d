"""Result type of the solver core."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class CompactedKV:
    """A compacted block of H independent heads.

    ``keys``/``values`` are ``[H, t_max, D]``, ``beta`` is ``[H, t_max]`` (added to the scaled logit),
    ``indices`` ``[H, t_max]`` are the selected original positions and ``lengths`` ``[H]`` the number of
    real slots per head. Slots past a head's length are padding: zero keys/values, ``beta = -inf``,
    ``indices = -1``. ``timings`` holds the seconds of each solver stage (``selection``, ``beta``,
    ``values``; OMP fits beta while it selects, so its beta stage is only the bookkeeping).
    """

    keys: torch.Tensor
    values: torch.Tensor
    beta: torch.Tensor
    indices: torch.Tensor
    lengths: torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def num_heads(self) -> int:
        return self.keys.shape[0]

    @property
    def max_length(self) -> int:
        return self.keys.shape[1]

    @property
    def padding_slots(self) -> int:
        """Slots stored only to make heads rectangular (they cost memory but hold nothing)."""
        return int(self.num_heads * self.max_length - self.lengths.sum().item())
