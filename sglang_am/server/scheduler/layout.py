"""How a ``CompactedPrefix`` sits in one radix node: every layer of a document shares the node's slots.

A node has one width for every layer, the prefix's widest layer. A compacted (global) layer's slots
come first and its padding after (``beta = -inf``). A sliding-window layer holds its window of the
document, the last ``min(T, W - 1)`` tokens (``W - 1`` is SGLang's ``sliding_window_size``), verbatim or
compacted (``LayerPlan.compact_window``), *right-aligned* so that the node's last slot stands for the
document's last token: requests take RoPE positions from ``T - width``, so a verbatim window slot's
physical distance to any later token equals the logical one, and the backend's own sliding-window mask on
physical KV indices is exact. A compacted window's slots stand at the window's last positions, as in the
transformers adapter. Columns left of a window layer's slots get ``beta = -inf``: they are outside every
later token's window when the window is verbatim, so only compacted windows need the bias there.
"""

from __future__ import annotations

import dataclasses
from http import HTTPStatus

import torch
from sglang.srt.layers.radix_attention import RadixAttention

from ...prefix import CompactedPrefix
from ..errors import DocumentError


def layer_windows(model: torch.nn.Module, start_layer: int, num_layers: int) -> tuple[int | None, ...]:
    """Per layer of this rank: its ``sliding_window_size`` (keys with ``q - k <= size`` are seen) or None."""
    windows: list[int | None] = [None] * num_layers
    for module in model.modules():
        if isinstance(module, RadixAttention) and 0 <= module.layer_id - start_layer < num_layers:
            size = module.sliding_window_size
            windows[module.layer_id - start_layer] = size if size is not None and size > -1 else None
    return tuple(windows)


@dataclasses.dataclass(frozen=True)
class NodeLayout:
    """Where each layer of one document's prefix sits in its node."""

    windows: tuple[int | None, ...]  # per layer, as ``layer_windows``
    layer_slots: tuple[int, ...]  # per layer, the prefix's slots (compacted width, or window tokens)
    compacted_windows: bool = False  # window layers hold compacted slots: attention needs their bias

    @property
    def width(self) -> int:
        return max(self.layer_slots)

    def columns(self, layer: int) -> slice:
        """The node slots that hold ``layer``'s prefix slots."""
        slots = self.layer_slots[layer]
        return slice(self.width - slots, self.width) if self.windows[layer] is not None else slice(0, slots)

    def place(self, tensor: torch.Tensor, layer: int, fill: float) -> torch.Tensor:
        """``tensor`` ``[H, slots, ...]`` of ``layer`` widened to the node, ``fill`` elsewhere."""
        out = tensor.new_full((tensor.shape[0], self.width, *tensor.shape[2:]), fill)
        out[:, self.columns(layer)] = tensor
        return out

    def bias(self, prefix: CompactedPrefix, layer: int) -> torch.Tensor:
        """``layer``'s beta over the node ``[H_kv, width]`` (float32), ``-inf`` on columns it does not use."""
        return self.place(prefix.beta[layer].float(), layer, float("-inf"))

    def kv_bytes(self, bytes_per_slot: int) -> dict[str, int]:
        """What the node holds in the pool, by layer type (every layer holds ``width`` slots)."""
        held = {"global": 0, "sliding": 0}
        for window in self.windows:
            held["sliding" if window is not None else "global"] += self.width * bytes_per_slot
        return held


def window_slots(window: int | None, length: int) -> int | None:
    """Tokens a window layer keeps of a ``length``-token document (None for a global layer)."""
    return None if window is None else min(length, window)


def node_floor(windows: tuple[int | None, ...], length: int, compact_windows: bool) -> int:
    """Slots a ``length``-token document's node has on every layer whatever its ratio: its widest verbatim
    window (0 when no layer keeps a window verbatim)."""
    if compact_windows:
        return 0
    return max((window_slots(window, length) for window in windows if window is not None), default=0)


def compacts_windows(prefix: CompactedPrefix, windows: tuple[int | None, ...]) -> bool:
    """Does ``prefix`` hold some sliding-window layer's window in fewer slots than its tokens?"""
    return any(window is not None and slots < window_slots(window, prefix.logical_length)
               for window, slots in zip(windows, prefix.layer_slots))


def check_layout(prefix: CompactedPrefix, pool, windows: tuple[int | None, ...]) -> NodeLayout:
    """Refuse (400) a prefix that does not fit ``pool``'s layout: layers, heads, head sizes, each window
    layer holding at most its window of the document (beta 0 where it holds it verbatim); refuse (422) one
    whose keys or values the pool's dtype cannot hold (they would turn into Inf in every request's attention)."""
    expected = (pool.head_num, pool.head_dim, pool.v_head_dim)
    largest = torch.finfo(pool.store_dtype).max
    if prefix.num_layers != pool.layer_num:
        raise DocumentError(HTTPStatus.BAD_REQUEST, f"the document has {prefix.num_layers} layers, this model {pool.layer_num}")
    for layer, (keys, values, beta) in enumerate(zip(prefix.keys, prefix.values, prefix.beta)):
        found = (keys.shape[0], keys.shape[2], values.shape[2])
        if found != expected:
            raise DocumentError(HTTPStatus.BAD_REQUEST, f"layer {layer} of the document (heads, key size, value size) = "
                                f"{found} does not fit this model's KV pool {expected}")
        for part, tensor in (("keys", keys), ("values", values)):
            peak = float(tensor.abs().max()) if tensor.numel() else 0.0
            if peak > largest:
                raise DocumentError(HTTPStatus.UNPROCESSABLE_ENTITY, f"layer {layer}: the document's {part} reach "
                                    f"{peak:.4g}, beyond what this model's {pool.store_dtype} KV pool holds "
                                    f"({largest:.4g}); a larger ratio, or a float32 or bfloat16 pool, keeps them")
        window = window_slots(windows[layer], prefix.logical_length)
        if window is not None and (keys.shape[1] > window or (keys.shape[1] == window and bool(beta.ne(0).any()))):
            raise DocumentError(HTTPStatus.BAD_REQUEST, f"layer {layer} is a sliding-window layer: the document must "
                                f"hold its last {window} tokens with beta 0, or fewer compacted slots; it has "
                                f"{keys.shape[1]} slots")
    compacted = {k.shape[1] for k, w in zip(prefix.keys, windows) if w is None}
    if len(compacted) > 1:
        raise DocumentError(HTTPStatus.BAD_REQUEST, f"the document's compacted layers differ in width {sorted(compacted)}")
    return NodeLayout(windows, tuple(prefix.layer_slots), compacts_windows(prefix, windows))
