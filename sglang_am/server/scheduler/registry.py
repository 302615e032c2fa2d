"""The documents of one scheduler process: their states, lookup by prompt, and who is using them.

A document moves through explicit states; what it holds in each is released by whoever moves it on
(a certifying one holds a candidate node, fitted without its held-out questions, that only the
registration's probes are served from, and its solved node waiting to be installed):

    CAPTURING --(captures done)--> SOLVING --(solved)--> READY
                                      |  ^
              (with held-out questions)  (the next rung)
                                      v  |
                                   CERTIFYING --(accepted)--> READY
    LOADING ----(read from the store)--------------------> READY
    OBSERVING --(its requests' queries certify a node)----> READY --(live figure out of bounds)--> OBSERVING

Any state can end with removal (drop, cancel, failure). A request rewritten to a document holds a
reference until it ends (``acquire``/``release``), so drop and eviction refuse while one is held:
a request that is queued, grammar-queued or retracted still needs the document's node. A ready
document can be refitted (``adapt``): the refit is a new version, a node of its own, and a request
finishes on the version it started with; a retired version is removed once no request holds it. An
observing document (automatic compaction learning from traffic, ``adapt.Observation``) is no registration in
progress: the requests that reuse its prefix are served in full, and tagged so that their queries are kept.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import time
from array import array
from http import HTTPStatus
from typing import TYPE_CHECKING

import torch

from ..auto import AutoPolicy, ReuseTracker
from ..errors import DocumentError
from .layout import NodeLayout
from .metrics import Stats
from .store import check_document_id

if TYPE_CHECKING:
    from sglang.srt.mem_cache.radix_cache import TreeNode

    from .adapt import Adaptation, Observation
    from .cache import SourceHold
    from .capture import CaptureTag, QueryCapture
    from .jobs import Job
    from .solve import Solved, SolvePlan

# Virtual ids: -(1 + (index << 32) + slot). Negative, so they collide with no vocabulary id and no
# multimodal pad id (those are large positive values); never embedded (always inside the prefix).
_VIRTUAL_SHIFT = 32
# A prompt that follows a document but for its last few tokens is counted as a boundary miss: how few.
BOUNDARY_TOKENS = 8


class DocState(enum.Enum):
    CAPTURING = "capturing"
    SOLVING = "solving"
    CERTIFYING = "certifying"
    LOADING = "loading"
    WAITING = "waiting"  # on a data-parallel rank, for the rank that compacts it
    OBSERVING = "observing"  # learning from the requests that reuse it (``adapt.Observation``)
    READY = "ready"


IN_PROGRESS = (DocState.CAPTURING, DocState.SOLVING, DocState.CERTIFYING, DocState.LOADING, DocState.WAITING)


def virtual_ids(index: int, count: int) -> array:
    """The ids of document ``index``'s ``count`` slots."""
    base = 1 + (index << _VIRTUAL_SHIFT)
    return array("q", (-(base + j) for j in range(count)))


def document_id(token_ids) -> str:
    """The SHA-256 of the document's token ids (int64): the same document has the same id everywhere."""
    return hashlib.sha256(array("q", token_ids).tobytes()).hexdigest()


@dataclasses.dataclass(eq=False)
class Installed:
    """One version of a document in the KV pool and the tree: its slots, its pinned node, and beta per layer."""

    slots: torch.Tensor  # [t] KV-pool slot indices
    node: TreeNode
    pin: TreeNode  # the node's parent path, locked while the version is installed
    bias: list[torch.Tensor]  # per layer [H_kv, t] float32, on the pool's device
    head_slots: list[list[int]]  # per layer, real slots per KV head (the rest is padding)
    layout: NodeLayout  # where each layer's slots sit in the node
    slot_bytes: int  # one slot of one layer in the pool (keys and values)
    index: int  # this version's virtual-id namespace and bias-table key
    users: int = 0  # requests served from this version that have not ended
    _decode_bias: dict = dataclasses.field(default_factory=dict, repr=False)  # (layer, group, dtype) -> decode_bias

    def decode_bias(self, layer: int, group: int, dtype: torch.dtype) -> torch.Tensor | None:
        """``layer``'s beta per query head ``[H_q, t]`` in ``dtype``, made once: what a decode step adds to its first
        t logits; None where beta is all zero (nothing compacted there: plain attention is exact)."""
        key = (layer, group, dtype)
        if key not in self._decode_bias:
            beta = self.bias[layer]
            self._decode_bias[key] = beta.repeat_interleave(group, dim=0).to(dtype) if beta.any() else None
        return self._decode_bias[key]

    @functools.cached_property
    def virtual_ids(self) -> array:
        """The ids that key this version's node (every request served from it starts with them)."""
        return virtual_ids(self.index, self.num_slots)

    def kv_bytes(self, length: int) -> dict[str, int]:
        """Pool bytes held, by layer type, and what the ``length`` tokens would hold uncompacted."""
        held = self.layout.kv_bytes(self.slot_bytes)
        return {**held, "total": sum(held.values()), "uncompacted": length * self.slot_bytes * len(self.layout.windows)}

    @property
    def num_slots(self) -> int:
        return int(self.slots.numel())


