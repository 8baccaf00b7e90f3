"""One command for the whole demo stack: controller + model worker + web server.

    ferret demo [--load-4bit | --load-8bit] [--model-path PATH] [--port 7860]

Starts the three servers as child processes on loopback (free ports for the controller and the
worker), waits until the model is registered and the page answers, prints the URL, the
OpenAI-compatible endpoint and the model's memory footprint, and stops every child on Ctrl-C or
SIGTERM (children also die with this process: Linux parent-death signal).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

from ferret.serve.auth import ApiKeyError, add_api_key_arguments, auth_headers, resolve_api_key

__all__ = ["main", "free_port", "DemoStack"]


class StartupError(RuntimeError):
    """A server of the stack failed to start; the message says which and why."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the launcher dies (Linux only)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class DemoStack:
    """The three child processes and how to start, probe and stop them."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.api_key = resolve_api_key(args.api_key, args.api_key_file)
        self.headers = auth_headers(self.api_key)
        self.host = args.host
        self.controller_url = f"http://{self.host}:{args.controller_port or free_port(self.host)}"
        self.worker_port = args.worker_port or free_port(self.host)
        self.worker_url = f"http://{self.host}:{self.worker_port}"
        self.web_url = f"http://{self.host}:{args.port}"
        self.processes: list[tuple[str, subprocess.Popen]] = []

    def _spawn(self, name: str, module: str, *argv: str) -> subprocess.Popen:
        env = dict(os.environ)
        env.pop("FERRET_API_KEY_FILE", None)
        if self.api_key:
            env["FERRET_API_KEY"] = self.api_key  # never on the command line (visible in ps)
        process = subprocess.Popen(
            [sys.executable, "-m", module, *argv], env=env, start_new_session=True, preexec_fn=_die_with_parent
        )
        self.processes.append((name, process))
        return process

    def _wait(self, name: str, process: subprocess.Popen, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise StartupError(f"the {name} exited with code {process.returncode} during start-up (see its log above)")
            try:
                if ready():
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise StartupError(f"the {name} was not ready after {timeout:.0f} s")

    def start(self) -> None:
        args = self.args
        controller = self._spawn(
            "controller", "ferret.serve.controller", "--host", self.host,
            "--port", self.controller_url.rsplit(":", 1)[1],
            "--heartbeat-expiration", str(args.heartbeat_expiration),
        )
        self._wait("controller", controller,
                   lambda: httpx.get(self.controller_url + "/health", timeout=1).status_code == 200, 60)

        worker_argv = [
            "--host", self.host, "--port", str(self.worker_port), "--worker", self.worker_url,
            "--controller", self.controller_url, "--add_region_feature",
            "--heartbeat-interval", str(args.heartbeat_interval), "--device", args.device,
            "--limit-model-concurrency", str(args.limit_model_concurrency),
        ]
        if args.model_path:
            worker_argv += ["--model-path", args.model_path]
        if args.model_name:
            worker_argv += ["--model-name", args.model_name]
        if args.load_4bit:
            worker_argv.append("--load-4bit")
        if args.load_8bit:
            worker_argv.append("--load-8bit")
        if args.allowed_image_dir:
            worker_argv += ["--allowed-image-dir", args.allowed_image_dir]
        worker = self._spawn("model worker", "ferret.serve.model_worker", *worker_argv)
        self._wait("model worker", worker, self._model_registered, args.startup_timeout)

        web = self._spawn(
            "web server", "ferret.serve.gradio_web_server", "--host", self.host, "--port", str(args.port),
            "--controller", self.controller_url, "--model-list-mode", "reload", "--add_region_feature",
        )
        self._wait("web server", web, lambda: httpx.get(self.web_url + "/", timeout=2).status_code == 200, 300)

    def _model_registered(self) -> bool:
        response = httpx.post(self.controller_url + "/list_models", headers=self.headers, timeout=1)
        return response.status_code == 200 and bool(response.json().get("models"))

    def worker_status(self) -> dict:
        return httpx.post(self.worker_url + "/worker_get_status", headers=self.headers, timeout=5).json()

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every child (web server first), then SIGKILL whatever is left after ``grace``."""
        for _name, process in reversed(self.processes):
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for _name, process in self.processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ferret demo", description="Run the Ferret web demo (controller + worker + web server).")
    parser.add_argument("--model-path", default=None, help="checkpoint folder (default: the embedded model)")
    parser.add_argument("--model-name", default=None)
    quant = parser.add_mutually_exclusive_group()
    quant.add_argument("--load-4bit", action="store_true", help="4-bit nf4 LLM weights (bitsandbytes)")
    quant.add_argument("--load-8bit", action="store_true", help="8-bit LLM weights (bitsandbytes)")
    parser.add_argument("--port", type=int, default=7860, help="web page port")
    parser.add_argument("--host", default="127.0.0.1", help="bind address of all servers (default: loopback only)")
    parser.add_argument("--controller-port", type=int, default=0, help="default: a free port")
    parser.add_argument("--worker-port", type=int, default=0, help="default: a free port")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--limit-model-concurrency", type=int, default=1)
    parser.add_argument("--allowed-image-dir", default=None, help="folder the OpenAI API may read images from")
    add_api_key_arguments(parser, "protect every server: the page's login password, the worker/OpenAI API's bearer key")
    parser.add_argument("--heartbeat-interval", type=float, default=15.0)
    parser.add_argument("--heartbeat-expiration", type=float, default=30.0)
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for the model to load")
    return parser


