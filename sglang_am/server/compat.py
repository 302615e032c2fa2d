"""The SGLang internals sglang-am hooks, checked at registration time against the pinned release.

SGLang's internals move fast, so the plugin refuses to register on another version, or when a hooked
function's signature differs from the one this code was written against, with an error that names both.
"""

from __future__ import annotations

import dataclasses
import inspect
import pkgutil
from importlib import metadata

SGLANG_VERSION = "0.5.23"
_SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"
_TORCH_NATIVE = "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend"
_RADIX = "sglang.srt.mem_cache.radix_cache.RadixCache"
_TRITON = "sglang.srt.layers.attention.triton_backend.TritonAttnBackend"
_FLASHINFER = "sglang.srt.layers.attention.flashinfer_backend.FlashInferAttnBackend"
_ATTENTION = ("self", "q", "k", "v", "layer", "forward_batch", "save_kv_cache")
# dotted target -> parameter names this package relies on
HOOKED_SIGNATURES = {
    "sglang.srt.mem_cache.registry.register_radix_cache_backend": ("name", "factory"),
    "sglang.srt.layers.attention.attention_registry.register_attention_backend": ("name",),
    f"{_RADIX}.__init__": ("self", "params"),
    f"{_RADIX}.insert": ("self", "params"),
    f"{_RADIX}.match_prefix": ("self", "params"),
    f"{_RADIX}.evict": ("self", "params"),
    f"{_RADIX}.path_device_indices": ("self", "node"),
    f"{_RADIX}._delete_leaf": ("self", "node"),
    "sglang.srt.mem_cache.base_prefix_cache.BasePrefixCache.lock": ("self", "node"),
    "sglang.srt.mem_cache.base_prefix_cache.BasePrefixCache.unlock": ("self", "lock"),
    "sglang.srt.mem_cache.allocator.base.BaseTokenToKVPoolAllocator.get_kvcache": ("self",),
    "sglang.srt.mem_cache.allocator.base.BaseTokenToKVPoolAllocator.free": ("self", "free_index"),
    "sglang.srt.mem_cache.allocator.token.TokenToKVPoolAllocator.alloc": ("self", "need_size"),
    "sglang.srt.managers.schedule_batch.Req.set_finish_with_abort": ("self", "error_msg", "status_code", "err_type"),
    f"{_SCHEDULER}._create_generation_req": ("self", "recv_req", "args", "kwargs"),
    f"{_SCHEDULER}.init_req_max_new_tokens": ("self", "req"),
    f"{_SCHEDULER}.handle_rpc_request": ("self", "recv_req"),
    f"{_SCHEDULER}.process_batch_result": ("self", "batch", "result"),
    f"{_SCHEDULER}.on_idle": ("self",),
    f"{_SCHEDULER}.send_abort_output": ("self", "abort_req", "req"),
    "sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer.stream_output": (
        "self", "reqs", "return_logprob", "skip_req",
    ),
    f"{_SCHEDULER}.is_fully_idle": ("self", "for_health_check", "ignore_waiting"),
    "sglang.srt.managers.scheduler_components.invariant_checker.SchedulerInvariantChecker._check_all_pools": (
        "self", "ps", "uncached",
    ),
    "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new": (
        "batch", "model_runner", "capture_hidden_mode", "return_hidden_states_before_norm",
        "extend_position_info", "spec_mrope_positions", "kv_loc_plan", "write_cols",
    ),
    f"{_TORCH_NATIVE}.init_forward_metadata": ("self", "forward_batch"),
    f"{_TORCH_NATIVE}.forward_extend": _ATTENTION,
    f"{_TORCH_NATIVE}.forward_decode": _ATTENTION,
    f"{_TRITON}.__init__": ("self", "model_runner", "skip_prefill", "kv_indptr_buf", "dllm_fa4"),
    f"{_TRITON}.forward_extend": (*_ATTENTION, "sinks", "score_mod", "aux_tensors"),
    f"{_TRITON}.forward_decode": (*_ATTENTION, "sinks", "score_mod", "aux_tensors"),
    f"{_TRITON}.init_forward_metadata": ("self", "forward_batch"),
    f"{_TRITON}.init_forward_metadata_out_graph": ("self", "forward_batch", "in_capture"),
    "sglang.kernels.ops.attention.score_mod.unpack_aux_tensors": ("score_mod", "aux_tensors"),
    # The decode window the triton backend widens by one key (``triton_attention``).
    "sglang.srt.layers.attention.triton_backend.update_sliding_window_buffer": (
        "window_kv_indptr", "translator", "plan", "req_pool_indices", "sliding_window_size", "seq_lens", "bs",
        "device", "token_to_kv_pool", "window_kv_indices",
    ),
    "sglang.srt.layers.radix_attention.RadixAttention.__init__": (
        "self", "num_heads", "head_dim", "scaling", "num_kv_heads", "layer_id", "logit_cap", "v_head_dim",
        "sliding_window_size", "is_cross_attention", "pos_encoding_mode", "logit_capping_method", "quant_config",
        "attn_type", "use_irope", "prefix", "use_prefill_attention_wrapper",
    ),
    f"{_FLASHINFER}.__init__": (
        "self", "model_runner", "skip_prefill", "kv_indptr_buf", "kv_last_page_len_buf", "init_new_workspace",
    ),
    f"{_FLASHINFER}._create_decode_wrappers": ("self", "bs", "num_tokens"),
    f"{_FLASHINFER}._create_prefill_wrappers": ("self", "bs", "use_custom_mask"),
    f"{_FLASHINFER}._create_full_cg_prefill_wrappers": ("self", "num_slots", "max_num_tokens"),
    f"{_FLASHINFER}._check_kv_attention_access": ("self", "phase", "access"),
    f"{_FLASHINFER}.forward_extend": _ATTENTION,
    f"{_FLASHINFER}.forward_decode": _ATTENTION,
    f"{_FLASHINFER}.init_forward_metadata": ("self", "forward_batch"),
    f"{_FLASHINFER}.init_forward_metadata_out_graph": ("self", "forward_batch", "in_capture"),
    "sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer."
    "is_request_level_customized_info_key": ("self", "key"),
    # The control path document operations travel (``channel``).
    "sglang.srt.managers.tokenizer_manager.TokenizerManager._dispatch_to_scheduler": ("self", "obj"),
    "sglang.srt.managers.tokenizer_manager.TokenizerManager.auto_create_handle_loop": ("self",),
    "sglang.srt.managers.io_struct.hook_custom_types": ("new_types",),
    "sglang.utils.TypeBasedDispatcher.__iadd__": ("self", "other"),
    "sglang.srt.managers.data_parallel_controller.DataParallelController.send_control_message": ("self", "obj"),
    f"{_SCHEDULER}.send_control_output": ("self", "output", "recv_req"),
    # Documents given as chat messages are rendered by SGLang's own chat handler (``chat``).
    "sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat._process_messages": (
        "self", "request", "is_multimodal", "output_constrained",
    ),
    # Prompt token ids are checked against the vocabulary before they reach a scheduler (``hooks``).
    "sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request": ("self", "obj", "input_ids"),
    "sglang.srt.entrypoints.http_server._setup_and_run_http_server": (
        "server_args", "tokenizer_manager", "template_manager", "port_args", "scheduler_infos",
        "subprocess_watchdog", "execute_warmup_func", "launch_callback",
    ),
}


