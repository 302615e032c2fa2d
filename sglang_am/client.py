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

from .server.errors import DocumentError


def http_json(method: str, url: str, payload: object = None, api_key: str | None = None, timeout: float = 600):
    """``(status, decoded JSON body)`` of one call (the raw text when the body is not JSON). ``payload`` is
    sent as JSON, or as it is when it is ``bytes``."""
    headers = {"Content-Type": "application/json"}
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