@dataclasses.dataclass(eq=False)
class Document:
    doc_id: str
    index: int  # the virtual-id namespace and the bias-table key
    tokens: array
    method: str
    config: dict
    auto: bool  # proposed by the reuse tracker: counted in the automatic budget, evictable
    state: DocState
    timings: dict = dataclasses.field(default_factory=dict)
    # While registering or loading (released by whoever ends that state):
    capture: QueryCapture | None = None
    source: SourceHold | None = None  # the captured KV, or a learned explicit document's full prefix, locked in the tree
    job: Job | None = None  # the solve or the store read in flight
    plan: SolvePlan | None = None  # a registration's
    salt: str = ""  # the capture requests' cache namespace
    adapt_bytes: int = 0  # host memory an adapting document reserved at admission (``adapt``)
    handoff: bool = False  # loading another data-parallel rank's compaction
    candidate: Installed | None = None  # certifying: the node fitted without the held-out questions
    solved: Solved | None = None  # certifying: the solve whose node is installed once the candidate passes
    # Once ready:
    installed: Installed | None = None  # the version new requests are served from
    retired: list[Installed] = dataclasses.field(default_factory=list)  # earlier versions requests still hold
    adaptation: Adaptation | None = None  # live queries and refits, for a document registered with adapt
    observation: Observation | None = None  # an automatic document learning from traffic, until it is installed
    users: int = 0  # requests rewritten to it that have not ended
    requests_served: int = 0
    last_used: float = dataclasses.field(default_factory=time.monotonic)

    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def num_slots(self) -> int:
        return 0 if self.installed is None else self.installed.num_slots

    @property
    def origin(self) -> str:
        return "auto" if self.auto else "explicit"

    @property
    def pinned_slots(self) -> int:
        """Slots it holds in the pool: its versions (the current one, retired ones still in use, a candidate), and
        the full prefix a client's learning document pins while it observes (a registration's capture holds briefly)."""
        candidate = 0 if self.candidate is None else self.candidate.num_slots
        prefix = self.length if self.observation is not None and self.source is not None else 0
        return self.num_slots + candidate + prefix + sum(version.num_slots for version in self.retired)

    def is_proper_prefix_of(self, token_ids) -> bool:
        """Do ``token_ids`` start with this document and go on for at least one more token?"""
        return len(token_ids) > self.length and array("q", token_ids[: self.length]) == self.tokens

    def describe(self) -> dict:
        head_slots = self.installed.head_slots if self.installed is not None else []
        return {
            "doc_id": self.doc_id,
            "state": self.state.value,
            "T": self.length,
            "t": self.num_slots,
            "slots": self.num_slots,
            "ratio": round(self.num_slots / self.length, 6) if self.num_slots else None,
            "wasted_slots": sum(self.num_slots - t for layer in head_slots for t in layer),
            "kv_bytes": self.installed.kv_bytes(self.length) if self.installed is not None else None,
            "method": self.method,
            "origin": self.origin,
            "config": {key: value for key, value in self.config.items() if key != "fidelity"},
            "fidelity": self.config.get("fidelity"),  # kept in the config, which the stored artifact carries
            "timings": self.timings,
            "requests_served": self.requests_served,
            "requests_active": self.users,
            # An adapting or learned document's refits and live figure; a watched one's live figure ("watch").
            **({} if self.adaptation is None else
               {"adapt" if self.config.get("adapt") else "watch": self.adaptation.describe()}),
            **({} if self.observation is None else
               {"observe": {**self.observation.describe(), "prefix_pinned": self.source is not None}}),
        }


@dataclasses.dataclass(eq=False)
class Served:
    """What a request rewritten to a document holds (``RequestRecord.served``): the document and the version it
    started on."""

    document: Document
    version: Installed
    client: bool = True  # a client's request (not a registration's probe): its queries may feed refits
    held: bool = True  # until the request ends

    @property
    def position_offset(self) -> int:
        """Added to the RoPE positions of the request's tokens after the document: ``T - t``."""
        return self.document.length - self.version.num_slots


@dataclasses.dataclass(frozen=True)
class Observed:
    """A request that reuses an observing document's prefix: the observation its queries go to, under its number."""

    observation: Observation
    part: int
    start: int  # the document's length: the request's positions from here on are kept