# The FlashInfer wrappers SGLang's flashinfer backend builds (named in its module only where FlashInfer
# runs, so checked when the bias-aware flashinfer backend starts, not at registration).
_WRAPPERS = "sglang.srt.layers.attention.flashinfer_backend"
FLASHINFER_SIGNATURES = {
    f"{_WRAPPERS}.BatchPrefillWithPagedKVCacheWrapper": (
        "float_workspace_buffer", "kv_layout", "use_cuda_graph", "qo_indptr_buf", "paged_kv_indptr_buf",
        "paged_kv_indices_buf", "paged_kv_last_page_len_buf", "custom_mask_buf", "mask_indptr_buf", "backend",
        "jit_args", "jit_kwargs", "variant_owns_mask",
    ),
    f"{_WRAPPERS}.BatchDecodeWithPagedKVCacheWrapper": (
        "float_workspace_buffer", "kv_layout", "use_cuda_graph", "use_tensor_cores", "paged_kv_indptr_buffer",
        "paged_kv_indices_buffer", "paged_kv_last_page_len_buffer", "backend", "jit_args",
    ),
}


# ForwardBatch fields the attention backends read to find a forward's documents and capture rows.
FORWARD_BATCH_FIELDS = ("forward_mode", "positions", "req_pool_indices", "req_pool_indices_cpu", "seq_lens",
                        "extend_seq_lens_cpu", "extend_prefix_lens_cpu")


def check_sglang(expected_version: str = SGLANG_VERSION, signatures: dict[str, tuple[str, ...]] = HOOKED_SIGNATURES) -> None:
    """Raise ``RuntimeError`` unless the installed SGLang is ``expected_version`` with the expected signatures
    (and, for the full check, the ``ForwardBatch`` fields the backends read)."""
    installed = metadata.version("sglang")
    if installed != expected_version:
        raise RuntimeError(f"sglang-am needs sglang=={expected_version}, found sglang {installed}")
    for target, expected in signatures.items():
        try:
            parameters = tuple(inspect.signature(pkgutil.resolve_name(target)).parameters)
        except (ImportError, AttributeError) as error:
            raise RuntimeError(f"sglang {installed} has no {target} ({error}); "
                               f"sglang-am needs sglang=={expected_version}") from None
        if parameters != expected:
            raise RuntimeError(
                f"sglang {installed}: {target}{parameters} differs from the expected {expected}; "
                f"sglang-am needs sglang=={expected_version}"
            )
    if signatures is HOOKED_SIGNATURES:
        from sglang.srt.model_executor.forward_batch_info import ForwardBatch

        missing = set(FORWARD_BATCH_FIELDS) - {field.name for field in dataclasses.fields(ForwardBatch)}
        if missing:
            raise RuntimeError(f"sglang {installed}: ForwardBatch has no {sorted(missing)}; "
                               f"sglang-am needs sglang=={expected_version}")
