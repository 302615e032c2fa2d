"""The SGLang internals sglang-am hooks, checked at registration time against the pinned release.

SGLang's internals move fast, so the plugin refuses to register on another version, or when a hooked
function's signature differs from the one this code was written against, with an error that names both.
"""

from __future__ import annotations

import inspect
import pkgutil
from importlib import metadata

SGLANG_VERSION = "0.5.23"
# dotted target -> parameter names this package relies on
HOOKED_SIGNATURES = {
    "sglang.srt.mem_cache.registry.register_radix_cache_backend": ("name", "factory"),
    "sglang.srt.mem_cache.radix_cache.RadixCache.__init__": ("self", "params"),
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
