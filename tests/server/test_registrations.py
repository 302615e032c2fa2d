"""The scheduler's registrations, without a server."""

from types import SimpleNamespace

from sglang_am.server.protocol import Abandon
from sglang_am.server.scheduler.registrations import Registrations
from sglang_am.server.scheduler.registry import DocState, DocumentRegistry

from .samples import CONFIG, document


def test_an_abandon_forgets_its_own_registration_and_leaves_a_later_one_of_the_same_document():
    """A failed registration's abandon can reach the scheduler after a new registration of the same document
    started: it names its own registration, and the new one stays."""
    registry = DocumentRegistry(None)
    registrations = Registrations(SimpleNamespace(registry=registry), CONFIG, 0, solver=None, store=None)
    first, later = document(), document()  # one document, registered twice
    for registration in (first, later):
        registration.index, registration.state = registry.new_index(), DocState.WAITING
    registry.add(first)
    registry.remove(first)  # it failed and was discarded
    registry.add(later)
    registrations.abandon(None, Abandon(later.doc_id, first.index))
    assert registry.get(later.doc_id) is later
    registrations.abandon(None, Abandon(later.doc_id, later.index))
    assert registry.get(later.doc_id) is None
