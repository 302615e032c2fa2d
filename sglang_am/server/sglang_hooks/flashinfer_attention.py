"""The bias-aware ``flashinfer`` attention backend (``--attention-backend flashinfer``).

SGLang's FlashInfer backend, except that its paged prefill and decode wrappers, eager and CUDA-graph,
run the JIT attention variant ``AMDocumentBias`` (``sglang_am.kernels.flashinfer_bias``), compiled by
FlashInfer with nvcc on first use. The ragged wrapper (an extend's new tokens) stays stock: document
slots are always in a request's cached prefix, which the paged wrapper covers. The wrappers are built
by SGLang's own code; while this backend builds them, the two wrapper names in SGLang's module point to
subclasses that add ``jit_args`` and pass the variant's extra arguments (the current layer's bias
region, the per-request rows, the scale) to every ``run``. The torch_native backend is the oracle.
"""

from __future__ import annotations

import contextlib
import functools

from sglang.srt.layers.attention import flashinfer_backend
from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend

from sglang_am.kernels.flashinfer_bias import jit_args

from ..compat import FLASHINFER_ATTRIBUTES, FLASHINFER_SIGNATURES, check_sglang
from ..config import server_config
from .attention import DocumentBiasRows


def _bias_wrapper(base: type, backend: AMFlashInferAttnBackend, forced: dict) -> type:
    class BiasWrapper(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, **forced})

        def run(self, q, paged_kv_cache, *args, **kwargs):
            # FlashInfer keeps plan()'s scale private (``compat.FLASHINFER_ATTRIBUTES`` checks it is there).
            scale = self._sm_scale if self._sm_scale is not None else q.shape[-1] ** -0.5
            return super().run(q, paged_kv_cache, *backend.variant_arguments(), scale, *args, **kwargs)

        # FlashInfer binds run_return_lse (SGLang's prefix path calls it) to its own run: rebind to ours.
        run_return_lse = functools.partialmethod(run, return_lse=True)

    BiasWrapper.__name__ = BiasWrapper.__qualname__ = f"AMBias{base.__name__}"
    return BiasWrapper


class AMFlashInferAttnBackend(DocumentBiasRows, FlashInferAttnBackend):
    ROWS_PER_TOKEN = False  # the variant reads its row by request (batch_idx)

    def __init__(self, model_runner, *args, **kwargs):
        check_sglang(signatures=FLASHINFER_SIGNATURES, attributes=FLASHINFER_ATTRIBUTES)
        config = model_runner.model_config
        if not model_runner.spec_algorithm.is_none():
            raise ValueError("sglang-am's flashinfer backend does not support speculative decoding "
                             "(its verify wrappers would lose their tree mask); use --attention-backend triton")
        args_for_variant = jit_args(model_runner.dtype, model_runner.kv_cache_dtype, config.head_dim)
        self._wrappers = {
            "BatchPrefillWithPagedKVCacheWrapper": _bias_wrapper(
                flashinfer_backend.BatchPrefillWithPagedKVCacheWrapper, self,
                {"jit_args": args_for_variant, "backend": "fa2"}),
            "BatchDecodeWithPagedKVCacheWrapper": _bias_wrapper(
                flashinfer_backend.BatchDecodeWithPagedKVCacheWrapper, self,
                {"jit_args": args_for_variant, "backend": "fa2", "use_tensor_cores": True}),
        }
        self._layer = 0
        with self._building_bias_wrappers():
            super().__init__(model_runner, *args, **kwargs)
        # SGLang validates the KV access only for its own class: do it for this subclass too.
        for phase, backend in (("prefill", model_runner.prefill_attention_backend_str),
                               ("decode", model_runner.decode_attention_backend_str)):
            if backend == "flashinfer":
                self._check_kv_attention_access(phase, getattr(self, f"{phase}_kv_access"))
        if self.num_wrappers != 1 or self.prefill_uses_dequant_workspace or self.decode_uses_dequant_workspace:
            raise ValueError("sglang-am's flashinfer backend serves full-attention models with a plain KV cache only "
                             "(its variant has no sliding window or cross-attention); use --attention-backend triton")
        heads = self.indices_updater_decode
        self.bias_table = self.make_bias_table(model_runner, heads.num_qo_heads, heads.num_kv_heads,
                                               server_config().bias_slots)

    @contextlib.contextmanager
    def _building_bias_wrappers(self):
        # Swaps module names SGLang's code reads at call time (``compat.FLASHINFER_ATTRIBUTES`` lists them).
        saved = {name: getattr(flashinfer_backend, name) for name in self._wrappers}
        try:
            for name, wrapper in self._wrappers.items():
                setattr(flashinfer_backend, name, wrapper)
            yield
        finally:
            for name, original in saved.items():
                setattr(flashinfer_backend, name, original)

    def _create_decode_wrappers(self, *args, **kwargs):
        with self._building_bias_wrappers():
            return super()._create_decode_wrappers(*args, **kwargs)

    def _create_prefill_wrappers(self, *args, **kwargs):
        with self._building_bias_wrappers():
            return super()._create_prefill_wrappers(*args, **kwargs)

    def _create_full_cg_prefill_wrappers(self, *args, **kwargs):
        with self._building_bias_wrappers():
            return super()._create_full_cg_prefill_wrappers(*args, **kwargs)

    def variant_arguments(self) -> list:
        """The variant's extra tensors for the layer running now, in declaration order."""
        return [self.bias_table.layer_region(self._layer), self.bias_table.rows()]

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        self._layer = self.layer_index(layer)
        self.capture_queries(q, layer)
        self.uses_documents(layer)  # refuses a layer the variant cannot serve
        return super().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        self._layer = self.layer_index(layer)
        self.capture_queries(q, layer)
        return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache)
