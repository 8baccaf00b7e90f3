"""Optional shared-secret API key for every server of the stack.

With a key set, requests must carry it as ``Authorization: Bearer <key>`` or
``X-API-Key: <key>``; others get 401. Servers talking to each other pass the same key along
(``auth_headers``). The key comes from ``--api-key-file FILE`` or ``$FERRET_API_KEY_FILE`` (first
line of the file), or ``$FERRET_API_KEY``; ``--api-key KEY`` also works but is visible to every
local user in ``ps``, so the servers warn about it.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

from fastapi import Request
from fastapi.responses import JSONResponse

API_KEY_ENV = "FERRET_API_KEY"
API_KEY_FILE_ENV = "FERRET_API_KEY_FILE"


class ApiKeyError(ValueError):
    """The key file cannot be read or is empty."""


def read_key_file(path: str | os.PathLike) -> str:
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ApiKeyError(f"cannot read the API key file {str(path)!r}: {error.__class__.__name__}") from None
    key = lines[0].strip() if lines else ""
    if not key:
        raise ApiKeyError(f"the API key file {str(path)!r} is empty")
    return key


def resolve_api_key(cli_value: str | None, key_file: str | os.PathLike | None = None) -> str | None:
    """The key from ``--api-key`` (warned about: visible in ps), else ``--api-key-file``, else
    ``$FERRET_API_KEY_FILE``, else ``$FERRET_API_KEY``, else None (no auth)."""
    if cli_value is not None:
        print("warning: --api-key is visible to other local users (ps); prefer --api-key-file or $FERRET_API_KEY",
              file=sys.stderr)
        return cli_value or None
    if key_file is not None:
        return read_key_file(key_file)
    if os.environ.get(API_KEY_FILE_ENV):
        return read_key_file(os.environ[API_KEY_FILE_ENV])
    return os.environ.get(API_KEY_ENV) or None


def add_api_key_arguments(parser, what: str = "require this key on every request") -> None:
    parser.add_argument("--api-key", default=None,
                        help=f"{what} (visible in ps: prefer --api-key-file or $FERRET_API_KEY)")
    parser.add_argument("--api-key-file", default=None,
                        help=f"{what}, read from the first line of this file (or set $FERRET_API_KEY_FILE)")


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
