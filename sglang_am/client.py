"""A small HTTP client for a server launched with the extension (standard library only).

>>> docs = DocumentsClient("http://127.0.0.1:30000", api_key=None)
>>> doc = docs.register(input_ids=ids, ratio=0.1)
>>> docs.generate(input_ids=ids + question, sampling_params={"max_new_tokens": 8})

``DocumentsClient`` methods raise ``DocumentError`` (``.status``, ``.message``) for an error answer;
``http_json`` returns ``(status, body)`` and never raises for an HTTP error status.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping

from .server.errors import DocumentError


def http_json(method: str, url: str, payload: object = None, api_key: str | None = None, timeout: float = 600,
              headers: Mapping[str, str] | None = None):
    """``(status, decoded JSON body)`` of one call (the raw text when the body is not JSON). ``payload`` is
    sent as JSON, or as it is when it is ``bytes``; ``headers`` are added."""
    headers = {"Content-Type": "application/json", **(headers or {})}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = payload if isinstance(payload, bytes) or payload is None else json.dumps(payload).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers, method=method), timeout=timeout) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, body = error.code, error.read()
    try:
        return status, json.loads(body or b"null")
    except ValueError:
        return status, body.decode(errors="replace")


class DocumentsClient:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 600):
        self.url, self.api_key, self.timeout = url.rstrip("/"), api_key, timeout

    def _call(self, method: str, path: str, payload: object = None):
        status, body = http_json(method, self.url + path, payload, self.api_key, self.timeout)
        if status != 200:
            message = body.get("error") or body.get("message") if isinstance(body, dict) else body
            raise DocumentError(status, str(message))
        return body

    def register(self, **arguments) -> dict:
        """``POST /am/documents`` (the fields are in docs/serving.md)."""
        return self._call("POST", "/am/documents", arguments)

    def list(self) -> list[dict]:
        return self._call("GET", "/am/documents")["documents"]

    def get(self, doc_id: str) -> dict:
        return self._call("GET", f"/am/documents/{doc_id}")

    def drop(self, doc_id: str) -> dict:
        return self._call("DELETE", f"/am/documents/{doc_id}")

    def save(self, doc_id: str) -> dict:
        """Write the document to the server's store (needs the server's admin key)."""
        return self._call("POST", f"/am/documents/{doc_id}/save")

    def load(self, doc_id: str) -> dict:
        """Install a stored document without compacting it again (needs the server's admin key)."""
        return self._call("POST", f"/am/documents/{doc_id}/load")

    def stored(self) -> dict:
        """``GET /am/store``: the stored documents and the store's use of its quota."""
        return self._call("GET", "/am/store")

    def stats(self) -> dict:
        """``GET /am/stats``: counters, gauges, the KV pool, the automatic policy and the idle leak check."""
        return self._call("GET", "/am/stats")

    def generate(self, **request) -> dict | list[dict]:
        """SGLang's native ``POST /generate``."""
        return self._call("POST", "/generate", request)

    def delete_stored(self, doc_id: str) -> dict:
        """``DELETE /am/store/{id}``: remove the stored copy (the server keeps serving an installed one)."""
        return self._call("DELETE", f"/am/store/{doc_id}")

    def load_store(self) -> dict:
        """``POST /am/store/load``: install every stored document the server does not hold yet."""
        return self._call("POST", "/am/store/load")


# The header sglang-router's ``manual`` policy routes by: requests with the same key go to the same worker.
ROUTING_HEADER = "x-smg-routing-key"


class ClusterDocuments:
    """Document operations on every worker behind an sglang-router (``python -m sglang_am.cluster``).

    The workers share one store and one admin key. ``register`` compacts a document on one worker, saves
    it and loads it on the others; ``drop`` deletes the stored copy first, so that a worker that was down
    cannot bring it back when it restarts and loads the store, then drops it from every worker."""

    def __init__(self, router_url: str, admin_key: str, timeout: float = 600):
        self.router_url, self.admin_key, self.timeout = router_url.rstrip("/"), admin_key, timeout

    def workers(self) -> list[str]:
        """The healthy workers the router lists."""
        status, body = http_json("GET", f"{self.router_url}/workers", timeout=self.timeout)
        if status != 200:
            raise DocumentError(status, f"the router did not list its workers: {body}")
        return [worker["url"] for worker in body["workers"] if worker.get("is_healthy", True)]

    def worker(self, url: str) -> DocumentsClient:
        return DocumentsClient(url, self.admin_key, self.timeout)

    def register(self, **arguments) -> dict:
        """Register on the first worker, then load its copy on the others; if one cannot take it, no worker
        and not the store keeps it. The first worker's answer, with ``workers``: each worker's state. A document
        registered with ``learn`` is registered on every worker, each learning from the requests it serves."""
        first, *others = self.workers()
        if arguments.get("learn"):
            states = {}
            try:
                for url in (first, *others):
                    states[url] = self.worker(url).register(**arguments)
            except DocumentError:
                if states:
                    self.drop(next(iter(states.values()))["doc_id"])
                raise
            return {**states[first], "workers": {url: answer["state"] for url, answer in states.items()}}
        registered = self.worker(first).register(**arguments)
        doc_id = registered["doc_id"]
        try:
            self.worker(first).save(doc_id)
            states = {first: registered["state"], **{url: self.worker(url).load(doc_id)["state"] for url in others}}
        except DocumentError:
            self.drop(doc_id)
            raise
        return {**registered, "workers": states}

    def drop(self, doc_id: str) -> dict:
        """Delete the stored copy, then drop the document from every worker that holds it."""
        workers = self.workers()
        deleted = self.worker(workers[0]).delete_stored(doc_id)["deleted"] if workers else False
        dropped = {}
        for url in workers:
            try:
                dropped[url] = self.worker(url).drop(doc_id)["dropped"]
            except DocumentError as error:
                if error.status != 404:
                    raise
                dropped[url] = False
        return {"doc_id": doc_id, "deleted_stored": deleted, "dropped": dropped}

    def sync(self) -> dict:
        """Every worker installs the stored documents it lacks (a worker that joined later, for example)."""
        return {url: self.worker(url).load_store()["documents"] for url in self.workers()}

    def list(self) -> dict[str, list[dict]]:
        return {url: self.worker(url).list() for url in self.workers()}

    @staticmethod
    def route(doc_id: str) -> dict[str, str]:
        """Headers that keep a document's requests on one worker under the router's ``manual`` policy."""
        return {ROUTING_HEADER: doc_id}
