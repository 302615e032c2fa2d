"""Document operations on an in-process ``sglang.Engine`` (same semantics as the HTTP routes).

>>> engine = sglang.Engine(model_path=..., radix_cache_backend="am", disable_overlap_schedule=True, ...)  # SGLANG_AM=1
>>> documents = EngineDocuments(engine)
>>> doc = documents.register(input_ids=ids, ratio=0.1)
>>> engine.generate(input_ids=ids + question, sampling_params={"max_new_tokens": 8})

Errors raise ``DocumentError`` (``.status`` is the HTTP status the server would answer, ``.message``
the reason) or ``ValueError`` for bad arguments. The Engine is in-process and trusted: the store
operations need no admin key here.
"""

from __future__ import annotations

from ..channel import channel_for
from ..config import server_config
from .service import DocumentService


class EngineDocuments:
    def __init__(self, engine):
        config = server_config()
        self._engine = engine
        manager = engine.tokenizer_manager
        self._service = DocumentService(manager, channel_for(manager, config.rpc_timeout), config)

    def _run(self, operation):
        return self._engine.loop.run_until_complete(operation)

    def register(self, **arguments) -> dict:
        """See ``POST /am/documents``: ``text`` or ``input_ids``, ``ratio`` (or ``"auto"`` with
        ``fidelity_bound``) or ``budget``, ``questions``, ``adapt``, ``method``, ``query_source``,
        ``head_budgets``, ``max_queries_per_head``, ``keep_first``, ``options``, ``compact_windows``. Not
        ``messages``: an Engine has no chat API to render them (``ValueError``)."""
        return self._run(self._service.register(**arguments))

    def list(self) -> list[dict]:
        return self._run(self._service.list())["documents"]

    def get(self, doc_id: str) -> dict:
        return self._run(self._service.get(doc_id))

    def drop(self, doc_id: str) -> dict:
        return self._run(self._service.drop(doc_id))

    def save(self, doc_id: str) -> dict:
        """Write the document to the server's store (``--am-store-dir``)."""
        return self._run(self._service.save(doc_id))

    def load(self, doc_id: str) -> dict:
        """Install a stored document without compacting it again."""
        return self._run(self._service.load(doc_id))

    def stored(self) -> dict:
        """The store's documents and its use of the quota."""
        return self._run(self._service.stored())

    def stats(self) -> dict:
        """As ``GET /am/stats`` (automatic compaction itself runs only in the HTTP server)."""
        return self._run(self._service.stats())
