"""The document operations the HTTP process asks of each scheduler: one request record per operation.

Both sides of the ``channel`` use these records: the HTTP process (``service``) builds one, the channel
sends its ``name`` and fields as JSON, and the scheduler (``hooks.around_rpc``) rebuilds it with
``decode`` before ``operations`` runs it. A result is the JSON object the operation answers with; its
``TypedDict`` says which keys the other side reads.
"""

from __future__ import annotations

import dataclasses
import json
from http import HTTPStatus
from typing import ClassVar, TypedDict

from .errors import DocumentError


@dataclasses.dataclass(frozen=True)
class Operation:
    name: ClassVar[str]
    quiet: ClassVar[bool] = False  # polled: the scheduler logs it at debug level

    def encode(self) -> str:
        return json.dumps(dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class ListDocuments(Operation):
    name = "list"
    quiet = True


@dataclasses.dataclass(frozen=True)
class GetDocument(Operation):
    name = "get"
    quiet = True
    doc_id: str


@dataclasses.dataclass(frozen=True)
class Prepare(Operation):
    """Validate and admit a registration and reserve its id; ranks other than ``primary`` wait for its copy."""

    name = "prepare"
    request: dict  # ``RegistrationRequest.to_payload``
    input_ids: list[int]
    auto: bool = False
    primary: int = 0


@dataclasses.dataclass(frozen=True)
class Advance(Operation):
    """Move a registration on: start its solve (at ``budget``, a rung the certification tries, else the
    registration's own), install a finished one, or read the ``handoff`` of its copy."""

    name = "advance"
    quiet = True
    doc_id: str
    timings: dict | None = None
    handoff: str | None = None
    budget: float | int | None = None


@dataclasses.dataclass(frozen=True)
class Certify(Operation):
    """The HTTP process asked a certifying document's candidate its held-out questions: install the node (``accept``),
    or drop this rung and solve at ``next_budget``, or (neither) give the registration up."""

    name = "certify"
    doc_id: str
    accept: bool
    next_budget: float | int | None = None


@dataclasses.dataclass(frozen=True)
class Abandon(Operation):
    """Forget what is left of one registration or load: ``registration`` is the number ``Prepare`` or ``Load``
    answered on this rank, so a later registration of the same document is left alone."""

    name = "abandon"
    doc_id: str
    registration: int
    ready_too: bool = False


@dataclasses.dataclass(frozen=True)
class NoteFidelity(Operation):
    name = "note_fidelity"
    doc_id: str
    figures: dict


@dataclasses.dataclass(frozen=True)
class Drop(Operation):
    name = "drop"
    doc_id: str


@dataclasses.dataclass(frozen=True)
class Save(Operation):
    name = "save"
    doc_id: str


@dataclasses.dataclass(frozen=True)
class Load(Operation):
    name = "load"
    doc_id: str
    auto: bool = False


@dataclasses.dataclass(frozen=True)
class Export(Operation):
    """Write a ready document as a handoff for the other data-parallel ranks."""

    name = "export"
    doc_id: str


@dataclasses.dataclass(frozen=True)
class ReleaseHandoff(Operation):
    name = "release_handoff"
    handoff: str


@dataclasses.dataclass(frozen=True)
class ListStored(Operation):
    name = "store_list"


@dataclasses.dataclass(frozen=True)
class DeleteStored(Operation):
    name = "store_delete"
    doc_id: str


@dataclasses.dataclass(frozen=True)
class PollJob(Operation):
    """A save or store job's state: ``JobState``."""

    name = "job"
    quiet = True
    job: str


@dataclasses.dataclass(frozen=True)
class CollectStats(Operation):
    name = "stats"
    quiet = True


@dataclasses.dataclass(frozen=True)
class Observe(Operation):
    """Start learning a document from the requests that reuse it (``adapt.Observation``): an automatic one, or one a
    client registered with ``learn`` (``explicit``: pinned in the tree meanwhile, never evicted or given up)."""

    name = "observe"
    input_ids: list[int]
    explicit: bool = False


@dataclasses.dataclass(frozen=True)
class PollAutoCandidates(Operation):
    name = "auto_poll"
    quiet = True


@dataclasses.dataclass(frozen=True)
class CertifyLearned(Operation):
    """A learned document's candidate was asked its held-out requests' questions (``fidelity.summary`` of the
    answers), or asking failed (``error``)."""

    name = "certify_learned"
    doc_id: str
    figures: dict | None = None
    error: str | None = None


@dataclasses.dataclass(frozen=True)
class AuditLearned(Operation):
    """An installed learned node's recent greedy answers against the full prefix's (``version``: the node's that
    served them), or the full prefix could not be asked (``error``)."""

    name = "audit_learned"
    doc_id: str
    version: int
    figures: dict | None = None
    error: str | None = None


OPERATIONS: dict[str, type[Operation]] = {kind.name: kind for kind in (
    ListDocuments, GetDocument, Prepare, Advance, Certify, Abandon, NoteFidelity, Drop, Save, Load, Export, ReleaseHandoff,
    ListStored, DeleteStored, PollJob, CollectStats, Observe, PollAutoCandidates, CertifyLearned, AuditLearned)}


def decode(name: str, fields: str) -> Operation:
    """The operation ``name`` with its JSON ``fields``, as the HTTP process encoded it."""
    kind = OPERATIONS.get(name)
    if kind is None:
        raise DocumentError(HTTPStatus.BAD_REQUEST, f"unknown document operation {name!r}")
    try:
        return kind(**json.loads(fields))
    except TypeError as error:
        raise DocumentError(HTTPStatus.BAD_REQUEST, f"bad fields for {name}: {error}") from None


class Description(TypedDict, total=False):
    """A document as one rank describes it (``registry.Document.describe``; more keys than the ones read here)."""

    doc_id: str
    state: str
    requests_served: int
    requests_active: int
    timings: dict


class Certification(TypedDict):
    """How a registration with held-out questions is certified (``Registrations.prepare``)."""

    heldout: list[int]  # the questions its candidates are asked
    budgets: list[float | int]  # the rungs to try, smallest first (one: a fixed budget)
    bound: float | None  # the held-out answers' agreement a rung must reach (None: the first rung is taken)


class Prepared(Description, total=False):
    existing: bool  # the document was there already: nothing was reserved
    registration: int  # a new one's number on this rank (``Abandon`` names it)
    salt: str  # the cache salt of its capture requests (a new registration on its primary rank)
    certification: Certification | None  # with held-out questions, on the primary rank


class Dropped(TypedDict, total=False):
    doc_id: str
    dropped: bool
    freed_slots: int
    cancelled: str  # the state a registration in progress was dropped in


class JobStarted(TypedDict):
    job: str


class JobState(TypedDict, total=False):
    done: bool  # then the job's own result's keys


class AutoCandidate(TypedDict):
    doc_id: str
    input_ids: list[int]


class LearnedCandidate(TypedDict):
    """A learned document's candidate to ask its held-out requests' questions (``refits.Refits.certifications``)."""

    doc_id: str
    salt: str
    input_ids: list[int]  # the prefix
    heldout: list[dict]  # each request's ``prompt`` after the prefix and the ``answer`` it was served


class LearnedAudit(TypedDict):
    """An installed learned node's latest greedy requests, to ask the full prefix again (``refits.Refits.audits``)."""

    doc_id: str
    version: int  # the version that served them
    input_ids: list[int]  # the prefix
    served: list[dict]  # each request's ``prompt`` after the prefix and the ``answer`` the node served


class AutoCandidates(TypedDict):
    candidates: list[AutoCandidate]
    certify: list[LearnedCandidate]
    audit: list[LearnedAudit]
