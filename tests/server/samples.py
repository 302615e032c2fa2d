"""What several of the server's unit tests share: a server config, a 200-token document, and the
registration requests and registry entries made from it."""

from array import array
from types import SimpleNamespace

from sglang_am.server.config import ServerConfig
from sglang_am.server.registration import RegistrationRequest
from sglang_am.server.scheduler.registry import DocState, Document, document_id

CONFIG = ServerConfig(store_dir="/nonexistent", max_document_tokens=4096, max_queries_per_head=8000)
IDS = list(range(100, 300))  # a 200-token document


def request(**fields) -> RegistrationRequest:
    return RegistrationRequest.from_client(CONFIG, **{"input_ids": IDS, "ratio": 0.1, **fields})


def document(index=1, auto=False, slots=0, last_used=0.0) -> Document:
    doc = Document(document_id(IDS[index:]), index, array("q", IDS[index:]), "AM-HighestAttnKeys", {}, auto, DocState.READY)
    doc.last_used = last_used
    doc.installed = SimpleNamespace(num_slots=slots, head_slots=[], bias=[], users=0) if slots else None
    return doc
