"""SGLang plugin entry point (``sglang.srt.plugins``: ``am``), active only with ``SGLANG_AM=1``.

SGLang runs plugins in each of its processes before building the scheduler, so registration happens
where the cache is created. Today it registers the ``am`` radix-cache backend (``--radix-cache-backend
am``), which is SGLang's own legacy ``RadixCache``; compacted document nodes will live in it.
"""

from __future__ import annotations

import logging
import os

from .compat import check_sglang

ENABLE_VARIABLE = "SGLANG_AM"
RADIX_CACHE_BACKEND = "am"
logger = logging.getLogger(__name__)


def enabled() -> bool:
    return os.environ.get(ENABLE_VARIABLE, "").lower() in ("1", "true", "yes")


def _radix_cache(ctx):
    from sglang.srt.mem_cache.radix_cache import RadixCache

    return RadixCache(ctx.params)


def register() -> None:
    if not enabled():
        return
    check_sglang()  # SGLang logs and swallows plugin errors; the server then reports the unknown backend
    from sglang.srt.mem_cache.registry import register_radix_cache_backend, registered_radix_cache_backends

    if RADIX_CACHE_BACKEND not in registered_radix_cache_backends():
        register_radix_cache_backend(RADIX_CACHE_BACKEND, _radix_cache)
    logger.info("sglang-am: registered radix-cache backend %r", RADIX_CACHE_BACKEND)
