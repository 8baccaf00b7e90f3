"""A model worker: loads one Ferret model, registers with the controller, streams answers.

    python -m ferret.serve.model_worker --controller http://127.0.0.1:21001 --port 21002 \
        --worker http://127.0.0.1:21002 --model-path PATH [--load-4bit | --load-8bit] --add_region_feature

Endpoints: ``POST /worker_generate_stream`` (protocol in ``ferret.serve.protocol``),
``POST /worker_get_status``, and the OpenAI-compatible ``POST /v1/chat/completions`` and
``GET /v1/models`` (``ferret.serve.openai_api``). The worker heartbeats its queue length (requests
accepted and not yet finished) to the controller and re-registers if the controller forgot it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ferret.processing import MAX_IMAGE_PIXELS
from ferret.regions import GroundedRegion
from ferret.serve.auth import ApiKeyError, add_api_key_arguments, auth_headers, install_api_key_check, resolve_api_key
from ferret.serve.engine import ChatEngine, format_bytes
from ferret.serve.protocol import (
    GenerateRequest,
    RequestError,
    ServeLimits,
    check_generate_request,
    chunk,
    declared_length,
    decode_request,
    grounded_to_json,
    read_json_body,
)

logger = logging.getLogger("ferret.serve.model_worker")

DEFAULT_HEARTBEAT_INTERVAL = 15.0


class ModelWorker:
    """Runs generation for one engine with bounded concurrency and keeps the controller informed.
    It is the `ChatWorker` the OpenAI router (`ferret.serve.openai_api`) is built on."""

    def __init__(
        self,
        engine: ChatEngine,
        worker_address: str,
        controller_address: str | None = None,
        api_key: str | None = None,
        limit_model_concurrency: int = 1,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        limits: ServeLimits = ServeLimits(),
        allowed_image_dir: str | Path | None = None,
    ):
        if limit_model_concurrency < 1:
            raise ValueError(f"limit_model_concurrency must be >= 1, got {limit_model_concurrency}")
        self.engine = engine
        self.worker_address = worker_address.rstrip("/")
        self.controller_address = controller_address.rstrip("/") if controller_address else None
        self.api_key = api_key
        self.limit_model_concurrency = limit_model_concurrency
        self.heartbeat_interval = heartbeat_interval
        self.limits = limits
        self.allowed_image_dir = Path(allowed_image_dir).resolve() if allowed_image_dir else None
        self._queue_length = 0
        self._count_lock = threading.Lock()
        self._semaphore: asyncio.Semaphore | None = None
        self._pending_bytes = 0
        self._active_generations = 0
        self._tasks: set = set()
        self._stop = threading.Event()
        self._wake = threading.Event()  # set when the queue length changed: heartbeat early
        self._heartbeat_thread: threading.Thread | None = None

    # -- controller link --------------------------------------------------------------------

    @property
    def model_names(self) -> list[str]:
        return [self.engine.model_name]

    @property
    def queue_length(self) -> int:
        return self._queue_length

    def status(self) -> dict:
        return {
            "model_names": self.model_names,
            "speed": 1,
            "queue_length": self.queue_length,
            "memory_bytes": self.engine.memory_bytes,
            "quantization": self.engine.quantization,
            "heartbeat_interval": self.heartbeat_interval,
            "active_generations": self.active_generations,
        }

    def register(self) -> None:
        if not self.controller_address:
            return
        response = httpx.post(
            self.controller_address + "/register_worker",
            json={"worker_name": self.worker_address, "check_heart_beat": True, "worker_status": self.status()},
            headers=auth_headers(self.api_key),
            timeout=10,
        )
        response.raise_for_status()
        logger.info("registered with controller %s as %s", self.controller_address, self.worker_address)

    def send_heartbeat(self) -> None:
        if not self.controller_address:
            return
        try:
            response = httpx.post(
                self.controller_address + "/receive_heart_beat",
                json={"worker_name": self.worker_address, "queue_length": self.queue_length},
                headers=auth_headers(self.api_key),
                timeout=5,
            )
            response.raise_for_status()
            if not response.json().get("exist", False):
                self.register()
        except (httpx.HTTPError, ValueError) as error:
            logger.warning("heartbeat to %s failed: %s", self.controller_address, error)

    def start(self) -> None:
        """Register and start heartbeating (in a daemon thread)."""
        if not self.controller_address or self._heartbeat_thread is not None:
            return
        try:
            self.register()
        except httpx.HTTPError as error:
            logger.warning("cannot register with controller %s yet: %s (will retry)", self.controller_address, error)

        def loop():
            while not self._stop.is_set():
                # Every interval, and soon after a request finishes, so the controller's
                # least-loaded dispatch sees the real queue (bursts coalesce into one beat).
                self._wake.wait(self.heartbeat_interval)
                if self._stop.is_set():
                    break
                self._wake.clear()
                self.send_heartbeat()

        self._heartbeat_thread = threading.Thread(target=loop, name="worker-heartbeat", daemon=True)
        self._heartbeat_thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    # -- generation -------------------------------------------------------------------------

    def _count(self, delta: int) -> None:
        with self._count_lock:
            self._queue_length += delta

    def _generations(self, delta: int) -> None:
        with self._count_lock:
            self._active_generations += delta

    @property
    def active_generations(self) -> int:
        """Requests whose decoding or generation thread is still running (0 when idle)."""
        return self._active_generations

    def admit(self, declared_bytes: int | None) -> "Admission":
        """Reserve room for one request's body (and what is decoded from it) in the process-wide
        budget ``limits.max_pending_bytes``; 503 when the worker already holds too much."""
        return Admission(self, declared_bytes)

    def check(self, data: dict) -> GenerateRequest:
        """JSON object -> checked request, pixels not decoded yet (RequestError on anything wrong)."""
        request = check_generate_request(data, self.limits)
        self.check_request(request)
        return request

    def check_request(self, request: GenerateRequest) -> None:
        """RequestError when the model cannot take this request (regions, context length)."""
        self.engine.check(request)

    def grounding(self, text: str, request: GenerateRequest) -> list[GroundedRegion]:
        """The phrases and pixel boxes an answer to `request` names."""
        return self.engine.grounding(text, request)

    def prepare(self, data: dict) -> GenerateRequest:
        """JSON object -> checked and decoded request (RequestError on anything wrong)."""
        return decode_request(self.check(data))

    async def stream_text(
        self, request: GenerateRequest, http_request: Request | None = None, admission: "Admission | None" = None
    ) -> AsyncIterator[str]:
        """The answer so far after each piece; at most `limit_model_concurrency` run at once.

        Everything that costs memory in proportion to the request (decoding the image and masks,
        building region masks, generating) runs inside that limit, in one thread per request. The
        generation stops within one decoding step when the client disconnects (``http_request``)
        or stops reading, and the limit is released once it has stopped.
        """
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.limit_model_concurrency)
        loop = asyncio.get_running_loop()
        cancel = threading.Event()
        pieces: asyncio.Queue = asyncio.Queue()
        done = asyncio.Event()

        def put(kind: str, value=None) -> None:
            loop.call_soon_threadsafe(pieces.put_nowait, (kind, value))

        def produce() -> None:
            self._generations(+1)
            try:
                decoded = decode_request(request)
                for text in self.engine.stream(decoded, cancel):
                    put("text", text)
                    if cancel.is_set():
                        break
                put("end")
            except BaseException as error:  # noqa: BLE001 - handed to the consumer
                put("error", error)
            finally:
                decoded = None
                if _request_bytes(request) >= TRIM_AFTER_BYTES:
                    release_memory()  # a large request: hand its freed heap back to the system
                self._generations(-1)
                loop.call_soon_threadsafe(done.set)

        async def generation() -> None:
            self._count(+1)
            try:
                async with self._semaphore:
                    if cancel.is_set():
                        put("end")
                        return
                    threading.Thread(target=produce, name="ferret-request", daemon=True).start()
                    await done.wait()
            finally:
                self._count(-1)
                self._wake.set()
                if admission is not None:
                    admission.release()

        task = asyncio.ensure_future(generation())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        watcher = asyncio.ensure_future(_watch_disconnect(http_request, cancel)) if http_request is not None else None
        try:
            while True:
                kind, value = await pieces.get()
                if kind == "text":
                    yield value
                elif kind == "end":
                    return
                else:
                    raise value
        finally:
            cancel.set()  # the client is gone or done: stop generating at the next step
            if watcher is not None:
                watcher.cancel()

    async def open_stream(
        self, request: GenerateRequest, http_request: Request | None = None, admission: "Admission | None" = None
    ) -> AsyncIterator[str]:
        """``stream_text`` with its first piece already produced, so that a request the model
        refuses (a ValueError before any token: context too long, bad region) becomes a
        RequestError here, before the HTTP status is sent."""
        texts = self.stream_text(request, http_request, admission)
        try:
            first = await texts.__anext__()
        except StopAsyncIteration:
            first = None
        except RequestError:
            await texts.aclose()
            raise
        except ValueError as error:
            await texts.aclose()
            raise RequestError(str(error).splitlines()[0] if str(error) else "invalid request") from None
        except BaseException:
            await texts.aclose()
            raise

        async def resumed():
            try:
                if first is not None:
                    yield first
                async for text in texts:
                    yield text
            finally:
                await texts.aclose()

        return resumed()

    async def stream_chunks(self, request: GenerateRequest, texts: AsyncIterator[str]) -> AsyncIterator[bytes]:
        text = ""
        try:
            async for text in texts:
                yield chunk(text)
        except Exception as error:  # reported in-band: the HTTP status is already sent
            logger.exception("generation failed")
            yield chunk(text, error_code=1, error=f"generation failed: {type(error).__name__}")
            return
        finally:
            await texts.aclose()
        regions = grounded_to_json(self.grounding(text, request))
        yield chunk(text, done=True, regions=regions)


class Admission:
    """One request's share of the worker's pending-bytes budget (released exactly once)."""

    def __init__(self, worker: ModelWorker, declared_bytes: int | None):
        self.worker = worker
        # The body, then the bytes decoded from its base64 (about 3/4 of it), live until the end.
        self.bytes = 2 * min(declared_bytes or worker.limits.max_body_bytes, worker.limits.max_body_bytes)
        with worker._count_lock:
            if worker._pending_bytes + self.bytes > worker.limits.max_pending_bytes and worker._pending_bytes:
                raise RequestError(
                    f"the worker is busy ({worker._pending_bytes / 2**20:.0f} MiB of requests pending, limit "
                    f"{worker.limits.max_pending_bytes / 2**20:.0f} MiB); retry later",
                    status=503,
                )
            worker._pending_bytes += self.bytes
        self._released = False

    def release(self) -> None:
        with self.worker._count_lock:
            if not self._released:
                self._released = True
                self.worker._pending_bytes -= self.bytes


async def _watch_disconnect(http_request: Request, cancel: threading.Event) -> None:
    """Set ``cancel`` when the client of ``http_request`` disconnects (its body is already read)."""
    try:
        while not cancel.is_set():
            message = await http_request.receive()
            if message.get("type") == "http.disconnect":
                cancel.set()
                return
    except (asyncio.CancelledError, RuntimeError):
        return


# Requests whose image and masks took at least this many bytes trim the heap when they end
# (small ones do not: trimming locks the allocator for a moment).
TRIM_AFTER_BYTES = 8 * 1024 * 1024


def _request_bytes(request: GenerateRequest) -> int:
    width, height = request.image.size
    regions = len(request.regions) + sum(len(turn.regions) for turn in request.history)
    return width * height * (3 + regions)


def release_memory() -> None:
    """Give freed heap memory back to the system (glibc keeps it in its arenas otherwise)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()


