"""HTTP routes for documents, added to SGLang's FastAPI app in the main process.

| route | what |
|---|---|
| ``POST /am/documents`` | register and compact |
| ``GET /am/documents``, ``GET /am/documents/{id}`` | list, describe |
| ``DELETE /am/documents/{id}`` | drop a ready document, or cancel one being registered or loaded |
| ``POST /am/documents/{id}/save`` | write it to the server's document store (file route) |
| ``POST /am/documents/{id}/load`` | install it from the store (file route) |
| ``GET /am/store``, ``DELETE /am/store/{id}`` | list, delete stored documents (file routes) |
| ``POST /am/store/load`` | install every stored document not held yet (file route) |
| ``GET /am/stats`` | counters, gauges, the KV pool and SGLang's idle leak check |

Every route is ``ADMIN_OPTIONAL``, like SGLang's own admin routes: with ``--api-key`` or ``--admin-api-key``
it needs that bearer token. File routes follow SGLang's rule for routes that touch storage (its
hierarchical-cache storage routes): they refuse to run unless the server has ``--admin-api-key``, so
an open server never writes to disk for a client. Clients name documents by id, never a path. Bodies
larger than ``--am-max-body-bytes`` get 413 (the excess read and dropped up to ``MAX_DROPPED_BODY_BYTES``, so
that a client still sending receives it rather than a reset connection); malformed input 400 with the
reason; unknown documents 404; conflicts (drop while in use) 409; no room now 503; a full store 507.
"""

from __future__ import annotations

from http import HTTPStatus

import orjson
from fastapi import Request
from fastapi.responses import ORJSONResponse
from sglang.srt.utils.auth import AuthLevel, auth_level

from ..config import ServerConfig
from ..errors import DocumentError
from ..scheduler.store import check_document_id
from .service import DocumentService

MAX_DROPPED_BODY_BYTES = 64 << 20  # beyond the body limit; a body longer still is not read (its connection closes)
DOCUMENTS = "/am/documents"
STORE = "/am/store"
STATS = "/am/stats"
ADMIN_KEY_MISSING = ("This endpoint requires admin API key, but this server was started without one "
                     "(admin-api-key). Restart with --admin-api-key to enable.")


def install_routes(app, service: DocumentService, config: ServerConfig, admin_key_set: bool) -> None:
    async def answer(operation) -> ORJSONResponse:
        try:
            return ORJSONResponse(await operation)
        except DocumentError as error:
            return ORJSONResponse({"error": error.message}, status_code=error.status)
        except (ValueError, TypeError) as error:
            return ORJSONResponse({"error": str(error)}, status_code=HTTPStatus.BAD_REQUEST)

    async def body(request: Request, allow_empty: bool = False) -> dict:
        too_large = DocumentError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                  f"request bodies are limited to {config.max_body_bytes} bytes "
                                  f"(--am-max-body-bytes)")
        declared = request.headers.get("content-length")
        if declared is not None and not declared.isdigit():
            raise ValueError("the Content-Length header must be a number of bytes")
        read_at_most = config.max_body_bytes + MAX_DROPPED_BODY_BYTES
        if declared is not None and int(declared) > read_at_most:
            raise too_large
        data, received = bytearray(), 0
        async for chunk in request.stream():  # a body without a length is counted as it arrives
            received += len(chunk)
            if received > read_at_most:
                raise too_large
            if received <= config.max_body_bytes:
                data += chunk
        if received > config.max_body_bytes:
            raise too_large
        if not data.strip() and allow_empty:
            return {}
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise ValueError("the request body must be a JSON object") from None
        if not isinstance(payload, dict):
            raise ValueError("the request body must be a JSON object")
        return payload

    async def no_fields(request: Request) -> None:
        if await body(request, allow_empty=True):
            raise ValueError("this route takes no fields: the server keeps documents in its own store, named by id")

    def require_admin_key() -> None:
        if not admin_key_set:
            raise DocumentError(HTTPStatus.FORBIDDEN, ADMIN_KEY_MISSING)

    @auth_level(AuthLevel.ADMIN_OPTIONAL)
    async def register(request: Request):
        async def run():
            fields = await body(request)
            return await service.register(**fields)

        return await answer(run())

    @auth_level(AuthLevel.ADMIN_OPTIONAL)
    async def list_documents():
        return await answer(service.list())

    @auth_level(AuthLevel.ADMIN_OPTIONAL)
    async def get_document(doc_id: str):
        async def run():
            return await service.get(check_document_id(doc_id))

        return await answer(run())

    @auth_level(AuthLevel.ADMIN_OPTIONAL)
    async def drop_document(doc_id: str):
        async def run():
            return await service.drop(check_document_id(doc_id))

        return await answer(run())

    @auth_level(AuthLevel.ADMIN_OPTIONAL)
    async def save_document(doc_id: str, request: Request):
        async def run():
            require_admin_key()
            await no_fields(request)
            return await service.save(check_document_id(doc_id))

        return await answer(run())

    @auth_level(AuthLevel.ADMIN_OPTIONAL)
    async def load_document(doc_id: str, request: Request):
        async def run():
            require_admin_key()
            await no_fields(request)
            return await service.load(check_document_id(doc_id))

        return await answer(run())

    @auth_level(AuthLevel.ADMIN_OPTIONAL)
    async def list_stored():
        async def run():
            require_admin_key()
            return await service.stored()

        return await answer(run())

    @auth_level(AuthLevel.ADMIN_OPTIONAL)
    async def load_stored(request: Request):
        async def run():
            require_admin_key()
            await no_fields(request)
            return await service.load_store()

        return await answer(run())

    @auth_level(AuthLevel.ADMIN_OPTIONAL)
    async def delete_stored(doc_id: str):
        async def run():
            require_admin_key()
            return await service.delete_stored(check_document_id(doc_id))

        return await answer(run())

    @auth_level(AuthLevel.ADMIN_OPTIONAL)
    async def stats():
        return await answer(service.stats())

    app.add_api_route(STATS, stats, methods=["GET"])
    app.add_api_route(DOCUMENTS, register, methods=["POST"])
    app.add_api_route(DOCUMENTS, list_documents, methods=["GET"])
    app.add_api_route(DOCUMENTS + "/{doc_id}", get_document, methods=["GET"])
    app.add_api_route(DOCUMENTS + "/{doc_id}", drop_document, methods=["DELETE"])
    app.add_api_route(DOCUMENTS + "/{doc_id}/save", save_document, methods=["POST"])
    app.add_api_route(DOCUMENTS + "/{doc_id}/load", load_document, methods=["POST"])
    app.add_api_route(STORE, list_stored, methods=["GET"])
    app.add_api_route(STORE + "/load", load_stored, methods=["POST"])
    app.add_api_route(STORE + "/{doc_id}", delete_stored, methods=["DELETE"])
