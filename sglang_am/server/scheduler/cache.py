"""``AMRadixCache``: SGLang's legacy radix tree plus installing and removing compacted documents.

A compacted document is an ordinary node (key: its virtual ids, value: its KV slots) pinned by a tree
lock, so SGLang's own accounting counts it as protected. ``install_document`` puts a ``CompactedPrefix``
(solved here or read from the store: one path for both) into the pool and the tree, checking it against
the pool's layout before it allocates anything and freeing what it took if a step fails.
``remove_document`` unpins the node and frees it and every suffix cached beneath it that no request
holds, so the slots return to the pool when the user asks. The tree owns the scheduler's documents
(``registry``), and reports every client request's match to the reuse tracker when automatic
compaction is on. A request that an observing document learns from matches at most the document, so that
it computes (and the document sees) every position after it.
"""

from __future__ import annotations

import dataclasses
from array import array
from http import HTTPStatus

import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey, TreeNode

from ...prefix import CompactedPrefix
from ..errors import DocumentError
from .layout import check_layout
from .registry import DocumentRegistry, Installed, RequestRecord, virtual_ids


@dataclasses.dataclass(eq=False)
class SourceHold:
    """A registration's captured KV: the tree lock that keeps it and its pool slots ``[T]``."""

    lock: object
    slots: torch.Tensor


class AMRadixCache(RadixCache):
    def __init__(self, params, registry: DocumentRegistry, windows: tuple[int | None, ...]):
        if params.page_size != 1:
            raise ValueError(f"--radix-cache-backend am needs --page-size 1, got {params.page_size}")
        super().__init__(params)
        self.registry = registry
        self.windows = windows  # per layer: its sliding window (``layout.layer_windows``) or None

    def match_prefix(self, params):
        req, tracker = params.req, self.registry.tracker
        record = RequestRecord.of(req)
        if record.observed is not None:
            # An observed request computes every position after the document, the template tail that requests
            # share included: a node that serves them must be fitted to those queries too.
            key = params.key
            limit = record.observed.start if key.limit is None else min(key.limit, record.observed.start)
            params = dataclasses.replace(params, key=RadixKey(key.token_ids, extra_key=key.extra_key, is_bigram=key.is_bigram,
                                                              limit=limit, cache_salt=key.cache_salt))
        result = super().match_prefix(params)
        # Only clients' plain requests in the default namespace that extend no document count as reuse (the hook
        # looked for one when the request arrived): a document's requests (served, observed or falling back while
        # it registers) would propose a second prefix of the same text beside it; nor registrations' internal
        # ones, nor LoRA and other namespaces (they never share a compacted node).
        if tracker is not None and req is not None and req.extra_key is None and req.cache_salt is None and (
            record.served is None and not record.internal and not record.extends_document
        ):
            tracker.observe(req.origin_input_ids, req.rid)
        return result

    def hold_prefix(self, tokens: array, salt: str) -> SourceHold | None:
        """Lock the cached KV of all of ``tokens`` under ``salt`` (None when part of it is not cached)."""
        match = self.match_prefix(MatchPrefixParams(key=RadixKey(tokens, cache_salt=salt)))
        if match.device_prefix_len < len(tokens):
            return None
        return SourceHold(self.lock(match.last_device_node), self.path_device_indices(match.last_device_node)[: len(tokens)])

    def install_document(self, prefix: CompactedPrefix, index: int) -> Installed:
        """Write ``prefix`` into new slots under a pinned node keyed by the virtual ids of namespace ``index``
        (one per slot), each layer placed as ``layout.NodeLayout`` says."""
        pool = self.token_to_kv_pool_allocator.get_kvcache()
        layout = check_layout(prefix, pool, self.windows)
        width = layout.width
        device = pool.k_buffer[0].device
        bias = [layout.bias(prefix, layer).to(device) for layer in range(pool.layer_num)]
        head_slots = [[int(n) for n in torch.isfinite(b).sum(dim=1)] for b in prefix.beta]
        slots = self.token_to_kv_pool_allocator.alloc(width)
        if slots is None:
            self.evict(EvictParams(num_tokens=width))
            slots = self.token_to_kv_pool_allocator.alloc(width)
        if slots is None:
            raise DocumentError(HTTPStatus.SERVICE_UNAVAILABLE,
                                f"no room for {width} KV slots; drop documents or raise the KV pool size")
        try:
            for layer in range(pool.layer_num):
                for buffer, part in ((pool.k_buffer, prefix.keys), (pool.v_buffer, prefix.values)):
                    placed = layout.place(part[layer].to(device, pool.store_dtype), layer, 0.0)
                    buffer[layer][slots] = placed.permute(1, 0, 2)
            inserted = self.insert(InsertParams(key=RadixKey(virtual_ids(index, width)), value=slots.to(torch.int64)))
        except BaseException:
            self.token_to_kv_pool_allocator.free(slots)
            raise
        if inserted.prefix_len:  # never: virtual ids are unique per document
            raise RuntimeError("a document's virtual ids were already in the tree")
        node = inserted.last_device_node
        slot_bytes = pool.head_num * (pool.head_dim + pool.v_head_dim) * pool.store_dtype.itemsize
        return Installed(slots, node, self.lock(node), bias, head_slots, layout, slot_bytes, index)

    def remove_document(self, installed: Installed) -> int:
        """Unpin a document; returns the slots freed (its own and unused suffixes cached beneath it)."""
        self.unlock(installed.pin)
        return self.remove_subtree(installed.node)

    def remove_namespace(self, salt: str) -> int:
        """Free what the tree caches under cache salts starting with ``salt`` (a registration's captures) that
        no request holds: once solved, it would only push clients' prefixes out of the pool first."""
        return sum(self.remove_subtree(child) for key, child in list(self.root_node.children.items())
                   if isinstance(key, tuple) and isinstance(key[0], tuple) and str(key[0][1]).startswith(salt))

    def remove_subtree(self, node: TreeNode) -> int:
        """Free ``node`` and its descendants that no request holds; returns the slots freed. A locked
        descendant (a running request's suffix) keeps itself and its ancestors for normal LRU."""
        freed = 0
        for child in list(node.children.values()):
            freed += self.remove_subtree(child)
        if node.lock_ref == 0 and not node.children and not node.evicted:
            self.token_to_kv_pool_allocator.free_segment(node.value, start_pos=0)
            freed += len(node.value)
            self._delete_leaf(node)
            self.kv_events.record_remove(node)
        return freed

