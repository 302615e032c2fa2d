"""The SGLang internals sglang-am hooks, checked at registration time against the pinned release.

SGLang's internals move fast, so the plugin refuses to register on another version, when a hooked
function's signature differs from the one this code was written against, or when an attribute it reads
or replaces is gone, with an error that names what changed. It also holds the model checks a document
registration runs on the scheduler: what the served model and its backend must be for documents.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import pkgutil
import textwrap
from http import HTTPStatus
from importlib import metadata
from typing import Literal

from .errors import DocumentError

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
    "sglang.srt.mem_cache.radix_cache.RadixKey.__init__": (
        "self", "token_ids", "extra_key", "is_bigram", "limit", "cache_salt",
    ),
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
    # Where there is no CUDA, SGLang's processes are forked (``cpu.fork_subprocesses``).
    "sglang.srt.entrypoints.engine._set_envs_and_config": ("server_args",),
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


AttributeUse = Literal["read", "replace", "add"]


@dataclasses.dataclass(frozen=True)
class TouchedAttribute:
    """An attribute sglang-am relies on: of an SGLang class or module (or of a library SGLang drives), which
    it reads, calls or passes (``read``), assigns or overrides (``replace``), or sets where SGLang has none
    (``add``: it must stay SGLang's own, absent)."""

    owner: str  # dotted class or module
    name: str
    use: AttributeUse = "read"


def _touches(owner: str, names: str, use: AttributeUse = "read") -> tuple[TouchedAttribute, ...]:
    return tuple(TouchedAttribute(owner, name, use) for name in names.split())


_TOKENIZER_MANAGER = "sglang.srt.managers.tokenizer_manager.TokenizerManager"
_REQ = "sglang.srt.managers.schedule_batch.Req"
_FORWARD_BATCH = "sglang.srt.model_executor.forward_batch_info.ForwardBatch"
_TOKENIZED_REQ = "sglang.srt.managers.io_struct.TokenizedGenerateReqInput"
HOOKED_ATTRIBUTES = (
    # Replaced: the result dispatcher, by itself plus the document answers' handler (``channel``); the HTTP
    # server's lifespan, by one that runs a task meanwhile (``run_during_lifespan``); the triton decode
    # window, widened by one key (``triton_attention``); a request rewritten to a document (``hooks``).
    TouchedAttribute(_TOKENIZER_MANAGER, "_result_dispatcher", "replace"),
    TouchedAttribute("starlette.routing.Router", "lifespan_context", "replace"),
    TouchedAttribute(_TRITON, "sliding_window_size", "replace"),
    *_touches(_REQ, "origin_input_ids customized_info", "replace"),
    TouchedAttribute("sglang.srt.sampling.sampling_params.SamplingParams", "max_new_tokens", "replace"),
    TouchedAttribute(_TOKENIZED_REQ, "logprob_start_len", "replace"),
    TouchedAttribute(_FORWARD_BATCH, "positions", "replace"),
    # Read on the scheduler's side: by its hooks, the radix-cache factory and the document operations.
    *_touches(_SCHEDULER, "tree_cache tp_worker tp_size tp_group max_req_input_len max_req_len max_total_num_tokens "
                          "invariant_checker pool_stats_observer"),
    *_touches("sglang.srt.managers.scheduler_components.pool_stats_observer.SchedulerPoolStatsObserver",
              "get_pool_stats"),
    *_touches("sglang.srt.distributed.parallel_state.GroupCoordinator", "cpu_group"),
    *_touches("sglang.srt.runtime_context.ParallelContext", "dp_rank num_dp_ranks"),
    *_touches("sglang.srt.managers.tp_worker.TpModelWorker", "model_runner"),
    *_touches("sglang.srt.model_executor.model_runner.ModelRunner",
              "model model_config attn_backend token_to_kv_pool token_to_kv_pool_allocator req_to_token_pool "
              "max_total_num_tokens device dtype kv_cache_dtype spec_algorithm is_hybrid_swa use_mla_backend "
              "init_new_workspace prefill_attention_backend_str decode_attention_backend_str"),
    *_touches("sglang.srt.speculative.spec_info.SpeculativeAlgorithm", "is_none"),
    *_touches("sglang.srt.configs.model_config.ModelConfig",
              "is_encoder_decoder is_multimodal attention_chunk_size num_attention_heads head_dim vocab_size"),
    *_touches("sglang.srt.mem_cache.registry.TreeCacheBuildContext", "server_args params tp_worker tp_rank"),
    *_touches("sglang.srt.mem_cache.cache_init_params.CacheInitParams", "page_size"),
    *_touches("sglang.srt.server_args.ServerArgs",
              "disable_overlap_schedule enable_metrics served_model_name model_path admin_api_key"),
    # The KV pool and the radix tree documents are written into and captures read from.
    *_touches("sglang.srt.mem_cache.memory_pool.MHATokenToKVPool",
              "k_buffer v_buffer layer_num start_layer head_num head_dim v_head_dim dtype store_dtype "
              "get_key_buffer get_value_buffer set_kv_buffer"),
    *_touches("sglang.srt.mem_cache.memory_pool.ReqToTokenPool", "req_to_token size"),
    *_touches("sglang.srt.mem_cache.allocator.base.BaseTokenToKVPoolAllocator", "available_size free_segment"),
    *_touches(_RADIX, "token_to_kv_pool_allocator root_node kv_events"),
    *_touches("sglang.srt.mem_cache.radix_cache.TreeNode", "children value lock_ref evicted"),
    *_touches("sglang.srt.mem_cache.events.KVCacheEventRecorder", "record_remove"),
    *_touches("sglang.srt.mem_cache.base_prefix_cache.MatchPrefixParams", "req"),
    *_touches("sglang.srt.mem_cache.base_prefix_cache.MatchResult", "device_prefix_len last_device_node"),
    *_touches("sglang.srt.mem_cache.base_prefix_cache.InsertResult", "prefix_len last_device_node"),
    # Requests and batches.
    *_touches(_REQ, "rid sampling_params extra_key cache_salt kv finished finished_reason"),
    *_touches("sglang.srt.managers.schedule_batch.ReqKvInfo", "req_pool_idx"),
    *_touches("sglang.srt.sampling.sampling_params.SamplingParams", "custom_params"),
    *_touches(_TOKENIZED_REQ, "input_embeds mm_inputs positional_embed_overrides"),
    *_touches("sglang.srt.managers.io_struct.RpcReqInput", "method parameters"),
    *_touches("sglang.srt.managers.io_struct.GenerateReqInput",
              "input_ids sampling_params cache_salt routed_dp_rank return_logprob top_logprobs_num logprob_start_len "
              "token_ids_logprob"),
    *_touches("sglang.srt.managers.schedule_batch.ScheduleBatch", "reqs extend_lens"),
    *_touches(_FORWARD_BATCH, "forward_mode req_pool_indices req_pool_indices_cpu seq_lens extend_seq_lens_cpu "
                              "extend_prefix_lens_cpu out_cache_loc encoder_lens"),
    *_touches("sglang.srt.model_executor.forward_batch_info.ForwardMode", "is_idle is_decode is_extend"),
    # The attention layers, and the backends the bias-aware ones extend.
    *_touches("sglang.srt.layers.radix_attention.RadixAttention",
              "layer_id sliding_window_size tp_q_head_num tp_k_head_num qk_head_dim v_head_dim scaling is_cross_attention "
              "attn_type"),
    *_touches("sglang.srt.layers.radix_attention.AttentionType", "ENCODER_ONLY"),
    *_touches(_TORCH_NATIVE, "token_to_kv_pool req_to_token_pool swa_out_cache_loc"),
    *_touches(_TRITON, "token_to_kv_pool num_head num_kv_head"),
    *_touches(_FLASHINFER, "token_to_kv_pool num_wrappers indices_updater_decode prefill_kv_access decode_kv_access "
                           "prefill_uses_dequant_workspace decode_uses_dequant_workspace"),
    *_touches("sglang.srt.layers.attention.flashinfer_backend.FlashInferIndicesUpdaterDecode", "num_qo_heads num_kv_heads"),
    # The HTTP server's (or an Engine's) process; ``openai_serving_chat`` is set on ``app.state`` by the
    # server's lifespan.
    *_touches("sglang.srt.entrypoints.http_server", "app openai_serving_chat"),
    *_touches("sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat", "tokenizer_manager"),
    *_touches("sglang.srt.entrypoints.openai.protocol.MessageProcessingResult", "prompt_ids"),
    *_touches(_TOKENIZER_MANAGER, "model_config tokenizer generate_request"),
    *_touches("sglang.srt.entrypoints.engine.Engine", "tokenizer_manager loop"),
    # Added: each request's record (``registry.RequestRecord``), the tokenizer manager's one channel, and what
    # the ``am`` radix cache holds beside its base class's state.
    TouchedAttribute(_REQ, "am", "add"),
    TouchedAttribute(_TOKENIZER_MANAGER, "am_channel", "add"),
    *_touches(_RADIX, "registry windows operations", "add"),
)

# Checked with ``FLASHINFER_SIGNATURES``: the wrapper names SGLang's module holds while the bias-aware backend
# builds its wrappers, and what the bias wrappers take from FlashInfer's own (``flashinfer_attention``).
FLASHINFER_ATTRIBUTES = (
    *_touches(_WRAPPERS, "BatchPrefillWithPagedKVCacheWrapper BatchDecodeWithPagedKVCacheWrapper", "replace"),
    *_touches("flashinfer.BatchPrefillWithPagedKVCacheWrapper", "run run_return_lse", "replace"),
    *_touches("flashinfer.BatchDecodeWithPagedKVCacheWrapper", "run run_return_lse", "replace"),
    *_touches("flashinfer.BatchPrefillWithPagedKVCacheWrapper", "_sm_scale"),
    *_touches("flashinfer.BatchDecodeWithPagedKVCacheWrapper", "_sm_scale"),
)


def check_sglang(expected_version: str = SGLANG_VERSION, signatures: dict[str, tuple[str, ...]] = HOOKED_SIGNATURES,
                 attributes: tuple[TouchedAttribute, ...] = HOOKED_ATTRIBUTES) -> None:
    """Raise ``RuntimeError`` unless the installed SGLang is ``expected_version`` with the expected signatures
    and attributes."""
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
    missing = _missing_attributes(tuple(attribute for attribute in attributes if attribute.use != "add"))
    if missing:
        raise RuntimeError(f"sglang {installed}: {'; '.join(missing)} not found; sglang-am needs sglang=={expected_version}")
    taken = _present_attributes(tuple(attribute for attribute in attributes if attribute.use == "add"))
    if taken:
        raise RuntimeError(f"sglang {installed}: {'; '.join(taken)} already exist; sglang-am adds attributes of these "
                           f"names and needs sglang=={expected_version}")


def _missing_attributes(attributes: tuple[TouchedAttribute, ...]) -> list[str]:
    """Each of ``attributes`` the installed packages lack, with what sglang-am does with it (an owner that
    is gone is named once)."""
    by_owner: dict[str, list[TouchedAttribute]] = {}
    for attribute in attributes:
        by_owner.setdefault(attribute.owner, []).append(attribute)
    missing = []
    for owner, touched in by_owner.items():
        try:
            target = pkgutil.resolve_name(owner)
        except (ImportError, AttributeError) as error:
            missing.append(f"{owner} ({error})")
            continue
        absent = [attribute for attribute in touched if not _declares(target, attribute.name)]
        assigned = _assigned(target, {attribute.name for attribute in absent}) if absent else set()
        missing += [f"{owner}.{attribute.name} (which sglang-am {attribute.use}s)"
                    for attribute in absent if attribute.name not in assigned]
    return missing


def _present_attributes(attributes: tuple[TouchedAttribute, ...]) -> list[str]:
    """Each of ``attributes`` (ones sglang-am adds) that the installed packages already define."""
    taken = []
    for attribute in attributes:
        target = pkgutil.resolve_name(attribute.owner)
        if _declares(target, attribute.name) or _assigned(target, {attribute.name}):
            taken.append(f"{attribute.owner}.{attribute.name}")
    return taken


def _declares(target, name: str) -> bool:
    """Is ``name`` an attribute of class or module ``target``, or a dataclass field (not one without a default)?"""
    return hasattr(target, name) or (dataclasses.is_dataclass(target)
                                     and name in {field.name for field in dataclasses.fields(target)})


def _assigned(target, names: set[str]) -> set[str]:
    """Those of ``names`` that ``target``'s source assigns. An instance attribute exists only on an instance,
    so ``self.<name> = ...`` in a method of the class or of a base stands for it; in a module,
    ``<object>.<name> = ...`` for one it sets on an object it owns (``app.state.openai_serving_chat``)."""
    found = set()
    for tree in _parsed_sources(target):
        found.update(node.attr for node in _assigned_attributes(tree) if node.attr in names
                     and (inspect.ismodule(target) or (isinstance(node.value, ast.Name) and node.value.id == "self")))
        if found == names:
            break
    return found


def _assigned_attributes(tree: ast.AST):
    """The ``<object>.<name>`` that ``tree`` assigns, tuple targets included (not ``+=``: it needs one already)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                yield from (part for part in ast.walk(target)
                            if isinstance(part, ast.Attribute) and isinstance(part.ctx, ast.Store))


def _parsed_sources(target):
    """A module's source, or that of each method of a class and its bases, parsed (a method at a time:
    ``inspect.getsource`` of a whole class parses its module, seconds for SGLang's scheduler)."""
    if inspect.ismodule(target):
        yield ast.parse(inspect.getsource(target))
        return
    for base in target.__mro__:
        for member in vars(base).values():
            function = getattr(member, "__func__", member)  # a classmethod's or staticmethod's
            if not inspect.isfunction(function):
                continue
            # Skipped, so what only it assigns counts as missing: a function without a source file (a dataclass's
            # generated ``__init__``), or one that does not dedent (a string with lines at column 0).
            try:
                tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
            except (OSError, SyntaxError):
                continue
            yield tree


# ----- what a document needs of the served model (checked per registration, on the scheduler) -----

def check_model(scheduler) -> None:
    """Documents need a bias-aware backend and one plain KV pool for every layer (global and sliding-window
    layers alike, see ``layout``)."""
    runner = scheduler.tp_worker.model_runner
    if not getattr(runner.attn_backend, "adds_document_bias", False):
        raise DocumentError(HTTPStatus.BAD_REQUEST, "compacted documents need a bias-aware attention backend: "
                            "--attention-backend triton, flashinfer or torch_native (CPU)")
    if not runner.spec_algorithm.is_none():
        raise DocumentError(HTTPStatus.BAD_REQUEST, "compacted documents do not support speculative decoding yet")
    if runner.is_hybrid_swa or runner.model_config.attention_chunk_size is not None:
        raise DocumentError(HTTPStatus.BAD_REQUEST, "compacted documents need one KV pool for every layer; this model "
                            "uses SGLang's hybrid sliding-window pool or chunked attention, which the extension does not "
                            "support yet")
    pool = runner.token_to_kv_pool
    if not hasattr(pool, "k_buffer") or pool.store_dtype != pool.dtype:
        raise DocumentError(HTTPStatus.BAD_REQUEST, f"compacted documents need a plain {pool.dtype} KV pool (no fp8/fp4 cache)")


def check_compacted_windows(runner) -> None:
    if not getattr(runner.attn_backend, "serves_compacted_windows", False):
        raise DocumentError(HTTPStatus.BAD_REQUEST, "compacted sliding-window layers are served on --attention-backend "
                            "torch_native only: the Triton and FlashInfer kernels gather a decode query's window from "
                            "its start, where the bias hook would need each slot's place in the node")


def single_rank(scheduler, what: str) -> None:
    if scheduler.tp_size > 1:
        raise DocumentError(HTTPStatus.NOT_IMPLEMENTED, f"{what} with tensor parallelism is not supported yet")