@dataclasses.dataclass(eq=False)
class RequestRecord:
    """The extension's state on one SGLang ``Req``, its ``am`` attribute (the one it adds to SGLang's ``Req``)."""

    internal: bool = False  # a registration's own request (self-study sample): not a client's reuse
    capture: CaptureTag | None = None  # a registration's capture request: the rows it records
    served: Served | None = None  # the document the request was rewritten to
    observed: Observed | None = None  # served in full while its document learns from it
    extends_document: bool = False  # its prompt goes on after a document, in any state: no reuse of a new prefix

    @staticmethod
    def attach(req) -> RequestRecord:
        """``req``'s record, created on the first write."""
        record = getattr(req, "am", None)
        if record is None:
            record = req.am = RequestRecord()
        return record

    @staticmethod
    def of(req) -> RequestRecord:
        """``req``'s record to read: an empty one for a request the extension never wrote to."""
        return getattr(req, "am", None) or _NO_RECORD


_NO_RECORD = RequestRecord()


class DocumentRegistry:
    """Documents by id, in any state; the reuse tracker and the counters of this scheduler."""

    def __init__(self, policy: AutoPolicy | None):
        self.documents: dict[str, Document] = {}
        self._next_index = 1
        self.stats = Stats()
        self.policy = policy
        self.tracker = ReuseTracker(policy) if policy is not None else None

    def new_index(self) -> int:
        index, self._next_index = self._next_index, self._next_index + 1
        return index

    def add(self, doc: Document) -> None:
        self.documents[doc.doc_id] = doc

    def remove(self, doc: Document) -> None:
        if self.documents.get(doc.doc_id) is doc:
            del self.documents[doc.doc_id]
        self.update_gauges()

    def get(self, doc_id: str) -> Document | None:
        return self.documents.get(doc_id)

    def existing(self, doc_id: str) -> Document:
        """The document ``doc_id``, in any state: a malformed id is a 400, an unknown one a 404."""
        doc = self.documents.get(check_document_id(doc_id))
        if doc is None:
            raise DocumentError(HTTPStatus.NOT_FOUND, f"no document {doc_id}")
        return doc

    def ready(self, doc_id: str) -> Document | None:
        doc = self.documents.get(doc_id)
        return doc if doc is not None and doc.state is DocState.READY else None

    def is_current(self, doc: Document) -> bool:
        """Is ``doc`` still registered (not dropped, cancelled or replaced)?"""
        return self.documents.get(doc.doc_id) is doc

    def in_state(self, *states: DocState) -> list[Document]:
        return [doc for doc in self.documents.values() if doc.state in states]

    def longest_prefix(self, token_ids) -> Document | None:
        """The longest document, in any state, whose ids are a proper prefix of ``token_ids``."""
        best = None
        for doc in self.documents.values():  # a document still loading has no tokens yet
            if doc.length and (best is None or doc.length > best.length) and doc.is_proper_prefix_of(token_ids):
                best = doc
        return best

    def boundary_miss(self, token_ids) -> Document | None:
        """A ready document that ``token_ids`` follow up to its last ``BOUNDARY_TOKENS`` tokens but not through
        them: the prompt was most likely tokenized across the document's end (text merged with what follows)."""
        for doc in self.in_state(DocState.READY):
            agreed = doc.length - BOUNDARY_TOKENS
            if agreed > 0 and len(token_ids) > agreed and array("q", token_ids[:agreed]) == doc.tokens[:agreed]:
                return doc
        return None

    def pinned_slots(self) -> int:
        return sum(doc.pinned_slots for doc in self.documents.values())

    def adapt_bytes(self) -> int:
        """Host memory reserved by adapting documents, registering or ready."""
        return sum(doc.adapt_bytes for doc in self.documents.values())

    # ----- references held by requests -----

    def acquire(self, doc: Document, req, counted: bool = True, version: Installed | None = None) -> Served:
        """``req`` is rewritten to ``doc``'s ``version`` (by default its current one): it holds both until
        ``release`` (``counted``: a client's request)."""
        version = version or doc.installed
        served = Served(doc, version, client=counted)
        doc.users += 1
        version.users += 1
        doc.requests_served += counted
        doc.last_used = time.monotonic()
        RequestRecord.attach(req).served = served
        return served

    @staticmethod
    def release(req) -> None:
        """``req`` ended (finished, aborted or rejected); idempotent."""
        served = RequestRecord.of(req).served
        if served is not None and served.held:
            served.held = False
            served.document.users -= 1
            served.version.users -= 1

    def update_gauges(self) -> None:
        ready = self.in_state(DocState.READY)
        self.stats.set(documents=len(ready), compacted_slots=sum(d.num_slots for d in ready),
                       slots_saved=sum(d.length - d.num_slots for d in ready),
                       auto_slots=sum(d.num_slots for d in ready if d.auto), adapt_host_bytes=self.adapt_bytes(),
                       adapt_live_error_max=max((d.adaptation.live_fidelity["relative_l2"] for d in ready
                                                 if d.adaptation is not None and d.adaptation.live_fidelity), default=0.0))
