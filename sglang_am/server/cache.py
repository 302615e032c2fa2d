"""``AMRadixCache``: SGLang's legacy radix tree plus what compacted documents need from it.

A compacted document is an ordinary node (key: its virtual ids, value: its KV slots) pinned by a tree
lock, so SGLang's own accounting already counts it as protected. The one addition is dropping a
document: after its pin is released, its node and every suffix cached beneath it are freed at once
instead of waiting for LRU, so the slots return to the pool when the user asks. With automatic
compaction on, every request's match is also reported to the reuse tracker (``auto``).
"""

from __future__ import annotations

from sglang.srt.mem_cache.radix_cache import RadixCache, TreeNode

from .documents import STORE


class AMRadixCache(RadixCache):
    def __init__(self, params):
        if params.page_size != 1:
            raise ValueError(f"--radix-cache-backend am needs --page-size 1, got {params.page_size}")
        super().__init__(params)

    def match_prefix(self, params):
        result = super().match_prefix(params)
        req = params.req
        # Only clients' plain requests in the default namespace count as reuse: not documents' requests,
        # registrations' internal ones, nor LoRA and other namespaces (they never share a compacted node).
        if STORE.tracker is not None and req is not None and req.extra_key is None and req.cache_salt is None and (
            getattr(req, "am_doc", None) is None and not getattr(req, "am_internal", False)
        ):
            STORE.tracker.observe(req.origin_input_ids, result.device_prefix_len, req.rid)
        return result

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
