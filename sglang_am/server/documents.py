"""Compacted documents inside SGLang's scheduler process (the "virtual token" design).

A registered document of T tokens becomes t_pad KV slots holding the compacted keys/values of every
layer, stored under an ordinary radix-tree node whose key is t_pad reserved negative token ids and
pinned by a tree lock; its beta lives in a float32 table read by the attention backend. A request
whose prompt starts with the document's ids is rewritten to ``virtual ids + suffix``, so SGLang's
own prefix matching, allocation and leak checks keep their one-slot-per-key-token invariant; only
RoPE positions (``+ T - t``, see ``hooks``) and the attention bias are new.

Registration runs in steps driven by the main process (``service``): ``prepare`` (validate, reserve
an id), capture requests (the server's own prefills record reference queries through the attention
backend; when a capture finishes, the document's KV is locked in the tree), then ``compact``: the
first call starts the solve on a worker thread, so batches keep running; a later call, once the solve
is done, writes the slots, inserts and pins the node. Every operation arrives as one JSON RPC (``call``), on the scheduler's thread.

Automatic documents (``auto``) come from the reuse tracker; their slots are capped by the policy's
budget, evicting the least recently used ones (saved first when the policy names a directory).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import logging
import time
import uuid
from array import array
from http import HTTPStatus
from pathlib import Path

import torch

from ..core import compact, get_method
from ..core.head_budgets import load_head_proportions
from ..core.plan import chunk_budgets, pool_queries, source_fractions, subsample_queries
from ..hf.self_study import SELF_STUDY_PROMPTS
from ..prefix import CompactedPrefix
from .auto import ReuseTracker, policy_from_environment
from .metrics import Stats

logger = logging.getLogger(__name__)

MIN_DOCUMENT_TOKENS = 16
# Virtual ids: -(1 + (index << 32) + slot). Negative, so they collide with no vocabulary id and no
# multimodal pad id (those are large positive values); never embedded (always inside the prefix).
_VIRTUAL_SHIFT = 32
DEFAULT_MAX_QUERIES_PER_HEAD = 5000
# Slots a capture request needs beyond its document copies (instructions, prompts, one output token).
CAPTURE_HEADROOM_SLOTS = 64


class DocumentError(Exception):
    """A refused document operation; ``str()`` is the JSON the RPC carries back to the HTTP layer."""

    def __init__(self, status: int, message: str):
        super().__init__(json.dumps({"status": int(status), "error": message}))
        self.status, self.message = int(status), message


def document_id(token_ids) -> str:
    return hashlib.sha256(array("q", token_ids).tobytes()).hexdigest()[:16]


@dataclasses.dataclass
class Document:
    doc_id: str
    index: int
    tokens: array
    method: str
    config: dict
    state: str = "capturing"  # -> "compacting" -> "ready"
    salt: str = ""
    auto: bool = False  # proposed by the reuse tracker: counted in the automatic budget, evictable
    # capture: source -> layer -> list of [rows, H_q, D]; scale per layer
    queries: dict = dataclasses.field(default_factory=dict)
    scales: dict = dataclasses.field(default_factory=dict)
    slots: torch.Tensor | None = None  # [t_pad] KV-pool slot indices
    bias: list = dataclasses.field(default_factory=list)  # per layer [H_kv, t_pad] float32
    head_slots: list = dataclasses.field(default_factory=list)  # per layer [t_h per KV head]
    proportions: dict | None = None  # per-head budget proportions {(layer, kv_head): p}
    pin: object = None
    node: object = None
    timings: dict = dataclasses.field(default_factory=dict)
    requests_served: int = 0
    last_used: float = dataclasses.field(default_factory=time.monotonic)
    solve: concurrent.futures.Future | None = None  # the running solve, while "compacting"
    source_lock: object = None  # holds the document's captured KV in the tree until the solve is done
    source: torch.Tensor | None = None  # its KV-pool slots

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def num_slots(self) -> int:
        return 0 if self.slots is None else int(self.slots.numel())

    @property
    def origin(self) -> str:
        return "auto" if self.auto else "explicit"

    @property
    def position_offset(self) -> int:
        return self.length - self.num_slots

    @functools.cached_property
    def virtual_ids(self) -> array:
        """Read once the slots are installed (every rewritten request prepends them)."""
        base = 1 + (self.index << _VIRTUAL_SHIFT)
        return array("q", (-(base + j) for j in range(self.num_slots)))

    def is_proper_prefix_of(self, token_ids) -> bool:
        """Do ``token_ids`` start with this document and go on for at least one more token?"""
        return len(token_ids) > self.length and array("q", token_ids[: self.length]) == self.tokens

    def record(self, source: str, layer: int, queries: torch.Tensor, scale: float) -> None:
        self.queries.setdefault(source, {}).setdefault(layer, []).append(queries.detach().clone())
        self.scales[layer] = scale

    def describe(self) -> dict:
        wasted = sum(self.num_slots - t for layer in self.head_slots for t in layer)
        return {
            "doc_id": self.doc_id,
            "state": self.state,
            "T": self.length,
            "t": self.num_slots,
            "slots": self.num_slots,
            "ratio": round(self.num_slots / self.length, 6) if self.num_slots else None,
            "wasted_slots": wasted,
            "method": self.method,
            "origin": self.origin,
            "config": self.config,
            "timings": self.timings,
            "requests_served": self.requests_served,
        }


class DocumentStore:
    """The documents of one scheduler process (one per TP rank: each compacts its own KV heads)."""

    def __init__(self):
        self.documents: dict[str, Document] = {}
        self._next_index = 1
        self._fingerprint: dict | None = None
        self.stats = Stats()
        self.policy = policy_from_environment()
        self.tracker = ReuseTracker(self.policy) if self.policy is not None else None
        # One solve at a time, off the scheduler's thread (torch releases the GIL inside its kernels).
        self._solver = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="sglang-am-solve")

    def attach(self, server_args, tp_rank: int) -> None:
        """The scheduler built its tree: with ``--enable-metrics``, rank 0 mirrors ``stats`` to Prometheus."""
        if getattr(server_args, "enable_metrics", False) and tp_rank == 0 and not self.stats.prometheus_enabled:
            self.stats.enable_prometheus(server_args.served_model_name or server_args.model_path)

    # ----- lookup used by the request hook, the tree and the attention backend -----

    def ready(self, doc_id: str) -> Document | None:
        doc = self.documents.get(doc_id)
        return doc if doc is not None and doc.state == "ready" else None

    def longest_prefix(self, token_ids) -> Document | None:
        """The longest document, in any state, whose ids are a proper prefix of ``token_ids``."""
        best = None
        for doc in self.documents.values():
            if (best is None or doc.length > best.length) and doc.is_proper_prefix_of(token_ids):
                best = doc
        return best

    # ----- RPC entry point -----

    def call(self, scheduler, op: str, payload: dict) -> dict:
        handler = getattr(self, f"_op_{op}", None)
        if handler is None:
            raise DocumentError(HTTPStatus.BAD_REQUEST, f"unknown document operation {op!r}")
        return handler(scheduler, **payload)

    def _get(self, doc_id: str) -> Document:
        doc = self.documents.get(doc_id)
        if doc is None:
            raise DocumentError(HTTPStatus.NOT_FOUND, f"no document {doc_id!r}")
        return doc

    def _get_ready(self, doc_id: str) -> Document:
        doc = self._get(doc_id)
        if doc.state != "ready":
            raise DocumentError(HTTPStatus.CONFLICT, f"document {doc_id} is still being registered")
        return doc

    def _op_list(self, scheduler) -> dict:
        return {"documents": [doc.describe() for doc in self.documents.values()]}

    def _op_get(self, scheduler, doc_id: str) -> dict:
        return self._get(doc_id).describe()

    def _op_prepare(self, scheduler, input_ids: list[int], budget: int | float, method: str, query_source,
                    head_budgets: dict | None, max_queries_per_head: int, self_study_max_new_tokens: int,
                    options: dict, keep_first: int = 0, auto: bool = False) -> dict:
        """Validate a registration and reserve its id; an existing document is returned as it is."""
        doc_id = document_id(input_ids)
        if doc_id in self.documents:
            return {**self.documents[doc_id].describe(), "existing": True}
        _check_model(scheduler)
        length = len(input_ids)
        if length < MIN_DOCUMENT_TOKENS:
            raise DocumentError(HTTPStatus.BAD_REQUEST, f"document has {length} tokens; the minimum is {MIN_DOCUMENT_TOKENS}")
        max_len = scheduler.max_req_input_len
        if length >= max_len:
            raise DocumentError(HTTPStatus.BAD_REQUEST, f"document has {length} tokens; this server accepts prompts below {max_len}")
        if not 0 <= keep_first <= length - 2:
            raise DocumentError(HTTPStatus.BAD_REQUEST, f"keep_first must be in [0, T - 2] = [0, {length - 2}], got {keep_first}")
        span = length - keep_first
        if isinstance(budget, int) and not 1 <= budget < span:
            raise DocumentError(HTTPStatus.BAD_REQUEST, f"budget must be in [1, T - keep_first) = [1, {span}), got {budget}")
        try:
            get_method(method).make_options(**options)
            fractions = source_fractions(query_source)
            if "random" in fractions:
                raise ValueError("the server captures its reference queries; random queries are not offered")
            proportions = load_head_proportions(head_budgets) if head_budgets is not None else None
        except (KeyError, ValueError, TypeError) as error:
            raise DocumentError(HTTPStatus.BAD_REQUEST, str(error).strip("'\"")) from None
        runner = scheduler.tp_worker.model_runner
        slots = keep_first + (budget if isinstance(budget, int) else max(1, round(budget * span)))
        if auto and slots > self.policy.budget_slots(scheduler.max_total_num_tokens):
            raise DocumentError(HTTPStatus.SERVICE_UNAVAILABLE, f"{slots} slots exceed the automatic-compaction budget")
        # Slots other requests hold now come back; pinned documents' slots do not.
        room = scheduler.max_total_num_tokens - sum(d.num_slots for d in self.documents.values())
        needed = (2 if "repeat-prefill" in fractions else 1) * length + CAPTURE_HEADROOM_SLOTS + slots
        if "self-study" in fractions:  # its sampled answers run side by side after the document
            needed += len(SELF_STUDY_PROMPTS) * (self_study_max_new_tokens + CAPTURE_HEADROOM_SLOTS)
        if room < needed:  # the capture prefill could never be scheduled: refuse instead of waiting forever
            raise DocumentError(HTTPStatus.SERVICE_UNAVAILABLE, f"the KV pool has {room} slots besides compacted documents "
                                f"and registering this document needs about {needed}; drop documents or raise --max-total-tokens")
        pool = runner.token_to_kv_pool
        heads = {(layer, head) for layer in range(pool.layer_num) for head in range(pool.head_num)}
        if proportions is not None and set(proportions) != heads:
            raise DocumentError(HTTPStatus.BAD_REQUEST, f"head_budgets must give one proportion per (layer, KV head) of this "
                                f"model: L0H0 .. L{pool.layer_num - 1}H{pool.head_num - 1}")
        config = {"budget": budget, "query_source": fractions, "head_budgets": head_budgets is not None,
                  "max_queries_per_head": max_queries_per_head, "keep_first": keep_first, "options": options}
        doc = Document(doc_id, self._next_index, array("q", input_ids), method, config, auto=auto,
                       salt=f"sglang-am-capture-{doc_id}-{uuid.uuid4().hex}", proportions=proportions)
        self._next_index += 1
        self.documents[doc_id] = doc
        return {**doc.describe(), "existing": False, "salt": doc.salt}

    def _op_abort(self, scheduler, doc_id: str) -> dict:
        """Forget a registration whose capture or compaction was abandoned (a ready document is left alone)."""
        doc = self.documents.get(doc_id)
        if doc is not None and doc.state != "ready":
            self._discard(scheduler, doc)
        return {"doc_id": doc_id}

    def _op_compact(self, scheduler, doc_id: str, timings: dict) -> dict:
        """Start the solve (first call), then install once it is done; call until ``state`` is "ready"."""
        doc = self._get(doc_id)
        try:
            if doc.state == "capturing":
                doc.timings.update(timings)
                self._start_solve(scheduler, doc)
            # With tensor parallelism every rank must install in the same call: wait for the solve.
            if doc.state == "compacting" and (doc.solve.done() or scheduler.tp_size > 1):
                self._finish_solve(scheduler, doc)
        except Exception as error:
            self._discard(scheduler, doc)
            if isinstance(error, DocumentError):
                raise
            logger.exception("sglang-am: compaction of %s failed", doc_id)
            raise DocumentError(HTTPStatus.INTERNAL_SERVER_ERROR, f"compaction failed: {error!r}") from None
        return doc.describe()

    def _op_drop(self, scheduler, doc_id: str) -> dict:
        doc = self._get_ready(doc_id)
        users = _requests_using(scheduler, doc)
        if users:
            raise DocumentError(HTTPStatus.CONFLICT, f"document {doc_id} is in use by {users} request(s); retry when they finish")
        return {"doc_id": doc_id, "dropped": True, "freed_slots": self._drop(scheduler, doc)}

    def _op_save(self, scheduler, doc_id: str, path: str) -> dict:
        doc = self._get_ready(doc_id)
        _single_rank(scheduler, "save")
        try:
            written = self._save(scheduler, doc, path)
        except (OSError, ValueError) as error:
            raise DocumentError(HTTPStatus.BAD_REQUEST, f"cannot save to {path}: {error}") from None
        return {"doc_id": doc_id, "path": written}

    def _op_load(self, scheduler, path: str, auto: bool = False) -> dict:
        _single_rank(scheduler, "load")
        _check_model(scheduler)
        if not Path(path).is_dir():
            raise DocumentError(HTTPStatus.BAD_REQUEST, f"{path} is not a directory holding a compacted prefix")
        try:
            prefix = CompactedPrefix.load(path, expected_fingerprint=self.fingerprint(scheduler))
        except (OSError, ValueError) as error:
            raise DocumentError(HTTPStatus.BAD_REQUEST, f"cannot load {path}: {error}") from None
        doc_id = document_id(prefix.token_ids)
        if doc_id in self.documents:
            return {**self.documents[doc_id].describe(), "existing": True}
        pool = scheduler.tp_worker.model_runner.token_to_kv_pool
        if prefix.num_layers != pool.layer_num or any(
            tuple(k.shape[0::2]) != (pool.head_num, pool.head_dim) for k in prefix.keys
        ):
            raise DocumentError(HTTPStatus.BAD_REQUEST, f"{path} does not fit this model's KV layout")
        if prefix.logical_length >= scheduler.max_req_input_len:
            raise DocumentError(HTTPStatus.BAD_REQUEST, f"{path} holds a {prefix.logical_length}-token document, too long for this server")
        doc = Document(doc_id, self._next_index, array("q", prefix.token_ids), prefix.method, prefix.config,
                       timings=prefix.timings, auto=auto)
        self._next_index += 1
        head_slots = [[int(n) for n in torch.isfinite(b).sum(dim=1)] for b in prefix.beta]
        if auto:
            self._make_room_for_auto(scheduler, prefix.keys[0].shape[1])
        self._install(scheduler, doc, prefix.keys, prefix.values, prefix.beta, head_slots)
        self.documents[doc_id] = doc
        return {**doc.describe(), "existing": False}

    def _op_auto_poll(self, scheduler) -> dict:
        """Prefixes the reuse tracker proposes that are not documents yet (the HTTP process compacts them)."""
        if self.tracker is None:
            return {"candidates": []}
        named = ((document_id(ids), ids) for ids in self.tracker.take_candidates())
        candidates = [{"doc_id": doc_id, "input_ids": ids} for doc_id, ids in named if doc_id not in self.documents]
        self.stats.add("auto_triggers", len(candidates))
        return {"candidates": candidates}

    def _op_stats(self, scheduler) -> dict:
        """Counters, gauges, the KV pool's accounting and, when the scheduler is idle, SGLang's leak check."""
        tree = scheduler.tree_cache
        idle = scheduler.is_fully_idle()
        check = {"idle": idle, "leak": None, "detail": []}
        if idle:
            leak, messages = scheduler.invariant_checker._check_all_pools(scheduler.pool_stats_observer.get_pool_stats())
            check.update(leak=bool(leak), detail=list(messages) if leak else [])
        states = [doc.state for doc in self.documents.values()]
        return {
            **self.stats.snapshot(),
            "documents": {"ready": states.count("ready"), "registering": len(states) - states.count("ready"),
                          "auto": sum(doc.auto and doc.state == "ready" for doc in self.documents.values())},
            "pool": {"total": scheduler.max_total_num_tokens,
                     "available": scheduler.tp_worker.model_runner.token_to_kv_pool_allocator.available_size(),
                     "evictable": tree.evictable_size(), "protected": tree.protected_size()},
            "idle_check": check,
            "auto": None if self.policy is None else {
                **dataclasses.asdict(self.policy), "budget_slots": self.policy.budget_slots(scheduler.max_total_num_tokens),
                "tracked_prefixes": len(self.tracker.groups), "pending_candidates": len(self.tracker.candidates),
            },
        }

    # ----- document lifecycle -----

    def fingerprint(self, scheduler) -> dict:
        if self._fingerprint is None:
            from ..hf.fingerprint import checkpoint_fingerprint

            try:
                self._fingerprint = checkpoint_fingerprint(scheduler.server_args.model_path)
            except (OSError, ValueError) as error:
                raise DocumentError(HTTPStatus.BAD_REQUEST, f"cannot fingerprint the served model: {error}") from None
        return self._fingerprint

    def hold_source(self, scheduler, doc: Document) -> None:
        """A capture request of ``doc`` finished: lock its KV in the tree (under its private salt) until
        the solve has read it, so pool pressure cannot evict it in between."""
        from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
        from sglang.srt.mem_cache.radix_cache import RadixKey

        if doc.source_lock is not None or doc.state != "capturing" or self.documents.get(doc.doc_id) is not doc:
            return
        tree = scheduler.tree_cache
        match = tree.match_prefix(MatchPrefixParams(key=RadixKey(doc.tokens, cache_salt=doc.salt)))
        if match.device_prefix_len >= doc.length:
            doc.source_lock = tree.lock(match.last_device_node)
            doc.source = tree.path_device_indices(match.last_device_node)[: doc.length]

    def _start_solve(self, scheduler, doc: Document) -> None:
        pool = scheduler.tp_worker.model_runner.token_to_kv_pool
        missing = [s for s in doc.config["query_source"] if s not in doc.queries and s != "random"]
        if missing or any(len(doc.queries[s]) != pool.layer_num for s in doc.queries):
            raise DocumentError(HTTPStatus.INTERNAL_SERVER_ERROR, f"queries were not captured for {missing or 'every layer'}")
        self.hold_source(scheduler, doc)
        if doc.source_lock is None:
            raise DocumentError(HTTPStatus.SERVICE_UNAVAILABLE,
                                "the document's KV was evicted before compaction (KV pool under pressure); register again")
        doc.state = "compacting"
        doc.solve = self._solver.submit(self._solve, pool, doc, doc.source, time.perf_counter())

    def _finish_solve(self, scheduler, doc: Document) -> None:
        keys, values, betas, head_slots, timings, started = doc.solve.result()
        scheduler.tree_cache.unlock(doc.source_lock)
        doc.source_lock, doc.source, doc.solve = None, None, None
        doc.queries.clear()
        doc.timings.update(timings)
        if doc.auto:
            self._make_room_for_auto(scheduler, keys[0].shape[1])
        self._install(scheduler, doc, keys, values, betas, head_slots)
        seconds = time.perf_counter() - started
        doc.timings["compaction_seconds"] = round(seconds, 4)
        self.stats.add("compactions", origin=doc.origin)
        self.stats.add("compaction_seconds", seconds)

    def _discard(self, scheduler, doc: Document) -> None:
        """Forget a document that never became ready, releasing what its compaction held."""
        if doc.solve is not None:
            concurrent.futures.wait([doc.solve])  # the worker thread still reads the locked slots
        if doc.source_lock is not None:
            scheduler.tree_cache.unlock(doc.source_lock)
        doc.source_lock, doc.source, doc.solve = None, None, None
        self.documents.pop(doc.doc_id, None)
        self.stats.add("compaction_failures", origin=doc.origin)

    def _solve(self, pool, doc: Document, source: torch.Tensor, started: float):
        """Runs on the worker thread: reads the pool, touches nothing the scheduler writes."""
        device = pool.k_buffer[0].device
        if device.type == "cuda":  # a new thread starts on cuda:0; the scheduler's rank may use another GPU
            with torch.cuda.device(device):
                return self._solve_on_device(pool, doc, source, started)
        return self._solve_on_device(pool, doc, source, started)

    def _solve_on_device(self, pool, doc: Document, source: torch.Tensor, started: float):
        config = doc.config
        budget, length, kept = config["budget"], doc.length, config["keep_first"]
        generator = torch.Generator().manual_seed(0)
        clock = {"selection": 0.0, "beta": 0.0, "values": 0.0}
        keys, values, betas, head_slots = [], [], [], []
        for layer in range(pool.layer_num):
            # In the pool's dtype: the solver computes in float32, and its GPU path runs FlashInfer in this dtype.
            layer_keys = pool.k_buffer[layer][source].permute(1, 0, 2)  # [H_kv, T, D]
            layer_values = pool.v_buffer[layer][source].permute(1, 0, 2)
            parts = []
            for kind, fraction in config["query_source"].items():
                cap = max(1, round(fraction * config["max_queries_per_head"]))
                captured = torch.cat(doc.queries[kind][layer]).permute(1, 0, 2).float()  # [H_q, n, D]
                parts.append(subsample_queries(pool_queries(captured, pool.head_num), cap, generator))
            budgets = chunk_budgets(budget, length - kept, range(length - kept), layer, pool.head_num,
                                    doc.proportions, max_ratio_per_head=1.0)
            result = compact(layer_keys[:, kept:], layer_values[:, kept:], torch.cat(parts, dim=1).to(layer_keys.device),
                             budgets, doc.method, scale=doc.scales[layer], **config["options"])
            for stage, seconds in result.timings.items():
                clock[stage] += seconds
            # Kept attention-sink tokens come first, verbatim, with beta = 0: [kept | compacted].
            keys.append(torch.cat([layer_keys[:, :kept], result.keys], dim=1))
            values.append(torch.cat([layer_values[:, :kept], result.values], dim=1))
            betas.append(torch.cat([result.beta.new_zeros(pool.head_num, kept), result.beta], dim=1).float())
            head_slots.append([kept + int(n) for n in result.lengths])
        width = max(k.shape[1] for k in keys)  # one slot count for every layer: pad narrower layers
        pad = lambda tensor, fill: torch.nn.functional.pad(tensor, (0, 0) * (tensor.ndim - 2) + (0, width - tensor.shape[1]), value=fill)
        timings = {f"{stage}_seconds": round(seconds, 4) for stage, seconds in clock.items()}
        return ([pad(k, 0.0) for k in keys], [pad(v, 0.0) for v in values], [pad(b, float("-inf")) for b in betas],
                head_slots, timings, started)

    def _make_room_for_auto(self, scheduler, width: int) -> None:
        """Drop (or save, then drop) the least recently used idle automatic documents until ``width``
        more slots fit the automatic budget."""
        budget = self.policy.budget_slots(scheduler.max_total_num_tokens)
        autos = sorted((d for d in self.documents.values() if d.auto and d.state == "ready"), key=lambda d: d.last_used)
        used = sum(d.num_slots for d in autos)
        for victim in autos:
            if used + width <= budget:
                break
            if _requests_using(scheduler, victim):
                continue
            if self.policy.save_dir is not None:
                try:
                    self._save(scheduler, victim, str(Path(self.policy.save_dir) / victim.doc_id))
                except (OSError, ValueError):
                    logger.exception("sglang-am: could not save evicted document %s; dropping it", victim.doc_id)
            used -= victim.num_slots
            self._drop(scheduler, victim)
            self.stats.add("auto_evictions")
        if used + width > budget:
            raise DocumentError(HTTPStatus.SERVICE_UNAVAILABLE, f"automatic documents in use hold {used} of the "
                                f"{budget}-slot budget; {width} more do not fit")

    def _save(self, scheduler, doc: Document, path: str) -> str:
        pool = scheduler.tp_worker.model_runner.token_to_kv_pool
        keys, values = [], []
        for layer in range(pool.layer_num):
            keys.append(pool.k_buffer[layer][doc.slots].permute(1, 0, 2).float().cpu())
            values.append(pool.v_buffer[layer][doc.slots].permute(1, 0, 2).float().cpu())
        prefix = CompactedPrefix(
            keys=keys, values=values, beta=[b.cpu() for b in doc.bias], logical_length=doc.length,
            token_ids=list(doc.tokens), fingerprint=self.fingerprint(scheduler), method=doc.method,
            config=doc.config, timings=doc.timings,
        )
        return str(prefix.save(path))

    def _drop(self, scheduler, doc: Document) -> int:
        tree = scheduler.tree_cache
        tree.unlock(doc.pin)
        freed = tree.remove_subtree(doc.node)
        del self.documents[doc.doc_id]
        self._update_gauges()
        return freed

    def _update_gauges(self) -> None:
        ready = [doc for doc in self.documents.values() if doc.state == "ready"]
        self.stats.set(documents=len(ready), compacted_slots=sum(d.num_slots for d in ready),
                       slots_saved=sum(d.length - d.num_slots for d in ready),
                       auto_slots=sum(d.num_slots for d in ready if d.auto))

    def _install(self, scheduler, doc: Document, keys, values, betas, head_slots) -> None:
        """Write the slots, insert the pinned virtual-id node and activate the document."""
        from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams
        from sglang.srt.mem_cache.radix_cache import RadixKey

        tree = scheduler.tree_cache
        runner = scheduler.tp_worker.model_runner
        pool, allocator = runner.token_to_kv_pool, runner.token_to_kv_pool_allocator
        width = keys[0].shape[1]
        table = getattr(runner.attn_backend, "bias_table", None)
        if table is not None:
            held = sum(d.num_slots for d in self.documents.values() if d.state == "ready")
            if (held + width) * table.kv_heads > table.layer_size:
                raise DocumentError(HTTPStatus.SERVICE_UNAVAILABLE, f"the bias table holds "
                                    f"{table.layer_size // table.kv_heads} compacted slots, {held} in use, {width} more "
                                    "do not fit; drop documents or raise SGLANG_AM_BIAS_SLOTS")
        slots = allocator.alloc(width)
        if slots is None:
            tree.evict(EvictParams(num_tokens=width))
            slots = allocator.alloc(width)
        if slots is None:
            raise DocumentError(HTTPStatus.SERVICE_UNAVAILABLE, f"no room for {width} KV slots; drop documents or raise the KV pool size")
        for layer in range(pool.layer_num):
            pool.k_buffer[layer][slots] = keys[layer].permute(1, 0, 2).to(pool.k_buffer[layer].device, pool.store_dtype)
            pool.v_buffer[layer][slots] = values[layer].permute(1, 0, 2).to(pool.v_buffer[layer].device, pool.store_dtype)
        doc.slots = slots
        doc.bias = [b.to(device=pool.k_buffer[0].device, dtype=torch.float32) for b in betas]
        doc.head_slots = head_slots
        inserted = tree.insert(InsertParams(key=RadixKey(doc.virtual_ids), value=slots.to(torch.int64)))
        if inserted.prefix_len:
            raise RuntimeError(f"virtual ids of document {doc.doc_id} were already in the tree")
        doc.node = inserted.last_device_node
        doc.pin = tree.lock(doc.node)
        doc.state = "ready"
        self._update_gauges()
        if doc.auto:
            self.tracker.release(doc.tokens)
        logger.info("sglang-am: document %s ready: T=%d -> t=%d slots", doc.doc_id, doc.length, doc.num_slots)


def _check_model(scheduler) -> None:
    """Compacted slots count as positions only on full-attention layers in a plain KV layout."""
    runner = scheduler.tp_worker.model_runner
    if not getattr(runner.attn_backend, "adds_document_bias", False):
        raise DocumentError(HTTPStatus.BAD_REQUEST, "compacted documents need a bias-aware attention backend: "
                            "--attention-backend triton, flashinfer or torch_native (CPU)")
    if not runner.spec_algorithm.is_none():
        raise DocumentError(HTTPStatus.BAD_REQUEST, "compacted documents do not support speculative decoding yet")
    config = runner.model_config.hf_config
    kinds = getattr(config, "layer_types", None)
    if kinds:
        sliding = any(kind == "sliding_attention" for kind in kinds)
    else:
        sliding = bool(getattr(config, "sliding_window", None)) and getattr(config, "use_sliding_window", True)
    if sliding:
        raise DocumentError(HTTPStatus.BAD_REQUEST, "sliding-window models are not supported by the SGLang extension")
    pool = runner.token_to_kv_pool
    if not hasattr(pool, "k_buffer") or pool.store_dtype != pool.dtype:
        raise DocumentError(HTTPStatus.BAD_REQUEST, f"compacted documents need a plain {pool.dtype} KV pool (no fp8/fp4 cache)")
    if scheduler.tree_cache.page_size != 1:
        raise DocumentError(HTTPStatus.BAD_REQUEST, "compacted documents need --page-size 1")


def _single_rank(scheduler, what: str) -> None:
    if scheduler.tp_size > 1:
        raise DocumentError(HTTPStatus.NOT_IMPLEMENTED, f"{what} with tensor parallelism is not supported yet")


def _requests_using(scheduler, doc: Document) -> int:
    live = {*scheduler.collect_inflight_reqs(), *scheduler.waiting_queue}
    if scheduler.chunked_req is not None:
        live.add(scheduler.chunked_req)
    return sum(1 for req in live if getattr(req, "am_doc", None) is doc and not req.finished())


STORE = DocumentStore()