def _default_model_available() -> bool:
    from ferret.model.builder import NoDefaultModelError, resolve_model_path

    try:
        resolve_model_path(None)
        return True
    except (NoDefaultModelError, FileNotFoundError):
        return False


def _write_random_tiny_model(folder: str) -> str:
    """No trained model is available: serve a tiny RANDOM one, and say so loudly."""
    from ferret.model.tiny import save_tiny_model

    print("NOTE: no trained Ferret model is available (give --model-path or set $FERRET_MODEL_PATH);", flush=True)
    print("      serving a tiny RANDOMLY INITIALISED model: the pipeline works, its answers are noise.", flush=True)
    return str(save_tiny_model(os.path.join(folder, "tiny-random-ferret")))


def _format_footprint(status: dict) -> str:
    from ferret.serve.engine import format_bytes

    precision = status.get("quantization") or "full precision"
    return f"{format_bytes(status.get('memory_bytes'))} ({precision})"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.model_path is not None and not os.path.isdir(args.model_path):
        print(f"ferret demo: model path {args.model_path!r} is not a folder", file=sys.stderr)
        return 2
    try:
        resolve_api_key(args.api_key, args.api_key_file)
    except ApiKeyError as error:
        print(f"ferret demo: {error}", file=sys.stderr)
        return 2
    scratch = None
    if args.model_path is None and not _default_model_available():
        scratch = tempfile.mkdtemp(prefix="ferret-demo-")
        args.model_path = _write_random_tiny_model(scratch)
    stack = DemoStack(args)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stack.start()
        status = stack.worker_status()
        print(f"Ferret demo ready: {stack.web_url}", flush=True)
        if stack.api_key:
            print("The page asks for a login: any user name, the API key as password.", flush=True)
        print(f"model {', '.join(status.get('model_names', []))}: memory footprint {_format_footprint(status)}", flush=True)
        print(f"OpenAI-compatible API: {stack.worker_url}/v1/chat/completions   controller: {stack.controller_url}", flush=True)
        print("Press Ctrl-C to stop.", flush=True)
        while True:
            for name, process in stack.processes:
                if process.poll() is not None:
                    raise StartupError(f"the {name} stopped unexpectedly (exit code {process.returncode})")
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("stopping the demo ...", file=sys.stderr, flush=True)
        return 0
    except StartupError as error:
        print(f"ferret demo: {error}", file=sys.stderr, flush=True)
        return 2
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stack.stop()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