def limit_heap_growth(threshold: int = 1 << 20) -> None:
    """Serve allocations above ``threshold`` bytes (images, masks) from mmap, returned to the system
    when freed, instead of letting glibc's adaptive threshold keep them in its heap."""
    if _LIBC is not None:
        try:
            _LIBC.mallopt(-3, threshold)  # M_MMAP_THRESHOLD
        except AttributeError:
            pass


def error_response(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


def build_app(worker: ModelWorker) -> FastAPI:
    from ferret.serve.openai_api import build_openai_router

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        await run_in_threadpool(worker.start)
        yield
        worker.stop()

    app = FastAPI(title="Ferret model worker", lifespan=lifespan)
    install_api_key_check(app, worker.api_key, open_paths=frozenset({"/health"}))

    @app.exception_handler(RequestError)
    async def _request_error(_request, error: RequestError):
        return error_response(error.status, str(error))

    @app.get("/health")
    async def health():
        return {"ok": True}

    @app.post("/worker_get_status")
    async def worker_get_status():
        return worker.status()

    @app.post("/worker_generate_stream")
    async def worker_generate_stream(request: Request):
        admission = worker.admit(declared_length(request))
        try:
            data = await read_json_body(request, worker.limits)
            checked = await run_in_threadpool(worker.check, data)  # no pixels decoded yet
            del data
            texts = await worker.open_stream(checked, request, admission)
        except BaseException:
            admission.release()
            raise
        return StreamingResponse(worker.stream_chunks(checked, texts), media_type="application/x-ndjson")

    app.include_router(build_openai_router(worker))
    return app


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ferret.serve.model_worker", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    parser.add_argument("--port", type=int, default=21002)
    parser.add_argument("--worker-address", "--worker", dest="worker_address", default=None,
                        help="URL the controller reaches this worker at (default http://HOST:PORT)")
    parser.add_argument("--controller-address", "--controller", dest="controller_address", default=None,
                        help="controller URL; without it the worker runs standalone")
    parser.add_argument("--model-path", default=None, help="checkpoint folder (default: the embedded model)")
    parser.add_argument("--model-name", default=None, help="public model name (default: the folder name)")
    quant = parser.add_mutually_exclusive_group()
    quant.add_argument("--load-4bit", action="store_true", help="quantize the LLM to 4-bit nf4 (bitsandbytes)")
    quant.add_argument("--load-8bit", action="store_true", help="quantize the LLM to 8-bit (bitsandbytes)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--add_region_feature", "--add-region-feature", action="store_true",
                        help="accepted for compatibility: region features are always used when regions are given")
    parser.add_argument("--limit-model-concurrency", type=int, default=1,
                        help="requests decoded and generated at once (the rest wait; default 1)")
    parser.add_argument("--heartbeat-interval", type=float, default=DEFAULT_HEARTBEAT_INTERVAL)
    defaults = ServeLimits()
    parser.add_argument("--max-image-pixels", type=int, default=defaults.max_image_pixels,
                        help=f"largest image, width x height (default {defaults.max_image_pixels}; at most {MAX_IMAGE_PIXELS})")
    parser.add_argument("--max-new-tokens-limit", type=int, default=defaults.max_new_tokens)
    parser.add_argument("--max-regions", type=int, default=defaults.max_regions, help="regions per turn")
    parser.add_argument("--max-conversation-regions", type=int, default=defaults.max_conversation_regions,
                        help="regions in one request, all turns together")
    parser.add_argument("--max-history-turns", type=int, default=defaults.max_history_turns)
    parser.add_argument("--max-region-mask-pixels", type=int, default=defaults.max_region_mask_pixels,
                        help="regions in the conversation x image pixels (each region's mask costs one byte a pixel)")
    parser.add_argument("--max-pending-bytes", type=int, default=defaults.max_pending_bytes,
                        help="request bodies this worker holds at once (busy: 503)")
    parser.add_argument("--allowed-image-dir", default=None,
                        help="folder whose images the OpenAI API may read by local path (default: none)")
    add_api_key_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    import sys

    import uvicorn

    parser = build_parser()
    args = parser.parse_args(argv)
    if not 1 <= args.max_image_pixels <= MAX_IMAGE_PIXELS:
        parser.error(f"--max-image-pixels must be in [1, {MAX_IMAGE_PIXELS}]")
    for flag in ("max_new_tokens_limit", "max_regions", "max_conversation_regions", "max_region_mask_pixels",
                 "max_pending_bytes", "limit_model_concurrency"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.max_history_turns < 0:
        parser.error("--max-history-turns must be >= 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        api_key = resolve_api_key(args.api_key, args.api_key_file)
    except ApiKeyError as error:
        print(f"model_worker: {error}", file=sys.stderr)
        return 2
    limit_heap_growth()
    try:
        engine = ChatEngine.load(args.model_path, args.load_4bit, args.load_8bit, args.device, args.model_name)
    except (FileNotFoundError, ValueError) as error:
        print(f"model_worker: cannot load the model: {error}", file=sys.stderr)
        return 2
    logger.info(
        "loaded %s (%s) footprint %s", engine.model_name, engine.quantization or "full precision",
        format_bytes(engine.memory_bytes),
    )
    limits = ServeLimits(
        max_image_pixels=args.max_image_pixels, max_new_tokens=args.max_new_tokens_limit, max_regions=args.max_regions,
        max_conversation_regions=args.max_conversation_regions, max_history_turns=args.max_history_turns,
        max_region_mask_pixels=args.max_region_mask_pixels, max_pending_bytes=args.max_pending_bytes,
    )
    worker = ModelWorker(
        engine,
        args.worker_address or f"http://{args.host}:{args.port}",
        args.controller_address,
        api_key=api_key,
        limit_model_concurrency=args.limit_model_concurrency,
        heartbeat_interval=args.heartbeat_interval,
        limits=limits,
        allowed_image_dir=args.allowed_image_dir,
    )
    uvicorn.run(build_app(worker), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
