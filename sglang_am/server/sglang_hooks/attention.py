"""What every bias-aware attention backend shares, and the ``torch_native`` one (the CPU path and the oracle
of the GPU kernels).

Per forward, a backend needs each request's document version (for beta on its first t KV positions) and
the query rows to keep: of registrations' capture requests, of the requests an adapting document
serves and of those an observing document's prefix serves in full (``adapt.LiveQueries``: their prompt
positions after the document and, in decode steps, their answers'; a decode
step captured in a CUDA graph runs no Python, so there only eager decode steps are sampled). Requests
are identified the way SGLang's own backends identify them, by their request-pool row: the
``ForwardBatch.init_new`` hook binds each batch's rows (``DocumentRows.bind``), and the backend builds its
``DocumentBatch`` in its forward-metadata step from the batch's ``req_pool_indices``, which every runner
(eager, CUDA-graph replay views) carries.

The ``torch_native`` backend replaces SGLang's entry of that name (every code path that branches on the
backend string still sees ``torch_native``). Each request of an extend is one SDPA call over its new
tokens' queries only, with a float mask: causal ``-inf`` above the diagonal (and outside a sliding
window), plus the document's beta on KV positions ``< t`` (a document's slots are always a request's
first t KV positions). On a sliding-window layer only the keys inside some query's window are gathered, as
a GPU kernel reads them. SGLang's own extend pads every request's queries to its whole KV length and
attends T x T (``_run_sdpa_forward_extend``), which a GPU backend never does: served that way, every
request after a long cached prefix would be slow for a reason that has nothing to do with compaction,
so requests without a document take the efficient path too. Decode steps take the same path with or
without documents, so that a document is measured against no document on one attention path. A
one-token query on a global layer sees every position, so its mask is beta alone, repeated over the
query heads once per version (``Installed.decode_bias``), and none where beta is zero: a document
registered at ratio 1.0 decodes as fast as no document. Encoder and cross attention go to SGLang's
implementation unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.layers.radix_attention import AttentionType
from sglang.srt.mem_cache.memory_pool import KVWriteLoc
from torch.nn.functional import scaled_dot_product_attention

from ..scheduler.registry import RequestRecord


@dataclasses.dataclass
class CaptureSlice:
    """The rows of one forward's query tensor to keep, and where: ``sink(layer, queries, slots, scale)``
    (a registration's capture request, or an adapting document's live queries)."""

    sink: Callable[[int, torch.Tensor, torch.Tensor, float], None]
    query_rows: torch.Tensor
    slots: torch.Tensor


@dataclasses.dataclass
class DocumentBatch:
    versions: list  # per request: the document version (``registry.Installed``) it is served from, or None
    query_lens: list[int]  # per request: its query rows in this forward (1 in decode)
    captures: list[CaptureSlice]

    @property
    def has_documents(self) -> bool:
        return any(version is not None for version in self.versions)

    @functools.cached_property
    def compacts_windows(self) -> bool:
        """Does some document hold compacted windows? Asked once per window layer: computed once per forward."""
        return any(version is not None and version.layout.compacted_windows for version in self.versions)


class DocumentRows:
    """The document (``registry.Served``) and capture request each request-pool row serves now."""

    def __init__(self):
        self._by_row: dict[int, tuple] = {}  # row -> (served, capture, observed, tokens it has generated)

    def bind(self, reqs) -> None:
        for req in reqs:
            record = RequestRecord.of(req)
            if record.served is None and record.capture is None and record.observed is None:
                self._by_row.pop(req.kv.req_pool_idx, None)
            else:
                self._by_row[req.kv.req_pool_idx] = (record.served, record.capture, record.observed, len(req.output_ids))

    def batch(self, forward_batch, eager: bool = True) -> DocumentBatch | None:
        """This forward's documents and captures; None when it has neither (most forwards). A CUDA graph
        (``eager`` false) runs no Python at replay: no live query is planned there, since none would be stored."""
        mode = forward_batch.forward_mode
        if not self._by_row or mode.is_idle() or not (mode.is_decode() or mode.is_extend()):
            return None
        rows = forward_batch.req_pool_indices_cpu
        rows = (rows if rows is not None else forward_batch.req_pool_indices).tolist()
        entries = [self._by_row.get(row, (None, None, None, 0)) for row in rows]
        if all(entry[:3] == (None, None, None) for entry in entries):
            return None
        versions = [served.version if served is not None else None for served, *_ in entries]
        decode = not mode.is_extend()
        query_lens = [1] * len(rows) if decode else list(forward_batch.extend_seq_lens_cpu)
        prefixes = [None] * len(rows) if decode else forward_batch.extend_prefix_lens_cpu
        captures, offset = [], 0
        observing: dict[int, tuple] = {}  # id(observation) -> (observation, its rows in this forward, their requests)
        for (served, capture, observed, generated), prefix, length in zip(entries, prefixes, query_lens):
            if capture is not None and not decode:
                planned = capture.rows.plan(prefix, length, offset)
                if planned is not None:
                    captures.append(CaptureSlice(functools.partial(capture.capture.record, capture.rows), *planned))
            adaptation = served.document.adaptation if served is not None and served.client else None
            # The positions after the document it computes: its prompt's, then its answer's, as far as a registration
            # fits an answer (a long generation would otherwise crowd the prompts out of the reservoir).
            if adaptation is not None and eager and (not decode or generated < adaptation.answer_steps):
                planned = adaptation.live.plan(length)
                if planned is not None:
                    captures.append(CaptureSlice(adaptation.live.record, planned[0] + offset, planned[1]))
            if observed is not None and eager and (not decode or generated < observed.observation.answer_steps):
                # An extend may compute the document's own positions too (nothing cached): only those after it count.
                skip = 0 if decode else min(length, max(0, observed.start - prefix))
                _, rows, parts = observing.setdefault(id(observed.observation), (observed.observation, [], []))
                rows.extend(range(offset + skip, offset + length))
                parts.extend([observed.part] * (length - skip))
            offset += length
        for observation, rows, parts in observing.values():  # one slice per observation: decode steps come in batches
            planned = observation.live.plan(len(rows), parts) if rows else None
            if planned is not None:
                captures.append(CaptureSlice(observation.live.record, torch.tensor(rows)[planned[0]], planned[1]))
        return DocumentBatch(versions, query_lens, captures)


class DocumentAware:
    """Mixin of the bias-aware backends: the per-forward ``documents`` metadata and query capture."""

    adds_document_bias = True  # checked before a document is registered

    def __init__(self, *args, **kwargs):
        self.document_rows = DocumentRows()
        self.documents: DocumentBatch | None = None
        super().__init__(*args, **kwargs)

    def init_forward_metadata(self, forward_batch):
        super().init_forward_metadata(forward_batch)
        self.documents = self.document_rows.batch(forward_batch)

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        super().init_forward_metadata_out_graph(forward_batch, in_capture)
        self.documents = self.document_rows.batch(forward_batch, eager=False)

    def layer_index(self, layer) -> int:
        """``layer``'s index among this rank's layers (a document's per-layer lists are indexed so)."""
        return layer.layer_id - getattr(self.token_to_kv_pool, "start_layer", 0)

    def capture_queries(self, q, layer) -> None:
        """Copy the kept query rows of this forward (post-RoPE, as attention sees them)."""
        if self.documents is None or not self.documents.captures:
            return
        rows = q.view(-1, layer.tp_q_head_num, layer.qk_head_dim)
        index = self.layer_index(layer)
        for part in self.documents.captures:
            part.sink(index, rows[part.query_rows.to(rows.device)], part.slots, layer.scaling)

    def uses_documents(self, layer) -> bool:
        """Does this forward need the documents' bias on ``layer``? On a sliding-window layer only when some
        document compacted its window: a verbatim window is the window's own tokens, right-aligned in the
        node (``layout``), so the backend's stock sliding-window attention is exact there."""
        if self.documents is None or not self.documents.has_documents:
            return False
        if is_window_layer(layer) and not self.documents.compacts_windows:
            return False
        if layer.is_cross_attention:
            raise NotImplementedError("sglang-am serves compacted documents on causal self-attention only")
        return True


class AMTorchNativeAttnBackend(DocumentAware, TorchNativeAttnBackend):
    serves_compacted_windows = True  # its per-request mask takes a window layer's bias (``attention_mask``)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        self.capture_queries(q, layer)
        if layer.is_cross_attention or layer.attn_type == AttentionType.ENCODER_ONLY or forward_batch.encoder_lens is not None:
            self.uses_documents(layer)  # refuses documents on cross attention
            return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
        versions = self.documents.versions if self.uses_documents(layer) else None
        return self._attend(q, k, v, layer, forward_batch, save_kv_cache, forward_batch.extend_seq_lens_cpu, versions)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        self.capture_queries(q, layer)
        if layer.is_cross_attention or forward_batch.encoder_lens is not None:
            self.uses_documents(layer)  # refuses documents on cross attention
            return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
        versions = self.documents.versions if self.uses_documents(layer) else None
        return self._attend(q, k, v, layer, forward_batch, save_kv_cache, [1] * len(forward_batch.seq_lens), versions)

    def _attend(self, q, k, v, layer, forward_batch, save_kv_cache, query_lens, versions):
        """Each request's last ``query_lens`` positions attend to its KV (``versions``: each request's document
        version, whose beta is added; None: no document in this forward)."""
        if save_kv_cache and k is not None and v is not None:
            self.token_to_kv_pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc, self.swa_out_cache_loc), k, v)
        heads, kv_heads, dim = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        queries = q.reshape(-1, heads, dim)
        output = q.new_empty((queries.shape[0], heads, layer.v_head_dim))
        key_cache = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
        value_cache = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
        req_to_token = self.req_to_token_pool.req_to_token
        index, group = self.layer_index(layer), heads // kv_heads
        window = layer.sliding_window_size if is_window_layer(layer) else None
        start = 0
        versions = versions or [None] * len(query_lens)
        for row, kv_len, q_len, version in zip(forward_batch.req_pool_indices.tolist(), forward_batch.seq_lens.tolist(),
                                               query_lens, versions):
            # A window layer's queries see none of the keys before their window: those are not gathered at all.
            first = 0 if window is None else max(0, kv_len - q_len - window)
            slots = req_to_token[row, first:kv_len]
            keys = key_cache[slots].transpose(0, 1).unsqueeze(0).to(queries.dtype)  # [1, H_kv, S, D]
            values = value_cache[slots].transpose(0, 1).unsqueeze(0).to(queries.dtype)
            query = queries[start : start + q_len].transpose(0, 1).unsqueeze(0)  # [1, H_q, L, D]
            if q_len == 1 and window is None:  # a decode step sees every position: beta is all there is to add
                bias = None if version is None else version.decode_bias(index, group, queries.dtype)
                mask = None if bias is None else decode_mask(bias, kv_len)
            else:
                bias = version.bias[index] if version is not None else None
                mask = attention_mask(q_len, kv_len, bias, group, queries.device, window, first).to(queries.dtype)
            out = scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=layer.scaling,
                                               enable_gqa=heads != kv_heads)
            output[start : start + q_len] = out[0].transpose(0, 1)
            start += q_len
        return output.reshape(q.shape[0], heads * layer.v_head_dim)


