"""The server's counters and gauges."""

import pytest

from sglang_am.server.scheduler.metrics import Stats


def test_stats_count_by_label_and_refuse_wrong_labels():
    stats = Stats()
    stats.add("compactions", origin="auto")
    stats.add("compactions", origin="auto")
    stats.add("fallbacks", reason="not_ready")
    stats.set(documents=2)
    snapshot = stats.snapshot()
    assert snapshot["counters"]["compactions"] == {"auto": 2}
    assert snapshot["counters"]["fallbacks"] == {"not_ready": 1}
    assert snapshot["counters"]["hits"] == 0
    assert snapshot["gauges"]["documents"] == 2
    with pytest.raises(ValueError, match="origin"):
        stats.add("compactions")
