"""HTTP routes for documents, added to SGLang's FastAPI app in the main process.

``POST /am/documents`` registers and compacts, ``GET /am/documents[/{id}]`` lists, ``DELETE
/am/documents/{id}`` drops, ``POST /am/documents/{id}/save`` and ``POST /am/documents/load`` move
compacted documents to and from disk; ``GET /am/stats`` summarises counters, gauges, the KV pool
and SGLang's idle leak check. Routes are marked ``ADMIN_OPTIONAL``: with ``--api-key`` (or
``--admin-api-key``) they need that bearer token, like SGLang's own admin routes. Bad input is a 400
with the reason; unknown documents 404; conflicts (drop while in use) 409.
"""

from __future__ import annotations

from http import HTTPStatus

from fastapi import Request
from fastapi.responses import ORJSONResponse
from sglang.srt.utils.auth import AuthLevel, auth_level

from .documents import DocumentError
from .service import DocumentService

PREFIX = "/am/documents"
STATS = "/am/stats"


def install_routes(app, service: DocumentService) -> None:
    async def answer(operation) -> ORJSONResponse:
        try:
            return ORJSONResponse(await operation)
        except DocumentError as error:
            return ORJSONResponse({"error": error.message}, status_code=error.status)
        except (ValueError, TypeError) as error:
            return ORJSONResponse({"error": str(error)}, status_code=HTTPStatus.BAD_REQUEST)

    async def body(request: Request) -> dict:
        try:
            payload = await request.json()
        except ValueError:
            raise ValueError("the request body must be a JSON object") from None
        if not isinstance(payload, dict):
            raise ValueError("the request body must be a JSON object")
        return payload

    @auth_level(AuthLevel.ADMIN_OPTIONAL)
    async def register(request: Request):
        async def run():
            return await service.register(**await body(request))

        return await answer(run())

    @auth_level(AuthLevel.ADMIN_OPTIONAL)
    async def list_documents():
        return await answer(service.list())

    @auth_level(AuthLevel.ADMIN_OPTIONAL)
    async def get_document(doc_id: str):
        return await answer(service.get(doc_id))

    @auth_level(AuthLevel.ADMIN_OPTIONAL)
    async def drop_document(doc_id: str):
        return await answer(service.drop(doc_id))

    @auth_level(AuthLevel.ADMIN_OPTIONAL)
    async def save_document(doc_id: str, request: Request):
        async def run():
            return await service.save(doc_id, (await body(request)).get("path"))

        return await answer(run())

    @auth_level(AuthLevel.ADMIN_OPTIONAL)
    async def load_document(request: Request):
        async def run():
            return await service.load((await body(request)).get("path"))

        return await answer(run())

    @auth_level(AuthLevel.ADMIN_OPTIONAL)
    async def stats():
        return await answer(service.stats())

    app.add_api_route(STATS, stats, methods=["GET"])
    app.add_api_route(PREFIX, register, methods=["POST"])
    app.add_api_route(PREFIX, list_documents, methods=["GET"])
    app.add_api_route(f"{PREFIX}/load", load_document, methods=["POST"])
    app.add_api_route(PREFIX + "/{doc_id}", get_document, methods=["GET"])
    app.add_api_route(PREFIX + "/{doc_id}", drop_document, methods=["DELETE"])
    app.add_api_route(PREFIX + "/{doc_id}/save", save_document, methods=["POST"])
