"""Reference queries captured during a registration's own prefills, bounded as they arrive.

Each capture request (one source's prompt: the document, its repeat, or a self-study answer) keeps a
seeded random subset of its query positions, drawn when the request arrives, so memory is fixed up
front (``nbytes``), counted by the admission check, and never grows with the document: the solver
later caps the pooled queries per KV head at the source's share of ``max_queries_per_head`` and
needs no more than ``ceil(share / group)`` positions, each carrying all of its query heads. A
question's capture keeps every position of the question and of its answer (the registration bounds
how many there are), and knows which question each belongs to and which predict the answer. The
attention backend copies the kept rows of every layer into the buffer during the forward pass; a
failure there (out of memory, say) marks the capture failed instead of stopping the forward.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from .. import faults


def capture_salt(salt: str, source: str) -> str:
    """The cache namespace of a capture request. Context-prefill captures the document's own positions, so it
    must never find them cached by another capture; the others capture positions after the document and
    share its cached KV."""
    return f"{salt}-context" if source == "context-prefill" else salt


# Questions are few and decide the answers: each keeps all its positions, its answer's included.
EVERY_POSITION_SOURCES = ("questions",)


class CaptureRows:
    """One capture request's kept query positions (absolute, in ``[start, stop)``) and their rows. ``part``:
    which of its source's requests it is (a question's index); ``answer_from``: the position of the first
    token of the question's answer (the positions from the one before it predict the answer), else ``stop``."""

    def __init__(self, start: int, stop: int, keep: int, last_layer: int, generator: torch.Generator, part: int = 0,
                 answer_from: int | None = None):
        span = stop - start
        self.stop, self.part = stop, part
        self.answer_from = stop if answer_from is None else answer_from
        chosen = torch.randperm(span, generator=generator)[:keep] if keep < span else torch.arange(span)
        self.positions = chosen.sort().values + start  # CPU int64
        self.last_layer = last_layer
        self.rows: dict[int, torch.Tensor] = {}  # per kept layer [kept, H_q, D]
        # Positions computed and stored; a prefix another capture cached (the start of a self-study prompt,
        # say) is never computed, so its positions stay empty.
        self.filled = torch.zeros(len(self.positions), dtype=torch.bool)
        self.finished = False  # the capture request ran to its end (set by the scheduler hook)

    def plan(self, prefix: int, length: int, offset: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For one forward that computes positions ``[prefix, prefix + length)`` of this request, whose
        query rows start at row ``offset``: (rows of the forward's query tensor, buffer slots), or None."""
        low = int(torch.searchsorted(self.positions, prefix))
        high = int(torch.searchsorted(self.positions, prefix + length))
        if low == high:
            return None
        return self.positions[low:high] - prefix + offset, torch.arange(low, high)

    def store(self, layer: int, queries: torch.Tensor, slots: torch.Tensor) -> None:
        """``queries`` ``[n, H_q, D]`` go to buffer ``slots`` of ``layer``."""
        faults.inject("capture")
        if layer not in self.rows:
            self.rows[layer] = queries.new_empty((len(self.positions), *queries.shape[1:]))
        self.rows[layer][slots.to(queries.device)] = queries
        if layer == self.last_layer:  # every kept layer has them now
            self.filled[slots] = True

    def queries(self, layer: int) -> torch.Tensor:
        """The stored rows of ``layer`` ``[n, H_q, D]``."""
        return self.rows[layer][self.filled.to(self.rows[layer].device)]


class QueryCapture:
    """Every capture request of one document, by source, on the layers the solve compacts."""

    def __init__(self, fractions: dict[str, float], max_queries_per_head: int, parts: dict[str, int],
                 longest: dict[str, int], group: int, layers: Sequence[int], bytes_per_row: int, seed: int = 0):
        """``parts``: capture requests per source; ``longest``: the most positions one of them captures;
        ``layers``: the layers whose queries are kept (a verbatim window layer needs none)."""
        self.fractions, self.parts, self.layers = fractions, parts, tuple(layers)
        def positions(source: str, fraction: float) -> int:
            """Per capture request: the source's pooled-query cap over the GQA group (each position carries all
            its query heads), split over its parts, and never more than the request has, so that ``nbytes`` is
            what the buffers take at most."""
            if source in EVERY_POSITION_SOURCES:
                return longest[source]
            pooled = max(1, round(fraction * max_queries_per_head))
            return min(longest[source], math.ceil(math.ceil(pooled / group) / parts[source]))

        self.keep = {source: positions(source, fraction) for source, fraction in fractions.items()}
        self.nbytes = sum(self.keep[s] * parts[s] for s in fractions) * len(self.layers) * bytes_per_row
        self.requests: dict[str, list[CaptureRows]] = {source: [] for source in fractions}
        self.scales: dict[int, float] = {}  # each kept layer's softmax scale, as the model runs it
        self.error: str | None = None
        self._generator = torch.Generator().manual_seed(seed)

    def add_request(self, source: str, start: int, stop: int, part: int = 0, answer_from: int | None = None) -> CaptureRows:
        requests = self.requests.get(source)
        if requests is None or len(requests) >= self.parts[source] or not 0 <= start < stop or not (
            0 <= part < self.parts[source] and all(rows.part != part for rows in requests)
        ) or (answer_from is not None and not start < answer_from <= stop):
            raise ValueError(f"unexpected capture request for {source!r}")
        rows = CaptureRows(start, stop, self.keep[source], self.layers[-1], self._generator, part, answer_from)
        self.requests[source].append(rows)
        return rows

    def record(self, rows: CaptureRows, layer: int, queries: torch.Tensor, slots: torch.Tensor, scale: float) -> None:
        """Called inside the forward pass: a failure marks this capture failed and the forward goes on."""
        if self.error is not None or layer not in self.layers:
            return
        try:
            rows.store(layer, queries, slots)
            self.scales[layer] = scale
        except Exception as error:  # noqa: BLE001  (out of memory, say: the registration fails, not the batch)
            self.error = f"capturing reference queries failed: {error!r}"

    def problem(self) -> str | None:
        """Why these queries cannot be used (a failure, or a source not fully captured), or None."""
        if self.error is not None:
            return self.error
        for source, requests in self.requests.items():
            if len(requests) != self.parts[source] or not all(rows.finished for rows in requests):
                return f"the {source} queries were not captured: a capture request did not finish (aborted?)"
            if not any(bool(rows.filled.any()) for rows in requests):
                return f"no {source} query was captured"
        return None

    def queries(self, layer: int) -> dict[str, torch.Tensor]:
        """``{source: [H_q, n, D]}`` of ``layer``."""
        return {source: torch.cat([rows.queries(layer) for rows in requests if rows.filled.any()]).transpose(0, 1)
                for source, requests in self.requests.items()}

    def answer_positions(self) -> dict[str, torch.Tensor]:
        """``{source: bool [n]}`` marking, in ``queries``' order, the positions that predict a request's answer
        (from the question's last position on; without an answer, its last position: the query that predicts
        the answer's first token)."""
        return self._per_row(lambda rows: rows.positions[rows.filled] >= rows.answer_from - 1)

    def parts_of_rows(self) -> dict[str, torch.Tensor]:
        """``{source: int64 [n]}``: in ``queries``' order, which request (a question's index) each row comes from."""
        return self._per_row(lambda rows: torch.full((int(rows.filled.sum()),), rows.part, dtype=torch.long))

    def _per_row(self, marks) -> dict[str, torch.Tensor]:
        per_source = {}
        for source, requests in self.requests.items():
            filled = [rows for rows in requests if rows.filled.any()]
            if filled:
                per_source[source] = torch.cat([marks(rows) for rows in filled])
        return per_source

    def release(self) -> None:
        """The registration ended: free the buffers; capture requests still running record nothing more."""
        self.error = self.error or "the registration ended"
        self.requests = {source: [] for source in self.fractions}


@dataclasses.dataclass(frozen=True)
class CaptureTag:
    """What a capture request records into: its document, that document's capture and its kept rows."""

    document: object
    capture: QueryCapture
    rows: CaptureRows
