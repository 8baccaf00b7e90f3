"""The controller: a registry of model workers that tells clients which worker serves a model.

Workers register (``/register_worker``) and send heartbeats (``/receive_heart_beat``) with their
queue length; a worker silent for longer than the expiration is dropped. ``/get_worker_address``
picks a worker for a model: ``shortest_queue`` (least loaded: queue length / speed, ties broken by
registration order; the pick's queue count is raised at once so a burst spreads over workers) or
``lottery`` (random, weighted by speed).

    python -m ferret.serve.controller --host 127.0.0.1 --port 21001
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ferret.serve.auth import ApiKeyError, add_api_key_arguments, auth_headers, install_api_key_check, resolve_api_key
from ferret.serve.protocol import RequestError, ServeLimits, UnknownModelError, is_finite_number, read_json_body, short

logger = logging.getLogger("ferret.serve.controller")

DEFAULT_HEARTBEAT_EXPIRATION = 30.0
DISPATCH_METHODS = ("shortest_queue", "lottery")


DEFAULT_REFRESH_TIMEOUT = 2.0
MAX_MODEL_NAMES = 64
MAX_NAME_LENGTH = 256
MAX_QUEUE_LENGTH = 1_000_000
MAX_SPEED = 1_000_000.0


@dataclass
class WorkerInfo:
    model_names: list[str]
    speed: float
    queue_length: int
    last_heart_beat: float
    memory_bytes: int | None = None
    heartbeat_interval: float | None = None
    failed: bool = False  # a client reported that a request to it failed; cleared by its next heartbeat
    check_heart_beat: bool = True  # always: a worker cannot opt out of expiry


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return is_finite_number(value)


def validate_worker_status(status) -> dict:
    """A worker's status object, checked field by field (RequestError 400 on anything malformed)."""
    if not isinstance(status, dict):
        raise RequestError(f"worker_status must be an object, got {short(status)}")
    names = status.get("model_names")
    if not isinstance(names, list) or not names or len(names) > MAX_MODEL_NAMES:
        raise RequestError(f"worker_status.model_names must be a list of 1 to {MAX_MODEL_NAMES} model names, got {short(names)}")
    for name in names:
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_LENGTH or not name.isprintable():
            raise RequestError(f"worker_status.model_names holds an invalid name: {short(name)}")
    speed = status.get("speed", 1)
    if speed is None:
        speed = 1
    if not _is_real(speed) or not 0 < speed <= MAX_SPEED:
        raise RequestError(f"worker_status.speed must be a number in (0, {MAX_SPEED:g}], got {short(speed)}")
    queue_length = status.get("queue_length", 0)
    if queue_length is None:
        queue_length = 0
    if not _is_int(queue_length) or not 0 <= queue_length <= MAX_QUEUE_LENGTH:
        raise RequestError(f"worker_status.queue_length must be an integer in [0, {MAX_QUEUE_LENGTH}], got {short(queue_length)}")
    memory = status.get("memory_bytes")
    if memory is not None and (not _is_int(memory) or memory < 0 or memory > 2**60):
        raise RequestError(f"worker_status.memory_bytes must be a non-negative integer, got {short(memory)}")
    interval = status.get("heartbeat_interval")
    if interval is not None and (not _is_real(interval) or not 0 < interval <= 3600):
        raise RequestError(f"worker_status.heartbeat_interval must be a number of seconds in (0, 3600], got {short(interval)}")
    return {"model_names": list(names), "speed": float(speed), "queue_length": int(queue_length),
            "memory_bytes": memory, "heartbeat_interval": None if interval is None else float(interval)}


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def normalized_worker_url(url: str) -> str:
    """``url`` in the form registration stores (lower-case host, no trailing slash); unchanged if
    it is not a URL registration would accept."""
    try:
        return check_worker_url(url, "any key", frozenset())
    except RequestError:
        return url


