"""Document operations on an in-process ``sglang.Engine`` (same semantics as the HTTP routes).

>>> engine = sglang.Engine(model_path=..., radix_cache_backend="am", ...)   # with SGLANG_AM=1
>>> documents = EngineDocuments(engine)
>>> doc = documents.register(input_ids=ids, ratio=0.1)
>>> engine.generate(input_ids=ids + question, sampling_params={"max_new_tokens": 8})

Errors raise ``DocumentError`` (``.status`` is the HTTP status the server would answer, ``.message``
the reason) or ``ValueError`` for bad arguments.
"""

from __future__ import annotations

from .service import DocumentService, SchedulerRPC


class EngineDocuments:
    def __init__(self, engine):
        if getattr(engine, "send_to_rpc", None) is None:
            raise ValueError("this engine has no scheduler RPC socket (only node 0 of a multi-node engine has one)")
        self._engine = engine
        self._service = DocumentService(engine.tokenizer_manager, SchedulerRPC(engine.send_to_rpc))

    def _run(self, operation):
        return self._engine.loop.run_until_complete(operation)

    def register(self, **arguments) -> dict:
        """See ``POST /am/documents``: ``text`` or ``input_ids``, ``ratio`` or ``budget``, ``method``,
        ``query_source``, ``head_budgets``, ``max_queries_per_head``, ``keep_first``, ``options``."""
        return self._run(self._service.register(**arguments))

    def list(self) -> list[dict]:
        return self._run(self._service.list())["documents"]

    def get(self, doc_id: str) -> dict:
        return self._run(self._service.get(doc_id))

    def drop(self, doc_id: str) -> dict:
        return self._run(self._service.drop(doc_id))

    def save(self, doc_id: str, path: str) -> dict:
        return self._run(self._service.save(doc_id, path))

    def load(self, path: str) -> dict:
        return self._run(self._service.load(path))

    def stats(self) -> dict:
        """As ``GET /am/stats`` (automatic compaction itself runs only in the HTTP server)."""
        return self._run(self._service.stats())
