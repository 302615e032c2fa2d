"""``DocumentError``: a refused or failed document operation, with the HTTP status a client gets."""

from __future__ import annotations

import json


class DocumentError(Exception):
    """``status`` is the HTTP status (400 bad input, 404 unknown, 409 conflict, 503 no room now, 504
    timeout, 507 store full); ``message`` the reason. ``str()`` is the JSON the scheduler's RPC carries."""

    def __init__(self, status: int, message: str):
        super().__init__(json.dumps({"status": int(status), "error": message}))
        self.status, self.message = int(status), message