def check_worker_url(url, api_key: str | None, allowed_hosts: frozenset[str] = frozenset()) -> str:
    """The URL a worker registers: ``http(s)://host:port`` and nothing else (no path, query or
    credentials). Without an API key the host must be loopback or in ``allowed_hosts``."""
    if not isinstance(url, str) or len(url) > 2048:
        raise RequestError("worker_name must be the worker's URL (http://host:port)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise RequestError(f"worker_name {short(url)} is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RequestError("worker_name must be the worker's URL (http://host:port)")
    if parts.username is not None or parts.password is not None or parts.query or parts.fragment or parts.path not in ("", "/"):
        raise RequestError(f"worker_name {short(url)} must be just scheme://host:port (no path, query or credentials)")
    host = parts.hostname
    if not api_key and not _is_loopback(host) and host.lower() not in allowed_hosts:
        raise RequestError(
            f"worker host {short(host)} is not loopback: without an API key the controller accepts only loopback "
            "workers (or hosts given with --allow-worker-host)",
            status=403,
        )
    netloc = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{netloc}" + (f":{port}" if port is not None else "")


class Controller:
    """Thread-safe worker registry with heartbeat expiry and dispatch."""

    def __init__(
        self,
        dispatch_method: str = "shortest_queue",
        heartbeat_expiration: float = DEFAULT_HEARTBEAT_EXPIRATION,
        api_key: str | None = None,
        clock=time.monotonic,
        allowed_worker_hosts=(),
        refresh_timeout: float = DEFAULT_REFRESH_TIMEOUT,
    ):
        if dispatch_method not in DISPATCH_METHODS:
            raise ValueError(f"dispatch method must be one of {DISPATCH_METHODS}, got {dispatch_method!r}")
        if heartbeat_expiration <= 0:
            raise ValueError(f"heartbeat expiration must be positive, got {heartbeat_expiration}")
        self.dispatch_method = dispatch_method
        self.heartbeat_expiration = heartbeat_expiration
        self.api_key = api_key
        self.clock = clock
        self.allowed_worker_hosts = frozenset(h.strip().lower() for h in allowed_worker_hosts if h.strip())
        self.refresh_timeout = refresh_timeout
        self.workers: dict[str, WorkerInfo] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._expiry_thread: threading.Thread | None = None

    # -- registry ---------------------------------------------------------------------------

    def register_worker(self, worker_name: str, check_heart_beat: bool = True, worker_status: dict | None = None) -> bool:
        """Add or refresh a worker; without a status the worker is asked for one. False if
        unreachable; RequestError if its status is malformed (nothing is stored then).
        ``check_heart_beat`` is accepted for compatibility and ignored: every worker expires."""
        if worker_status is None:
            worker_status = self.fetch_worker_status(worker_name)
            if worker_status is None:
                return False
        status = validate_worker_status(worker_status)
        info = WorkerInfo(
            model_names=status["model_names"],
            speed=status["speed"],
            queue_length=status["queue_length"],
            last_heart_beat=self.clock(),
            memory_bytes=status["memory_bytes"],
            heartbeat_interval=status["heartbeat_interval"],
        )
        with self._lock:
            self.workers[worker_name] = info
        logger.info("registered worker %s serving %s", worker_name, info.model_names)
        return True

    def fetch_worker_status(self, worker_name: str, timeout: float | None = None) -> dict | None:
        try:
            response = httpx.post(worker_name + "/worker_get_status", headers=auth_headers(self.api_key),
                                  timeout=timeout or self.refresh_timeout)
            response.raise_for_status()
            return response.json()
        except (httpx.HTTPError, ValueError) as error:
            logger.warning("cannot get the status of worker %s: %s", worker_name, error)
            return None

    def remove_worker(self, worker_name: str) -> None:
        with self._lock:
            self.workers.pop(worker_name, None)

    def refresh_all_workers(self) -> None:
        """Ask every worker for its status at once (each with ``refresh_timeout``): one slow or
        dead worker never delays the others. Unreachable or malformed ones are dropped."""
        with self._lock:
            names = list(self.workers)
        if not names:
            return

        def refresh(name: str) -> None:
            try:
                ok = self.register_worker(name, True, None)
            except RequestError as error:
                logger.warning("worker %s sent a malformed status: %s", name, error)
                ok = False
            if not ok:
                logger.info("removing unreachable worker %s", name)
                self.remove_worker(name)

        with ThreadPoolExecutor(max_workers=min(32, len(names)), thread_name_prefix="controller-refresh") as pool:
            list(pool.map(refresh, names))

    def receive_heart_beat(self, worker_name: str, queue_length: int) -> bool:
        with self._lock:
            info = self.workers.get(worker_name)
            if info is None:
                return False
            info.queue_length = int(queue_length)
            info.last_heart_beat = self.clock()
            info.failed = False
            return True

    def report_failure(self, worker_name: str, probe: bool = True) -> bool:
        """A client could not get an answer from ``worker_name``: dispatch skips it from now on,
        and a quick health probe either clears it (it answers) or removes it (it does not)."""
        with self._lock:
            info = self.workers.get(worker_name)
            if info is None:
                return False
            info.failed = True
        if probe:
            threading.Thread(target=self._probe, args=(worker_name,), name="controller-probe", daemon=True).start()
        return True

    def _probe(self, worker_name: str) -> None:
        try:
            alive = httpx.get(worker_name + "/health", timeout=self.refresh_timeout).status_code == 200
        except httpx.HTTPError:
            alive = False
        if not alive:
            logger.info("worker %s failed a request and its health probe: removed", worker_name)
            self.remove_worker(worker_name)
            return
        with self._lock:
            info = self.workers.get(worker_name)
            if info is not None:
                info.failed = False

    def remove_expired_workers(self) -> list[str]:
        deadline = self.clock() - self.heartbeat_expiration
        with self._lock:
            expired = [n for n, w in self.workers.items() if w.last_heart_beat < deadline]
            for name in expired:
                del self.workers[name]
        for name in expired:
            logger.info("worker %s expired (no heartbeat for %.1f s)", name, self.heartbeat_expiration)
        return expired

    # -- queries ----------------------------------------------------------------------------

    def list_models(self) -> list[str]:
        with self._lock:
            return sorted({m for w in self.workers.values() for m in w.model_names})

    def _healthy(self, info: WorkerInfo, now: float) -> bool:
        if info.failed:
            return False
        if info.heartbeat_interval is not None and now - info.last_heart_beat > 2 * info.heartbeat_interval + 5:
            return False  # two heartbeats are overdue (5 s of slack for a busy machine)
        return True

    def get_worker_address(self, model_name: str, exclude=()) -> str:
        """The address of a worker serving ``model_name``, preferring workers whose heartbeats and
        requests are not failing; UnknownModelError when none serves it, 503 when the only ones
        left are in ``exclude`` (a client retrying elsewhere)."""
        excluded = set(exclude)
        with self._lock:
            serving = [(n, w) for n, w in self.workers.items() if model_name in w.model_names]
            if not serving:
                raise UnknownModelError(f"no worker serves model {model_name!r}; available: {self._models_locked()}")
            candidates = [(n, w) for n, w in serving if n not in excluded]
            if not candidates:
                raise RequestError(f"no other worker serves model {model_name!r}", status=503)
            now = self.clock()
            healthy = [(n, w) for n, w in candidates if self._healthy(w, now)]
            candidates = healthy or candidates  # all failing: still try rather than refuse
            if self.dispatch_method == "lottery":
                names, infos = zip(*candidates)
                return random.choices(names, weights=[w.speed for w in infos])[0]
            name, info = min(candidates, key=lambda item: item[1].queue_length / item[1].speed)
            info.queue_length += 1  # counted now; the worker's next heartbeat corrects it
            return name

    def _models_locked(self) -> list[str]:
        return sorted({m for w in self.workers.values() for m in w.model_names})

    def status(self) -> dict:
        with self._lock:
            return {
                "model_names": self._models_locked(),
                "workers": {
                    name: {"model_names": w.model_names, "queue_length": w.queue_length, "speed": w.speed,
                           "memory_bytes": w.memory_bytes, "failed": w.failed}
                    for name, w in self.workers.items()
                },
                "queue_length": sum(w.queue_length for w in self.workers.values()),
            }

    # -- background expiry --------------------------------------------------------------------

    def start(self) -> None:
        if self._expiry_thread is not None:
            return
        period = min(self.heartbeat_expiration / 3, 5.0)

        def loop():
            while not self._stop.wait(period):
                self.remove_expired_workers()

        self._expiry_thread = threading.Thread(target=loop, name="controller-expiry", daemon=True)
        self._expiry_thread.start()

    def stop(self) -> None:
        self._stop.set()


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status_code=status)


