"""The bias-aware ``triton`` attention backend (the default GPU path).

It replaces SGLang's ``triton`` entry and runs SGLang's own extend and decode kernels, adding each
document's beta through their ``score_mod`` hook (``sglang_am.kernels.bias_table``). Per-forward
metadata goes into a persistent buffer in ``init_forward_metadata`` (eager forwards) and
``init_forward_metadata_out_graph`` (CUDA-graph capture and replay), so captured decode graphs read
the current batch's documents. Decode always passes the hook on global layers (never on sliding-window
ones, see ``attention.uses_documents``), so capture and replay match; extend passes it only when a
request in the batch uses a document. The torch_native backend is the oracle.
"""

from __future__ import annotations

from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

from sglang_am.kernels.bias_table import am_bias_score_mod

from ..config import server_config
from .attention import DocumentBiasRows, is_window_layer


class AMTritonAttnBackend(DocumentBiasRows, TritonAttnBackend):
    ROWS_PER_TOKEN = True

    def __init__(self, model_runner, *args, **kwargs):
        super().__init__(model_runner, *args, **kwargs)
        if self.sliding_window_size is not None and self.sliding_window_size > 0:
            # SGLang 0.5.23 gathers a decode query's window as its last ``sliding_window_size`` keys, itself
            # included, one short of the ``sliding_window_size + 1`` that its extend kernel, torch_native,
            # FlashInfer and transformers see (sglang#32087). The gathered windows (eager and CUDA-graph
            # buffers) take one key more; extend stays exact because its kernel masks by the layer's own size.
            # (``compat.HOOKED_ATTRIBUTES`` checks that SGLang's backend still keeps this attribute.)
            self.sliding_window_size += 1
        self.bias_table = self.make_bias_table(model_runner, self.num_head, self.num_kv_head, server_config().bias_slots)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        self.capture_queries(q, layer)
        if self.uses_documents(layer):
            kwargs.update(score_mod=am_bias_score_mod, aux_tensors=[self.bias_table.aux(self.layer_index(layer))])
        return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
        self.capture_queries(q, layer)
        if not is_window_layer(layer):  # window layers never need the bias (``attention.uses_documents``)
            kwargs.update(score_mod=am_bias_score_mod, aux_tensors=[self.bias_table.aux(self.layer_index(layer))])
        return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache, **kwargs)
