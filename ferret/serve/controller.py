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
import logging
import random
import threading
import time
from dataclasses import dataclass

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ferret.serve.auth import auth_headers, install_api_key_check, resolve_api_key
from ferret.serve.protocol import RequestError, ServeLimits, UnknownModelError, read_json_body

logger = logging.getLogger("ferret.serve.controller")

DEFAULT_HEARTBEAT_EXPIRATION = 30.0
DISPATCH_METHODS = ("shortest_queue", "lottery")


@dataclass
class WorkerInfo:
    model_names: list[str]
    speed: float
    queue_length: int
    check_heart_beat: bool
    last_heart_beat: float
    memory_bytes: int | None = None


class Controller:
    """Thread-safe worker registry with heartbeat expiry and dispatch."""

    def __init__(
        self,
        dispatch_method: str = "shortest_queue",
        heartbeat_expiration: float = DEFAULT_HEARTBEAT_EXPIRATION,
        api_key: str | None = None,
        clock=time.monotonic,
    ):
        if dispatch_method not in DISPATCH_METHODS:
            raise ValueError(f"dispatch method must be one of {DISPATCH_METHODS}, got {dispatch_method!r}")
        if heartbeat_expiration <= 0:
            raise ValueError(f"heartbeat expiration must be positive, got {heartbeat_expiration}")
        self.dispatch_method = dispatch_method
        self.heartbeat_expiration = heartbeat_expiration
        self.api_key = api_key
        self.clock = clock
        self.workers: dict[str, WorkerInfo] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._expiry_thread: threading.Thread | None = None

    # -- registry ---------------------------------------------------------------------------

    def register_worker(self, worker_name: str, check_heart_beat: bool, worker_status: dict | None) -> bool:
        """Add or refresh a worker; without a status the worker is asked for one. False if unreachable."""
        if worker_status is None:
            worker_status = self.fetch_worker_status(worker_name)
            if worker_status is None:
                return False
        info = WorkerInfo(
            model_names=list(worker_status["model_names"]),
            speed=float(worker_status.get("speed", 1) or 1),
            queue_length=int(worker_status.get("queue_length", 0)),
            check_heart_beat=bool(check_heart_beat),
            last_heart_beat=self.clock(),
            memory_bytes=worker_status.get("memory_bytes"),
        )
        with self._lock:
            self.workers[worker_name] = info
        logger.info("registered worker %s serving %s", worker_name, info.model_names)
        return True

    def fetch_worker_status(self, worker_name: str) -> dict | None:
        try:
            response = httpx.post(worker_name + "/worker_get_status", headers=auth_headers(self.api_key), timeout=5)
            response.raise_for_status()
            return response.json()
        except (httpx.HTTPError, ValueError) as error:
            logger.warning("cannot get the status of worker %s: %s", worker_name, error)
            return None

    def remove_worker(self, worker_name: str) -> None:
        with self._lock:
            self.workers.pop(worker_name, None)

    def refresh_all_workers(self) -> None:
        with self._lock:
            checked = {name: info.check_heart_beat for name, info in self.workers.items()}
        for name, check_heart_beat in checked.items():
            if not self.register_worker(name, check_heart_beat, None):
                logger.info("removing unreachable worker %s", name)
                self.remove_worker(name)

    def receive_heart_beat(self, worker_name: str, queue_length: int) -> bool:
        with self._lock:
            info = self.workers.get(worker_name)
            if info is None:
                return False
            info.queue_length = int(queue_length)
            info.last_heart_beat = self.clock()
            return True

    def remove_expired_workers(self) -> list[str]:
        deadline = self.clock() - self.heartbeat_expiration
        with self._lock:
            expired = [n for n, w in self.workers.items() if w.check_heart_beat and w.last_heart_beat < deadline]
            for name in expired:
                del self.workers[name]
        for name in expired:
            logger.info("worker %s expired (no heartbeat for %.1f s)", name, self.heartbeat_expiration)
        return expired

    # -- queries ----------------------------------------------------------------------------

    def list_models(self) -> list[str]:
        with self._lock:
            return sorted({m for w in self.workers.values() for m in w.model_names})

    def get_worker_address(self, model_name: str) -> str:
        """The address of a worker serving ``model_name``; UnknownModelError when none does."""
        with self._lock:
            candidates = [(n, w) for n, w in self.workers.items() if model_name in w.model_names]
            if not candidates:
                raise UnknownModelError(f"no worker serves model {model_name!r}; available: {self._models_locked()}")
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
                           "memory_bytes": w.memory_bytes}
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
        name = data.get("worker_name")
        status = data.get("worker_status")
        if not isinstance(name, str) or not name.startswith(("http://", "https://")):
            raise RequestError("worker_name must be the worker's URL (http://host:port)")
        if status is not None and not (isinstance(status, dict) and isinstance(status.get("model_names"), list)):
            raise RequestError("worker_status must be an object with a 'model_names' list")
        # Without a status the controller asks the worker: a blocking call, kept off the event loop.
        registered = await run_in_threadpool(controller.register_worker, name, bool(data.get("check_heart_beat", True)), status)
        if not registered:
            raise RequestError(f"worker {name} did not answer /worker_get_status", status=502)
        return {"ok": True}

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
        return {"address": controller.get_worker_address(model)}

    @app.post("/receive_heart_beat")
    async def receive_heart_beat(request: Request):
        data = await body(request)
        name, queue_length = data.get("worker_name"), data.get("queue_length", 0)
        if not isinstance(name, str) or isinstance(queue_length, bool) or not isinstance(queue_length, int):
            raise RequestError("heartbeat needs 'worker_name' (str) and 'queue_length' (int)")
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
    parser.add_argument("--api-key", default=None, help="require this key on every request (or set $FERRET_API_KEY)")
    return parser


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s controller %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    controller = Controller(args.dispatch_method, args.heartbeat_expiration, resolve_api_key(args.api_key))
    uvicorn.run(build_app(controller), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
