"""The SGLang internals sglang-am hooks, checked at registration time against the pinned release.

SGLang's internals move fast, so the plugin refuses to register on another version, or when a hooked
function's signature differs from the one this code was written against, with an error that names both.
"""

from __future__ import annotations

import inspect
import pkgutil
from importlib import metadata

SGLANG_VERSION = "0.5.23"
_SCHEDULER = "sglang.srt.managers.scheduler.Scheduler"
_TORCH_NATIVE = "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend"
_RADIX = "sglang.srt.mem_cache.radix_cache.RadixCache"
# dotted target -> parameter names this package relies on
HOOKED_SIGNATURES = {
    "sglang.srt.mem_cache.registry.register_radix_cache_backend": ("name", "factory"),
    f"{_RADIX}.__init__": ("self", "params"),
    f"{_RADIX}.insert": ("self", "params"),
    f"{_RADIX}.match_prefix": ("self", "params"),
    f"{_RADIX}._delete_leaf": ("self", "node"),
    f"{_SCHEDULER}._create_generation_req": ("self", "recv_req", "args", "kwargs"),
    f"{_SCHEDULER}.init_req_max_new_tokens": ("self", "req"),
    f"{_SCHEDULER}.handle_rpc_request": ("self", "recv_req"),
    f"{_SCHEDULER}.process_batch_result": ("self", "batch", "result"),
    f"{_SCHEDULER}.is_fully_idle": ("self", "for_health_check", "ignore_waiting"),
    "sglang.srt.managers.scheduler_components.invariant_checker.SchedulerInvariantChecker._check_all_pools": (
        "self", "ps", "uncached",
    ),
    "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new": (
        "batch", "model_runner", "capture_hidden_mode", "return_hidden_states_before_norm",
        "extend_position_info", "spec_mrope_positions", "kv_loc_plan", "write_cols",
    ),
    f"{_TORCH_NATIVE}.forward_extend": ("self", "q", "k", "v", "layer", "forward_batch", "save_kv_cache"),
    f"{_TORCH_NATIVE}.forward_decode": ("self", "q", "k", "v", "layer", "forward_batch", "save_kv_cache"),
    "sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer."
    "is_request_level_customized_info_key": ("self", "key"),
    "sglang.srt.entrypoints.http_server._setup_and_run_http_server": (
        "server_args", "tokenizer_manager", "template_manager", "port_args", "scheduler_infos",
        "subprocess_watchdog", "execute_warmup_func", "launch_callback",
    ),
}


def check_sglang(expected_version: str = SGLANG_VERSION, signatures: dict[str, tuple[str, ...]] = HOOKED_SIGNATURES) -> None:
    """Raise ``RuntimeError`` unless the installed SGLang is ``expected_version`` with the expected signatures."""
    installed = metadata.version("sglang")
    if installed != expected_version:
        raise RuntimeError(f"sglang-am needs sglang=={expected_version}, found sglang {installed}")
    for target, expected in signatures.items():
        try:
            parameters = tuple(inspect.signature(pkgutil.resolve_name(target)).parameters)
        except (ImportError, AttributeError) as error:
            raise RuntimeError(f"sglang {installed} has no {target} ({error}); sglang-am needs sglang=={expected_version}") from None
        if parameters != expected:
            raise RuntimeError(
                f"sglang {installed}: {target}{parameters} differs from the expected {expected}; "
                f"sglang-am needs sglang=={expected_version}"
            )
