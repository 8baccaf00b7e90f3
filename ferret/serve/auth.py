"""Optional shared-secret API key for every server of the stack.

With a key set (``--api-key`` or ``$FERRET_API_KEY``), requests must carry it as
``Authorization: Bearer <key>`` or ``X-API-Key: <key>``; others get 401. Servers talking to each
other pass the same key along (``auth_headers``).
"""

from __future__ import annotations

import os
import secrets

from fastapi import Request
from fastapi.responses import JSONResponse

API_KEY_ENV = "FERRET_API_KEY"


def resolve_api_key(cli_value: str | None) -> str | None:
    """The key from the command line, else from the environment, else None (no auth)."""
    key = cli_value if cli_value is not None else os.environ.get(API_KEY_ENV)
    return key or None


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def request_key(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.headers.get("x-api-key")


def install_api_key_check(app, api_key: str | None, open_paths: frozenset[str] = frozenset()) -> None:
    """Refuse (401) every request to ``app`` without the key, except ``open_paths``."""
    if not api_key:
        return

    @app.middleware("http")
    async def _check_api_key(request: Request, call_next):
        if request.url.path not in open_paths:
            given = request_key(request)
            if given is None or not secrets.compare_digest(given.encode(), api_key.encode()):
                return JSONResponse(
                    {"error": {"message": "missing or wrong API key (send 'Authorization: Bearer <key>')",
                               "type": "authentication_error"}},
                    status_code=401,
                )
        return await call_next(request)
