"""SGLang plugin entry point (``sglang.srt.plugins``: ``am``), active only with ``SGLANG_AM=1``.

SGLang runs plugins in each of its processes (spawned, so patches made by the launcher never reach
the scheduler; forked from the HTTP server's process where there is no CUDA, and then already registered
there) and then applies the registered hooks. ``register`` only wires; nothing is created at
import or registration time:

- the ``am`` radix-cache backend (``--radix-cache-backend am``): its factory builds, per scheduler, the
  tree, the document registry it owns, and the document operations (with their solver and store threads);
- the bias-aware attention backends, under SGLang's own names (``register_attention_backend``):
  ``triton`` (GPU default), ``flashinfer`` and ``torch_native`` (CPU, and the oracle of the other two);
- the scheduler hooks of ``hooks``;
- in the HTTP server's process, the ``/am/`` routes (``routes``) and, with ``SGLANG_AM_AUTO`` set, the
  automatic-compaction poller (``background.AutoCompactor``).
  With ``SGLANG_AM_FORK_SUBPROCESSES=1`` (the launcher's, without CUDA) SGLang forks its processes
  (``cpu.fork_subprocesses``).
"""

from __future__ import annotations

import inspect
import logging
import multiprocessing
import os

from .compat import check_sglang
from .cpu import FORK_VARIABLE, fork_subprocesses

ENABLE_VARIABLE = "SGLANG_AM"
RADIX_CACHE_BACKEND = "am"
logger = logging.getLogger(__name__)
_hooks_registered = False


def enabled() -> bool:
    return os.environ.get(ENABLE_VARIABLE, "").lower() in ("1", "true", "yes")


def _radix_cache(ctx):
    from sglang.srt.runtime_context import get_parallel

    from .auto import policy_from_environment
    from .config import server_config
    from .scheduler.cache import AMRadixCache
    from .scheduler.layout import layer_windows
    from .scheduler.operations import DocumentOperations
    from .scheduler.registry import DocumentRegistry

    if not ctx.server_args.disable_overlap_schedule:
        raise ValueError("--radix-cache-backend am needs --disable-overlap-schedule: with overlap scheduling the next "
                         "batch is prepared while the current one runs, which compacted documents do not support yet")
    registry = DocumentRegistry(policy_from_environment())
    if ctx.server_args.enable_metrics and ctx.tp_rank == 0:  # rank 0 mirrors the counters to Prometheus
        registry.stats.enable_prometheus(ctx.server_args.served_model_name or ctx.server_args.model_path)
    runner = ctx.tp_worker.model_runner
    pool = runner.token_to_kv_pool
    cache = AMRadixCache(ctx.params, registry, layer_windows(runner.model, getattr(pool, "start_layer", 0), pool.layer_num))
    device = pool.k_buffer[0].device if getattr(pool, "k_buffer", None) else None
    cache.operations = DocumentOperations(cache, server_config(), ctx.server_args.model_path, device,
                                          get_parallel().dp_rank or 0)
    return cache


def _torch_native_backend(runner):
    from .sglang_hooks.attention import AMTorchNativeAttnBackend

    return AMTorchNativeAttnBackend(runner)


def _triton_backend(runner):
    if runner.model_config.is_encoder_decoder:
        raise ValueError("sglang-am's triton backend does not support encoder-decoder models")
    from .sglang_hooks.triton_attention import AMTritonAttnBackend

    return AMTritonAttnBackend(runner)


def _flashinfer_backend(runner):
    if runner.use_mla_backend:
        raise ValueError("sglang-am's flashinfer backend does not support MLA models")
    from .sglang_hooks.flashinfer_attention import AMFlashInferAttnBackend

    return AMFlashInferAttnBackend(runner, init_new_workspace=runner.init_new_workspace)


def _before_http_server(*args, **kwargs):
    """Open the document channel to the schedulers and add the document routes before uvicorn starts."""
    from sglang.srt.entrypoints import http_server

    from .auto import policy_from_environment
    from .channel import channel_for
    from .chat import ChatRenderer
    from .config import server_config
    from .entrypoints.background import AutoCompactor, load_store_at_start, run_during_lifespan
    from .entrypoints.routes import install_routes
    from .entrypoints.service import DocumentService

    bound = inspect.signature(http_server._setup_and_run_http_server).bind(*args, **kwargs).arguments
    config = server_config()
    manager = bound["tokenizer_manager"]
    service = DocumentService(manager, channel_for(manager, config.rpc_timeout), config, ChatRenderer(http_server.app))
    install_routes(http_server.app, service, config, admin_key_set=bool(bound["server_args"].admin_api_key))
    if config.load_store:
        run_during_lifespan(http_server.app, lambda: load_store_at_start(service))
    policy = policy_from_environment()
    if policy is not None:
        run_during_lifespan(http_server.app, AutoCompactor(service, policy).run)
    return None


def register() -> None:
    global _hooks_registered
    if not enabled():
        return
    check_sglang()  # SGLang logs and swallows plugin errors; the server then reports the unknown backend
    from .auto import policy_from_environment
    from .config import server_config

    policy_from_environment()  # a bad SGLANG_AM_AUTO or SGLANG_AM_CONFIG fails here, with its reason
    server_config()
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.mem_cache.registry import register_radix_cache_backend, registered_radix_cache_backends
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from .sglang_hooks import hooks

    if RADIX_CACHE_BACKEND not in registered_radix_cache_backends():
        register_radix_cache_backend(RADIX_CACHE_BACKEND, _radix_cache)
    if _hooks_registered:  # SGLang loads plugins in several code paths of one process
        return
    register_attention_backend("torch_native")(_torch_native_backend)
    register_attention_backend("triton")(_triton_backend)
    register_attention_backend("flashinfer")(_flashinfer_backend)
    scheduler = "sglang.srt.managers.scheduler.Scheduler"
    streamer = "sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer"
    for target, hook, kind in (
        (f"{scheduler}._create_generation_req", hooks.after_create_req, HookType.AFTER),
        (f"{scheduler}.init_req_max_new_tokens", hooks.after_init_max_new_tokens, HookType.AFTER),
        (f"{scheduler}.handle_rpc_request", hooks.around_rpc, HookType.AROUND),
        (f"{scheduler}.process_batch_result", hooks.after_process_batch_result, HookType.AFTER),
        (f"{scheduler}.on_idle", hooks.after_on_idle, HookType.AFTER),
        (f"{scheduler}.send_abort_output", hooks.after_send_abort_output, HookType.AFTER),
        (f"{streamer}.stream_output", hooks.after_stream_output, HookType.AFTER),
        (f"{streamer}.is_request_level_customized_info_key", hooks.request_level_info_key, HookType.AFTER),
        ("sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new", hooks.after_init_new, HookType.AFTER),
    ):
        HookRegistry.register(target, hook, kind)
    if multiprocessing.parent_process() is None:  # the launcher / HTTP server process
        HookRegistry.register("sglang.srt.entrypoints.http_server._setup_and_run_http_server", _before_http_server,
                              HookType.BEFORE)
        HookRegistry.register("sglang.srt.managers.tokenizer_manager.TokenizerManager._validate_one_request",
                              hooks.before_validate_request, HookType.BEFORE)
        if os.environ.get(FORK_VARIABLE) == "1":
            HookRegistry.register("sglang.srt.entrypoints.engine._set_envs_and_config", fork_subprocesses,
                                  HookType.AFTER)
    _hooks_registered = True
    logger.info("sglang-am: registered radix-cache backend %r, the bias-aware attention backends and the document hooks",
                RADIX_CACHE_BACKEND)
