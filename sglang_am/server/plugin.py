"""SGLang plugin entry point (``sglang.srt.plugins``: ``am``), active only with ``SGLANG_AM=1``.

SGLang runs plugins in each of its processes (spawned, so patches made by the launcher never reach
the scheduler) and then applies the registered hooks. ``register`` wires everything:

- the ``am`` radix-cache backend (``--radix-cache-backend am``): compacted documents are pinned nodes;
- the bias-aware attention backends, under SGLang's own names: ``triton`` (GPU default),
  ``flashinfer`` and ``torch_native`` (CPU, and the oracle of the other two);
- scheduler hooks: request rewrite, ``max_new_tokens`` clamp, position offsets, holding a finished
  capture's KV, the document RPC and
  the ``am_document`` entry of a response's ``meta_info`` (see ``hooks``);
- in the HTTP server's process, the ``/am/documents`` and ``/am/stats`` routes (see ``routes``) and,
  with ``SGLANG_AM_AUTO`` set, the automatic-compaction poller (see ``auto``).
"""

from __future__ import annotations

import inspect
import logging
import multiprocessing
import os

from .compat import check_sglang

ENABLE_VARIABLE = "SGLANG_AM"
RADIX_CACHE_BACKEND = "am"
logger = logging.getLogger(__name__)
_hooks_registered = False


def enabled() -> bool:
    return os.environ.get(ENABLE_VARIABLE, "").lower() in ("1", "true", "yes")


def _radix_cache(ctx):
    from .cache import AMRadixCache
    from .documents import STORE

    STORE.attach(ctx.server_args, ctx.tp_rank)
    return AMRadixCache(ctx.params)


def _torch_native_backend(runner):
    from .attention import AMTorchNativeAttnBackend

    return AMTorchNativeAttnBackend(runner)


def _triton_backend(runner):
    if runner.model_config.is_encoder_decoder:
        raise ValueError("sglang-am's triton backend does not support encoder-decoder models")
    from .triton_attention import AMTritonAttnBackend

    return AMTritonAttnBackend(runner)


def _flashinfer_backend(runner):
    if runner.use_mla_backend:
        raise ValueError("sglang-am's flashinfer backend does not support MLA models")
    from .flashinfer_attention import AMFlashInferAttnBackend

    return AMFlashInferAttnBackend(runner, init_new_workspace=runner.init_new_workspace)


def _before_http_server(*args, **kwargs):
    """Open the RPC socket to the scheduler and add the document routes before uvicorn starts."""
    from sglang.srt.entrypoints import http_server
    from sglang.srt.utils.network import get_zmq_socket
    import zmq

    from .auto import policy_from_environment
    from .routes import install_routes
    from .service import AutoCompactor, DocumentService, SchedulerRPC, run_during_lifespan

    bound = inspect.signature(http_server._setup_and_run_http_server).bind(*args, **kwargs).arguments
    socket = get_zmq_socket(zmq.Context(1), zmq.DEALER, bound["port_args"].rpc_ipc_name, True)
    service = DocumentService(bound["tokenizer_manager"], SchedulerRPC(socket))
    install_routes(http_server.app, service)
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

    policy_from_environment()  # a bad SGLANG_AM_AUTO fails here, with its reason, in every process
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.mem_cache.registry import register_radix_cache_backend, registered_radix_cache_backends
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from . import hooks

    if RADIX_CACHE_BACKEND not in registered_radix_cache_backends():
        register_radix_cache_backend(RADIX_CACHE_BACKEND, _radix_cache)
    if _hooks_registered:  # SGLang loads plugins in several code paths of one process
        return
    ATTENTION_BACKENDS["torch_native"] = _torch_native_backend
    ATTENTION_BACKENDS["triton"] = _triton_backend
    ATTENTION_BACKENDS["flashinfer"] = _flashinfer_backend
    scheduler = "sglang.srt.managers.scheduler.Scheduler"
    HookRegistry.register(f"{scheduler}._create_generation_req", hooks.after_create_req, HookType.AFTER)
    HookRegistry.register(f"{scheduler}.init_req_max_new_tokens", hooks.after_init_max_new_tokens, HookType.AFTER)
    HookRegistry.register(f"{scheduler}.handle_rpc_request", hooks.around_rpc, HookType.AROUND)
    HookRegistry.register(f"{scheduler}.process_batch_result", hooks.after_process_batch_result, HookType.AFTER)
    HookRegistry.register("sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new",
                          hooks.after_init_new, HookType.AFTER)
    HookRegistry.register(
        "sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer.is_request_level_customized_info_key",
        hooks.request_level_info_key, HookType.AFTER,
    )
    if multiprocessing.parent_process() is None:  # the launcher / HTTP server process
        HookRegistry.register("sglang.srt.entrypoints.http_server._setup_and_run_http_server", _before_http_server, HookType.BEFORE)
    _hooks_registered = True
    logger.info("sglang-am: registered radix-cache backend %r, the bias-aware attention backends and the document hooks",
                RADIX_CACHE_BACKEND)
