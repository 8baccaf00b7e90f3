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

    def worker_address(self, model: str, exclude: list[str] | None = None) -> str:
        payload = {"model": model, **({"exclude": exclude} if exclude else {})}
        return self._post(self.controller_url + "/get_worker_address", payload)["address"]

    def report_failure(self, address: str) -> None:
        """Tell the controller a worker failed (it skips it and probes it); best effort."""
        try:
            self._post(self.controller_url + "/report_worker_failure", {"worker_name": address}, timeout=5.0)
        except ServeError:
            pass

    def status(self) -> dict:
        return self._post(self.controller_url + "/worker_get_status")

    def stream(self, payload: dict) -> Iterator[dict]:
        """Chunks ``{"text", "error_code", ...}`` of one generation; ServeError if refused.

        A worker that cannot be reached (or answers 503 before streaming) is reported to the
        controller, and the request is retried once on another worker of the model. A worker that
        fails after the answer started streaming ends the stream with ServeError status 503.
        """
        model = payload.get("model")
        if not model:
            raise ServeError("payload needs 'model'")
        tried: list[str] = []
        while True:
            try:
                address = self.worker_address(model, tried)
            except ServeError as error:
                if tried and error.status == 503:
                    raise ServeError(f"worker {tried[-1]} failed and no other worker serves {model!r}: try again later",
                                     503) from None
                raise
            tried.append(address)
            started = False
            try:
                with httpx.stream("POST", address + "/worker_generate_stream", json=payload, headers=self.headers,
                                  timeout=self.timeout) as response:
                    if response.status_code >= 400:
                        response.read()
                        if response.status_code == 503 and len(tried) < 2:
                            continue  # busy: try another worker once
                        raise ServeError(_error_message(response), response.status_code)
                    for item in iter_chunks(response.iter_lines()):
                        started = True
                        yield item
                    return
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError,
                    httpx.WriteError) as error:
                self.report_failure(address)
                if not started and len(tried) < 2:
                    continue  # nothing was answered yet: retry once elsewhere
                raise ServeError(f"worker {address} stopped while answering ({type(error).__name__}); "
                                 "try again", 503) from None
            except httpx.HTTPError as error:
                raise ServeError(f"worker {address} failed: {type(error).__name__}: {error}", 503) from None
            except ValueError as error:  # a garbled chunk
                raise ServeError(f"worker {address} sent a malformed answer: {error}", 502) from None