def build_app(controller: Controller, limits: ServeLimits = ServeLimits()) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        controller.start()
        yield
        controller.stop()

    app = FastAPI(title="Ferret controller", lifespan=lifespan)
    install_api_key_check(app, controller.api_key, open_paths=frozenset({"/health"}))

    @app.exception_handler(RequestError)
    async def _request_error(_request, error: RequestError):
        return _error(error.status, str(error))

    async def body(request: Request) -> dict:
        return await read_json_body(request, limits)

    @app.get("/health")
    async def health():
        return {"ok": True}

    @app.post("/register_worker")
    async def register_worker(request: Request):
        data = await body(request)
        name = check_worker_url(data.get("worker_name"), controller.api_key, controller.allowed_worker_hosts)
        status = data.get("worker_status")
        if status is not None:
            validate_worker_status(status)  # refused before anything is stored
        # Without a status the controller asks the worker: a blocking call, kept off the event loop.
        registered = await run_in_threadpool(controller.register_worker, name, True, status)
        if not registered:
            raise RequestError(f"worker {name} did not answer /worker_get_status", status=502)
        return {"ok": True}

    @app.post("/report_worker_failure")
    async def report_worker_failure(request: Request):
        data = await body(request)
        name = data.get("worker_name")
        if not isinstance(name, str):
            raise RequestError("request needs 'worker_name' (the URL of the worker that failed)")
        return {"known": controller.report_failure(normalized_worker_url(name))}

    @app.post("/refresh_all_workers")
    async def refresh_all_workers():
        await run_in_threadpool(controller.refresh_all_workers)
        return {"ok": True}

    @app.post("/list_models")
    async def list_models():
        return {"models": controller.list_models()}

    @app.post("/get_worker_address")
    async def get_worker_address(request: Request):
        data = await body(request)
        model = data.get("model")
        if not isinstance(model, str):
            raise RequestError("request needs 'model' (a model name from /list_models)")
        exclude = data.get("exclude")
        if exclude is None:
            exclude = []
        if not isinstance(exclude, list) or not all(isinstance(e, str) for e in exclude):
            raise RequestError("exclude must be a list of worker URLs")
        return {"address": controller.get_worker_address(model, exclude)}

    @app.post("/receive_heart_beat")
    async def receive_heart_beat(request: Request):
        data = await body(request)
        name, queue_length = data.get("worker_name"), data.get("queue_length", 0)
        if (not isinstance(name, str) or isinstance(queue_length, bool) or not isinstance(queue_length, int)
                or not 0 <= queue_length <= MAX_QUEUE_LENGTH):
            raise RequestError(f"heartbeat needs 'worker_name' (str) and 'queue_length' (int in [0, {MAX_QUEUE_LENGTH}])")
        name = normalized_worker_url(name)  # the form it was registered under
        return {"exist": controller.receive_heart_beat(name, queue_length)}

    @app.post("/worker_get_status")
    async def worker_get_status():
        return controller.status()

    return app


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ferret.serve.controller", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    parser.add_argument("--port", type=int, default=21001)
    parser.add_argument("--dispatch-method", choices=DISPATCH_METHODS, default="shortest_queue")
    parser.add_argument("--heartbeat-expiration", type=float, default=DEFAULT_HEARTBEAT_EXPIRATION,
                        help="seconds without a heartbeat after which a worker is dropped")
    parser.add_argument("--allow-worker-host", action="append", default=[], metavar="HOST",
                        help="without an API key, also accept workers registering from HOST (repeatable; "
                             "default: loopback workers only)")
    parser.add_argument("--refresh-timeout", type=float, default=DEFAULT_REFRESH_TIMEOUT,
                        help="seconds each worker has to answer a refresh (all are asked at once)")
    add_api_key_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s controller %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        api_key = resolve_api_key(args.api_key, args.api_key_file)
    except ApiKeyError as error:
        print(f"controller: {error}", file=sys.stderr)
        return 2
    controller = Controller(args.dispatch_method, args.heartbeat_expiration, api_key,
                            allowed_worker_hosts=args.allow_worker_host, refresh_timeout=args.refresh_timeout)
    uvicorn.run(build_app(controller), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
