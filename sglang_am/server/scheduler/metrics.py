"""Counters and gauges of the scheduler's documents, for ``GET /am/stats`` and SGLang's Prometheus.

``Stats`` is the one record: ``/am/stats`` reads it over the RPC, and with ``--enable-metrics`` every
update is mirrored into ``prometheus_client`` metrics named ``sglang:am_*``, which SGLang's
``/metrics`` endpoint collects from the scheduler process (multiprocess mode).
"""

from __future__ import annotations

from collections import Counter

# name -> (help, label names)
COUNTERS = {
    "compactions": ("Documents compacted and installed, by origin (explicit or auto).", ("origin",)),
    "compaction_seconds": ("Seconds spent solving compactions.", ()),
    "loads": ("Documents installed from the store, by origin (explicit or auto).", ("origin",)),
    "handoffs": ("Documents installed from another data-parallel rank's compaction, by origin.", ("origin",)),
    "compaction_failures": ("Registrations abandoned, refused or failed after prepare (capture or solve), by origin.",
                            ("origin",)),
    "hits": ("Requests served from a compacted document.", ()),
    "fallbacks": ("Requests starting with a document (boundary_miss: all but its last tokens) but served with the "
                  "full prefix, by reason.", ("reason",)),
    "auto_triggers": ("Prefixes proposed for automatic compaction.", ()),
    "auto_evictions": ("Automatic documents dropped to stay within the budget (saved first if configured).", ()),
    "store_failures": ("Writes to the document store that failed (disk full, quota, I/O errors).", ()),
    "refits": ("Adapting documents refitted from live queries and installed as a new version.", ()),
    "refit_failures": ("Refits that failed or found no room to install; the document kept serving its version.", ()),
    "observed_requests": ("Requests served in full while their prefix's automatic document learned from them.", ()),
    "reverts": ("Learned documents whose live error stayed above the bound, or whose recent answers disagreed with the "
                "full prefix's: back to their full prefix, observing.", ()),
    "answer_audits": ("Installed learned nodes' recent greedy answers checked against the full prefix's.", ()),
    "answer_refusals": ("Learned nodes whose held-out requests' greedy answers through them missed the agreement "
                        "bound: not installed.", ()),
    "background_failures": ("Failed steps of the scheduler's document upkeep after a batch (an extension bug; "
                            "serving went on).", ()),
}
GAUGES = {
    "documents": "Compacted documents installed.",
    "compacted_slots": "KV slots held by compacted documents.",
    "slots_saved": "Document tokens minus compacted slots, over installed documents.",
    "auto_slots": "KV slots held by automatic documents.",
    "adapt_host_bytes": "Host memory reserved by adapting and watched documents (their refit inputs or compacted "
                        "layers' KV, and live queries).",
    "adapt_live_error_max": "The largest live fidelity among adapting and watched documents: the relative attention "
                            "error of the version serving on live positions it was not fitted to (0: none measured).",
}


class Stats:
    def __init__(self):
        self.counts: Counter = Counter()  # (name, label values) -> value
        self.gauges = dict.fromkeys(GAUGES, 0)
        self._prometheus: dict | None = None

    @property
    def prometheus_enabled(self) -> bool:
        return self._prometheus is not None

    def enable_prometheus(self, model_name: str) -> None:
        """Create the ``sglang:am_*`` metrics (call once, in the scheduler, after SGLang set up
        ``PROMETHEUS_MULTIPROC_DIR``)."""
        from prometheus_client import Counter as PromCounter
        from prometheus_client import Gauge as PromGauge

        self._labels = {"model_name": model_name}
        metrics = {name: PromCounter(f"sglang:am_{name}", text, labelnames=["model_name", *labels])
                   for name, (text, labels) in COUNTERS.items()}
        metrics.update({name: PromGauge(f"sglang:am_{name}", text, labelnames=["model_name"], multiprocess_mode="mostrecent")
                        for name, text in GAUGES.items()})
        self._prometheus = metrics

    def add(self, name: str, amount: float = 1, **labels) -> None:
        names = COUNTERS[name][1]
        if set(labels) != set(names):
            raise ValueError(f"counter {name} takes labels {names}, got {tuple(labels)}")
        self.counts[(name, tuple(labels[n] for n in names))] += amount
        if self._prometheus is not None:
            self._prometheus[name].labels(**self._labels, **labels).inc(amount)

    def set(self, **values) -> None:
        for name, value in values.items():
            self.gauges[name] = value
            if self._prometheus is not None:
                self._prometheus[name].labels(**self._labels).set(value)

    def snapshot(self) -> dict:
        counters: dict = {}
        for (name, label_values), value in sorted(self.counts.items()):
            if label_values:
                counters.setdefault(name, {})[label_values[0]] = value
            else:
                counters[name] = value
        for name, (_, labels) in COUNTERS.items():
            counters.setdefault(name, {} if labels else 0)
        return {"counters": counters, "gauges": dict(self.gauges)}


def merge_idle_checks(checks: list[dict]) -> dict:
    """SGLang's idle leak checks of several schedulers (ranks, or servers) as one: idle if all are, leaking if any
    is, unknown (None) if any could not tell (it was busy)."""
    leaks = [check["leak"] for check in checks]
    return {"idle": all(check["idle"] for check in checks), "leak": None if None in leaks else any(leaks),
            "detail": [line for check in checks for line in check["detail"]]}
