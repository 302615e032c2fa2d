"""The radix cache the plugin hands SGLang."""

from types import SimpleNamespace

import pytest


def test_the_radix_cache_refuses_overlap_scheduling_with_the_reason():
    from sglang_am.server.plugin import _radix_cache

    context = SimpleNamespace(server_args=SimpleNamespace(disable_overlap_schedule=False))
    with pytest.raises(ValueError, match="--radix-cache-backend am needs --disable-overlap-schedule"):
        _radix_cache(context)