class DocumentBiasRows(DocumentAware):
    """Mixin for a GPU backend with a ``bias_table``: fills its rows for every forward, at both of SGLang's
    metadata entry points (eager forwards; CUDA-graph capture and replay). ``ROWS_PER_TOKEN``: one row
    per query token (the Triton kernels' ``q_idx``) rather than one per request."""

    ROWS_PER_TOKEN: bool

    def make_bias_table(self, model_runner, q_heads: int, kv_heads: int, capacity_slots: int):
        from sglang_am.kernels.bias_table import BiasTable  # imports triton: not on the torch_native path

        pool_size = model_runner.max_total_num_tokens
        requests = model_runner.req_to_token_pool.size
        return BiasTable(
            num_layers=model_runner.token_to_kv_pool.layer_num,
            kv_heads=kv_heads,
            group=q_heads // kv_heads,
            capacity_slots=min(capacity_slots, pool_size),
            # Every extend token needs a pool slot, every request a request slot; padding rows need slack.
            max_rows=(pool_size + requests if self.ROWS_PER_TOKEN else requests) + 256,
            device=model_runner.device,
        )

    def init_forward_metadata(self, forward_batch):
        super().init_forward_metadata(forward_batch)
        self._write_bias_rows()

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        super().init_forward_metadata_out_graph(forward_batch, in_capture)
        self._write_bias_rows()

    def _write_bias_rows(self) -> None:
        """One row per query token or per request: each used document's (base, t), placing its beta on first use."""
        batch = self.documents
        if batch is None or not batch.has_documents:
            self.bias_table.set_rows([], [], [])
            return
        table = self.bias_table
        bases = [-1 if version is None else table.base_of(version.index, lambda version=version: version.bias)
                 for version in batch.versions]
        slots = [0 if version is None else version.num_slots for version in batch.versions]
        table.set_rows(bases, slots, batch.query_lens if self.ROWS_PER_TOKEN else [1] * len(bases))


