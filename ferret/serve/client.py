"""A small HTTP client for the stack: ask the controller for a worker, stream an answer from it."""

from __future__ import annotations

from collections.abc import Iterator

import httpx

from ferret.serve.auth import auth_headers
from ferret.serve.protocol import iter_chunks

__all__ = ["ServeError", "ControllerClient"]


class ServeError(RuntimeError):
    """A server refused a request or could not be reached; the message says which and why."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def _error_message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error")
        if isinstance(error, dict):
            return str(error.get("message"))
        if error:
            return str(error)
    except (ValueError, AttributeError):
        pass
    return response.text[:300] or f"HTTP {response.status_code}"


class ControllerClient:
    def __init__(self, controller_url: str, api_key: str | None = None, timeout: float = 300.0):
        self.controller_url = controller_url.rstrip("/")
        self.headers = auth_headers(api_key)
        self.timeout = timeout

    def _post(self, url: str, payload: dict | None = None, timeout: float = 10.0) -> dict:
        try:
            response = httpx.post(url, json=payload or {}, headers=self.headers, timeout=timeout)
        except httpx.HTTPError as error:
            raise ServeError(f"cannot reach {url}: {error}") from None
        if response.status_code >= 400:
            raise ServeError(_error_message(response), response.status_code)
        return response.json()

    def refresh(self) -> None:
        self._post(self.controller_url + "/refresh_all_workers")

    def list_models(self) -> list[str]:
        return list(self._post(self.controller_url + "/list_models")["models"])

    def worker_address(self, model: str) -> str:
        return self._post(self.controller_url + "/get_worker_address", {"model": model})["address"]

    def status(self) -> dict:
        return self._post(self.controller_url + "/worker_get_status")

    def stream(self, payload: dict) -> Iterator[dict]:
        """Chunks ``{"text", "error_code", ...}`` of one generation; ServeError if refused."""
        model = payload.get("model")
        if not model:
            raise ServeError("payload needs 'model'")
        address = self.worker_address(model)
        url = address + "/worker_generate_stream"
        try:
            with httpx.stream("POST", url, json=payload, headers=self.headers, timeout=self.timeout) as response:
                if response.status_code >= 400:
                    response.read()
                    raise ServeError(_error_message(response), response.status_code)
                yield from iter_chunks(response.iter_lines())
        except httpx.HTTPError as error:
            raise ServeError(f"worker {address} failed: {error}") from None