def is_window_layer(layer) -> bool:
    return layer.sliding_window_size is not None and layer.sliding_window_size > -1


def decode_mask(bias: torch.Tensor, kv_len: int) -> torch.Tensor:
    """Additive mask ``[1, H_q, 1, kv_len]`` of one query that sees every position: ``bias`` ``[H_q, t]``
    (``Installed.decode_bias``) on the first t, zero after."""
    mask = bias.new_zeros(1, bias.shape[0], 1, kv_len)
    mask[0, :, 0, : bias.shape[1]] = bias
    return mask


def attention_mask(q_len: int, kv_len: int, bias: torch.Tensor | None, group: int, device,
                   window: int | None = None, first: int = 0) -> torch.Tensor:
    """Additive mask ``[1, H_q or 1, q_len, kv_len - first]`` for the last ``q_len`` of ``kv_len`` positions
    over keys ``first..kv_len - 1``: ``-inf`` above the causal diagonal and, on a sliding-window layer, more
    than ``window`` positions below it (SGLang's ``sliding_window_size``), and ``bias`` ``[H_kv, t]``
    (repeated over each GQA group) on KV positions below t."""
    query_pos = torch.arange(kv_len - q_len, kv_len, device=device).unsqueeze(1)
    key_pos = torch.arange(first, kv_len, device=device)
    hidden = key_pos > query_pos
    if window is not None:
        hidden |= key_pos < query_pos - window
    causal = torch.zeros(q_len, kv_len - first, device=device).masked_fill(hidden, float("-inf"))
    if bias is None or bias.shape[1] <= first:
        return causal[None, None]
    per_head = causal.expand(bias.shape[0] * group, q_len, kv_len - first).clone()
    per_head[:, :, : bias.shape[1] - first] += bias[:, first:].repeat_interleave(group, dim=0)[:, None, :]
    return per_head[None]
