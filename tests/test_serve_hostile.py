"""Serving under hostile input and faults (issue 16), with a tiny random Ferret on loopback:

* every malformed value is a 4xx with a one-line reason, on every entry point (worker protocol,
  OpenAI API, controller, gradio ``/ask``, FerretChat, CLI): a table of rows x entry points;
* region limits are checked before anything is built, on every path;
* a client that disconnects (streaming or not) stops its generation within one decoding step;
* a worker killed under load: later requests succeed on the other worker, in-flight ones fail
  with a clear 503; restarted workers and controllers re-register.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from ferret.serve.client import ControllerClient, ServeError
from ferret.serve.controller import Controller
from ferret.serve.controller import build_app as build_controller_app
from ferret.serve.demo import free_port
from ferret.serve.engine import ChatEngine
from ferret.serve.model_worker import ModelWorker
from ferret.serve.model_worker import build_app as build_worker_app
from ferret.serve.protocol import ServeLimits, encode_image

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "ferret" / "assets" / "examples"
SHAPES = EXAMPLES / "shapes.png"


class Server:
    """A uvicorn server in a daemon thread."""

    def __init__(self, app, port: int | None = None):
        import uvicorn

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def png_b64(image: Image.Image) -> str:
    return encode_image(image)


def big_png(width: int, height: int) -> bytes:
    """A valid PNG of width x height (one bit a pixel, all black: a few KB)."""
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    from ferret.model.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("hostile") / "tiny-ferret")


@pytest.fixture(scope="module")
def engine(tiny_path):
    return ChatEngine.load(tiny_path, device="cpu", model_name="tiny")


@pytest.fixture(scope="module")
def stack(engine):
    """Controller + one worker (in-process) + the gradio page (in-process, no key)."""
    controller = Controller(heartbeat_expiration=30)
    controller_server = Server(build_controller_app(controller))
    port = free_port()
    worker = ModelWorker(engine, f"http://127.0.0.1:{port}", controller_server.url, heartbeat_interval=1)
    worker_server = Server(build_worker_app(worker), port)
    deadline = time.monotonic() + 20
    while worker.worker_address not in controller.workers:
        assert time.monotonic() < deadline, "the worker did not register"
        time.sleep(0.05)
    yield {"controller": controller, "controller_url": controller_server.url, "worker": worker,
           "worker_url": worker_server.url}
    worker.stop()
    worker_server.stop()
    controller_server.stop()


@pytest.fixture(scope="module")
def web(stack):
    from ferret.serve.gradio_web_server import build_demo, launch_options

    limits = ServeLimits()
    demo = build_demo(stack["controller_url"], "reload", None, 4, limits)
    demo.queue(default_concurrency_limit=4)
    port = free_port()
    options = launch_options(limits, None)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **options)
    yield f"http://127.0.0.1:{port}"
    demo.close()


# ---------------------------------------------------------------------------------------------
# Every malformed value is a 4xx, on every entry point

BIG = "1" + "0" * 400  # 10**400 written out
DIGITS = "9" * 5000
DEEP = "[" * 100_000 + "]" * 100_000
HUGE_30MP = base64.b64encode(big_png(6000, 5000)).decode()
HUGE_200MP = base64.b64encode(big_png(20_000, 10_000)).decode()
MARK = "__INJECT__"

# (row, field, raw JSON text put in the field, expected status)
ROWS = [
    ("10**400 box coordinate", "coordinate", BIG, 400),
    ("10**400 temperature", "temperature", BIG, 400),
    ("5000-digit max tokens", "max_tokens", DIGITS, 400),
    ("NaN temperature", "temperature", "NaN", 400),
    ("Infinity top_p", "top_p", "Infinity", 400),
    ("-Infinity coordinate", "coordinate", "-Infinity", 400),
    ("1e400 temperature", "temperature", "1e400", 400),
    ("JSON nested 100k deep", "regions", DEEP, 400),
    ("question is a number", "question", "5", 400),
    ("regions is a string", "regions", '"box"', 400),
    ("max tokens is 5.5", "max_tokens", "5.5", 400),
    ("max tokens is true", "max_tokens", "true", 400),
    ("temperature is a string", "temperature", '"0.2"', 400),
    ("coordinate is a string", "coordinate", '"12"', 400),
    ("30 MP image", "image", json.dumps(HUGE_30MP), 413),
    ("200 MP image", "image", json.dumps(HUGE_200MP), 413),
    ("17 regions", "regions", json.dumps([{"type": "box", "box": [10, 10, 20, 20]}] * 17), 400),
]


def worker_body() -> dict:
    return {"model": "tiny", "image": base64.b64encode(SHAPES.read_bytes()).decode(), "question": "What is <region>?",
            "regions": [{"type": "box", "box": [50, 60, 150, 160]}], "temperature": 0.0, "top_p": 1.0,
            "max_new_tokens": 4}


def openai_body() -> dict:
    return {"model": "tiny", "max_tokens": 4, "temperature": 0.0, "top_p": 1.0,
            "regions": [{"type": "box", "box": [50, 60, 150, 160]}],
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is <region>?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(SHAPES.read_bytes()).decode()}}]}]}


def _set(body: dict, path: tuple, value) -> None:
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


WORKER_FIELDS = {"coordinate": ("regions", 0, "box", 0), "temperature": ("temperature",), "top_p": ("top_p",),
                 "max_tokens": ("max_new_tokens",), "question": ("question",), "regions": ("regions",),
                 "image": ("image",)}
OPENAI_FIELDS = {**WORKER_FIELDS, "max_tokens": ("max_tokens",),
                 "question": ("messages", 0, "content", 0, "text"),
                 "image": ("messages", 0, "content", 1, "image_url", "url")}


def injected(body: dict, fields: dict, field: str, raw: str) -> bytes:
    if field == "image" and fields is OPENAI_FIELDS:
        raw = json.dumps("data:image/png;base64," + json.loads(raw))
    if field == "regions" and fields is OPENAI_FIELDS and raw.startswith("[{"):
        body["messages"][0]["content"][0]["text"] = "What is this?"  # 17 regions appended to the question
    _set(body, fields[field], MARK)
    return json.dumps(body).replace(json.dumps(MARK), raw).encode()


def assert_one_line_4xx(response: httpx.Response, status: int, row: str) -> None:
    assert response.status_code == status, (row, response.status_code, response.text[:300])
    message = response.json()["error"]["message"]
    assert message and "\n" not in message and len(message) < 400, (row, message)
    assert "Traceback" not in message and "int too large" not in message, (row, message)


@pytest.mark.parametrize("row, field, raw, status", ROWS, ids=[r[0] for r in ROWS])
def test_malformed_values_on_the_worker_and_openai_routes(stack, row, field, raw, status):
    url = stack["worker_url"]
    for route, body, fields in (("/worker_generate_stream", worker_body(), WORKER_FIELDS),
                                ("/v1/chat/completions", openai_body(), OPENAI_FIELDS)):
        response = httpx.post(url + route, content=injected(body, fields, field, raw),
                              headers={"Content-Type": "application/json"}, timeout=60)
        assert_one_line_4xx(response, status, f"{row} on {route}")


CONTROLLER_ROWS = [
    ("10**400 queue length", "/receive_heart_beat", '{"worker_name": "http://127.0.0.1:1", "queue_length": %s}' % BIG),
    ("5000-digit queue length", "/receive_heart_beat", '{"worker_name": "http://127.0.0.1:1", "queue_length": %s}' % DIGITS),
    ("NaN speed", "/register_worker", '{"worker_name": "http://127.0.0.1:1", "worker_status": {"model_names": ["m"], "speed": NaN}}'),
    ("Infinity speed", "/register_worker", '{"worker_name": "http://127.0.0.1:1", "worker_status": {"model_names": ["m"], "speed": Infinity}}'),
    ("10**400 speed", "/register_worker", '{"worker_name": "http://127.0.0.1:1", "worker_status": {"model_names": ["m"], "speed": %s}}' % BIG),
    ("model name object", "/register_worker", '{"worker_name": "http://127.0.0.1:1", "worker_status": {"model_names": [{"x": 1}]}}'),
    ("nested 100k deep", "/get_worker_address", '{"model": %s}' % DEEP),
    ("model is a number", "/get_worker_address", '{"model": 5}'),
    ("exclude is a string", "/get_worker_address", '{"model": "tiny", "exclude": "x"}'),
    ("queue length a string", "/receive_heart_beat", '{"worker_name": "http://127.0.0.1:1", "queue_length": "3"}'),
]


@pytest.mark.parametrize("row, route, body", CONTROLLER_ROWS, ids=[r[0] for r in CONTROLLER_ROWS])
def test_malformed_values_on_the_controller(stack, row, route, body):
    response = httpx.post(stack["controller_url"] + route, content=body.encode(), timeout=30)
    assert_one_line_4xx(response, 400, row)
    assert httpx.post(stack["controller_url"] + "/list_models", timeout=10).json() == {"models": ["tiny"]}


def _gradio_value(raw: str):
    """The Python value gradio_client sends for a raw JSON row."""
    if raw in (BIG, DIGITS):
        return 10**400 if raw == BIG else 10**5000 - 1
    if raw == "NaN":
        return float("nan")
    if raw in ("Infinity", "1e400"):
        return float("inf")
    if raw == "-Infinity":
        return float("-inf")
    return json.loads(raw)


def test_malformed_values_on_the_gradio_api(web, tmp_path):
    from gradio_client import Client, handle_file

    sys.set_int_max_str_digits(0)  # so that gradio_client can send a 5000-digit integer
    try:
        client = Client(web + "/", verbose=False)
        base = {"image": str(SHAPES), "question": "What is <region>?",
                "regions": json.dumps([{"type": "box", "box": [50, 60, 150, 160]}]),
                "temperature": 0.0, "top_p": 1.0, "max_tokens": 8}
        answer, _ = client.predict(handle_file(base["image"]), base["question"], base["regions"], 0.0, 1.0, 8, api_name="/ask")
        assert isinstance(answer, str) and not answer.startswith("⚠")
        for name, size in (("30mp.png", (6000, 5000)), ("200mp.png", (20_000, 10_000))):
            (tmp_path / name).write_bytes(big_png(*size))
        cases = []
        for row, field, raw, _status in ROWS:
            if field == "question":
                continue  # the page's question is a text box: gradio hands any value over as its text
            args = dict(base)
            if field == "coordinate":
                args["regions"] = json.dumps([{"type": "box", "box": [50, 60, 150, 160]}]).replace("50", raw, 1)
            elif field == "regions":
                args["regions"] = json.loads(raw) if raw.startswith('"') else raw
                if raw.startswith("[{"):
                    args["question"] = "What is this?"
            elif field == "image":
                args["image"] = str(tmp_path / ("30mp.png" if raw == json.dumps(HUGE_30MP) else "200mp.png"))
            elif field == "question":
                args["question"] = _gradio_value(raw)
            else:
                args[field] = _gradio_value(raw)
            cases.append((row, args))
        cases += [("placeholder mismatch", {**base, "question": "Compare <region> and <region>?"}),
                  ("regions not JSON", {**base, "regions": "{not json"})]
        for row, args in cases:
            with pytest.raises(Exception) as info:  # gradio_client raises AppError for gr.Error
                client.predict(handle_file(args["image"]), args["question"], args["regions"], args["temperature"],
                               args["top_p"], args["max_tokens"], api_name="/ask")
            message = str(info.value)
            assert "Traceback" not in message and "int too large" not in message and "NoneType" not in message, (row, message)
            assert "⚠" not in message, (row, message)
            assert len(message) < 500, (row, message)
    finally:
        sys.set_int_max_str_digits(4300)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"temperature": float("inf")}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": 10**400}, "temperature"),
    ({"temperature": "0.2"}, "temperature"),
    ({"top_p": float("nan")}, "top_p"),
    ({"max_new_tokens": 5.5}, "max_new_tokens"),
    ({"max_new_tokens": True}, "max_new_tokens"),
    ({"max_new_tokens": 10**5000}, "max_new_tokens"),
])
def test_malformed_values_in_ferret_chat(engine, kwargs, fragment):
    from ferret.regions import Box

    for call in (engine.chat.ask, lambda *a, **k: list(engine.chat.stream(*a, **k))):
        with pytest.raises(ValueError, match=fragment) as info:
            call(str(SHAPES), "What is <region>?", regions=[Box(50, 60, 150, 160)], **kwargs)
        assert "\n" not in str(info.value) and len(str(info.value)) < 200


@pytest.mark.parametrize("flags", [["--temperature", "inf"], ["--temperature", "nan"], ["--top-p", "nan"],
                                   ["--max-new-tokens", "5.5"], ["--box", "1e400,1,5,5"]])
def test_malformed_values_on_the_cli(flags, capsys):
    from ferret.serve.cli import main

    assert main(["--image", str(SHAPES), "--model-path", "/nonexistent", *flags, "What?"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "cannot load the model" not in err, err  # refused before loading


# ---------------------------------------------------------------------------------------------
# Region limits on every path, before anything is built


def test_region_limits_apply_on_the_worker_and_openai_paths(stack):
    url = stack["worker_url"]
    box = {"type": "box", "box": [10, 10, 30, 30]}
    # 16 regions in each of 2 history turns + 1 now = 33 > 32 in the conversation.
    body = {**worker_body(), "question": "What is this?", "regions": [box],
            "history": [{"question": "q", "answer": "a", "regions": [box] * 16}] * 2}
    response = httpx.post(url + "/worker_generate_stream", json=body, timeout=30)
    assert_one_line_4xx(response, 400, "33 regions")
    assert "conversation has 33 regions" in response.json()["error"]["message"]
    written = " ".join(["[25, 33, 75, 100] <region_fea>"] * 16)
    image = openai_body()["messages"][0]["content"][1]
    messages = []
    for _ in range(2):
        messages += [{"role": "user", "content": [{"type": "text", "text": "What? " + written}, image]},
                     {"role": "assistant", "content": "a"}]
    messages.append({"role": "user", "content": [{"type": "text", "text": "And [25, 33, 75, 100] <region_fea>?"}, image]})
    response = httpx.post(url + "/v1/chat/completions", json={"max_tokens": 4, "messages": messages}, timeout=30)
    assert_one_line_4xx(response, 400, "33 regions (OpenAI)")
    one_turn = [{"role": "user", "content": [{"type": "text", "text": "What? " + written + " [1, 1, 9, 9] <region_fea>"}, image]}]
    response = httpx.post(url + "/v1/chat/completions", json={"max_tokens": 4, "messages": one_turn}, timeout=30)
    assert_one_line_4xx(response, 400, "17 regions in one turn (OpenAI)")
    assert "17 regions, over the limit of 16" in response.json()["error"]["message"]
    # The mask budget: regions x image pixels.
    limits = ServeLimits(max_region_mask_pixels=1_000_000)
    big = Image.new("RGB", (1000, 800), (200, 200, 200))
    from ferret.serve.protocol import RequestError, check_generate_request

    with pytest.raises(RequestError, match="mask pixels") as info:
        check_generate_request({"image": png_b64(big), "question": "q", "regions": [box, box]}, limits)
    assert info.value.status == 413


def test_no_region_mask_is_built_for_a_request_the_context_cannot_hold(engine, monkeypatch):
    """Masks (one byte per image pixel each) are built only once the request is known to fit:
    a request refused for its length costs no mask, on the worker path and in FerretChat."""
    import ferret.processing
    from ferret.regions import Box

    built = []
    real = ferret.processing.region_mask  # FerretProcessor.encode builds the masks
    monkeypatch.setattr(ferret.processing, "region_mask", lambda *a, **k: built.append(1) or real(*a, **k))
    boxes = [Box(10 + i, 10, 60 + i, 60) for i in range(16)]
    history = engine.chat.ask(str(SHAPES), "What is this?", regions=[Box(50, 60, 150, 160)], max_new_tokens=2).history
    built.clear()
    with pytest.raises(ValueError, match="context"):
        engine.chat.ask(str(SHAPES), "And these?", regions=boxes, history=history, max_new_tokens=400)
    assert built == []
    box = {"type": "box", "box": [10, 10, 60, 60]}
    body = {**worker_body(), "question": "What is this?", "regions": [box] * 16,
            "history": [{"question": "q", "answer": "a", "regions": [box] * 16}], "max_new_tokens": 4}
    worker = ModelWorker(engine, "http://127.0.0.1:1")
    server = Server(build_worker_app(worker))
    try:
        response = httpx.post(server.url + "/worker_generate_stream", json=body, timeout=60)
        assert response.status_code == 400 and "context" in response.json()["error"]["message"], response.text
        assert built == []
    finally:
        server.stop()


def test_images_are_decoded_inside_the_concurrency_limit(engine, monkeypatch):
    """With --limit-model-concurrency 1, no request's image is decoded while another request is
    being decoded or generated: decoding (the memory a request costs) waits for the limit."""
    import ferret.serve.protocol as protocol

    state = {"decoding": 0, "generating": 0, "overlaps": 0, "decodes": 0}
    lock = threading.Lock()
    real_load_image, real_stream = protocol.load_image, ChatEngine.stream

    def load_image(raw):
        with lock:
            state["decoding"] += 1
            state["decodes"] += 1
            if state["decoding"] > 1 or state["generating"]:
                state["overlaps"] += 1
        try:
            time.sleep(0.1)
            return real_load_image(raw)
        finally:
            with lock:
                state["decoding"] -= 1

    def stream(self, *args, **kwargs):
        with lock:
            state["generating"] += 1
        try:
            yield from real_stream(self, *args, **kwargs)
        finally:
            with lock:
                state["generating"] -= 1

    monkeypatch.setattr(protocol, "load_image", load_image)
    monkeypatch.setattr(ChatEngine, "stream", stream)
    worker = ModelWorker(engine, "http://127.0.0.1:1", limit_model_concurrency=1)
    server = Server(build_worker_app(worker))
    try:
        body = {**worker_body(), "max_new_tokens": 8}
        statuses = []
        threads = [threading.Thread(target=lambda: statuses.append(
            httpx.post(server.url + "/worker_generate_stream", json=body, timeout=120).status_code)) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert statuses == [200] * 6
        assert state["decodes"] == 6 and state["overlaps"] == 0, state
    finally:
        server.stop()


def test_api_key_from_a_file_or_the_environment(tmp_path, monkeypatch, capsys):
    from ferret.serve.auth import ApiKeyError, resolve_api_key

    monkeypatch.delenv("FERRET_API_KEY", raising=False)
    monkeypatch.delenv("FERRET_API_KEY_FILE", raising=False)
    key_file = tmp_path / "key"
    key_file.write_text("s3cret\n")
    assert resolve_api_key(None, key_file) == "s3cret"
    monkeypatch.setenv("FERRET_API_KEY_FILE", str(key_file))
    assert resolve_api_key(None) == "s3cret"
    monkeypatch.delenv("FERRET_API_KEY_FILE")
    monkeypatch.setenv("FERRET_API_KEY", "from-env")
    assert resolve_api_key(None) == "from-env"
    assert resolve_api_key("on-the-command-line") == "on-the-command-line"
    assert "visible to other local users" in capsys.readouterr().err
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ApiKeyError, match="empty"):
        resolve_api_key(None, tmp_path / "empty")
    with pytest.raises(ApiKeyError, match="cannot read"):
        resolve_api_key(None, tmp_path / "missing")


# ---------------------------------------------------------------------------------------------
# Cancellation


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_cut_streams_and_requests_stop_their_generation(tiny_path, tmp_path):
    """10 cut streams, then 10 cut non-streamed requests (OpenAI): the next request's latency
    stays within 2x of an idle one, and the worker is idle again (no generation left running).
    The worker is its own process so that the clients here do not share its CPU or GIL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "worker.log", "w")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("FERRET_API_KEY", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "ferret.serve.model_worker", "--model-path", str(tiny_path), "--model-name", "tiny",
         "--port", str(port), "--device", "cpu"], stdout=log, stderr=log, env=env, cwd=ROOT)
    probe = {**worker_body(), "question": "Describe <region> in detail.", "max_new_tokens": 48}
    long = {**probe, "max_new_tokens": 240}  # ~3 s of generation each on the tiny model
    oa_long = {**openai_body(), "max_tokens": 240}
    try:
        deadline = time.monotonic() + 300  # generous: CI machines may be shared
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and process.poll() is None, "the worker did not start"
            time.sleep(0.2)

        def ask() -> float:
            started = time.perf_counter()
            assert httpx.post(url + "/worker_generate_stream", json=probe, timeout=120).status_code == 200
            return time.perf_counter() - started

        ask()  # warm-up
        idle_s = sorted(ask() for _ in range(3))[1]

        def cut_stream():
            try:
                with httpx.stream("POST", url + "/worker_generate_stream", json=long, timeout=60) as response:
                    for _line in response.iter_lines():
                        break  # read one chunk, then hang up
            except httpx.HTTPError:
                pass

        def cut_request():
            try:
                httpx.post(url + "/v1/chat/completions", json=oa_long, timeout=0.5)  # not streamed
            except httpx.HTTPError:
                pass

        results = {}
        for name, cut in (("stream", cut_stream), ("non-stream", cut_request)):
            clients = [threading.Thread(target=cut) for _ in range(10)]
            for client in clients:
                client.start()
            for client in clients:
                client.join(60)
            results[name] = ask()
            cpu = _cpu_seconds(process.pid)
            time.sleep(1.0)
            busy = _cpu_seconds(process.pid) - cpu
            status = httpx.post(url + "/worker_get_status", timeout=10).json()
            assert status["queue_length"] == 0 and status["active_generations"] == 0, (name, status)
            assert busy < 0.2, (name, busy)  # nothing is generating any more
        print(f"\ncancellation: idle {idle_s:.3f} s, next request after 10 cut streams {results['stream']:.3f} s, "
              f"after 10 cut non-streamed requests {results['non-stream']:.3f} s")
        for name, seconds in results.items():
            assert seconds < 2 * idle_s, (name, seconds, idle_s)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def test_a_closed_stream_generator_joins_its_thread(engine):
    from ferret.regions import Box

    pieces = engine.chat.stream(str(SHAPES), "Describe <region>.", regions=[Box(50, 60, 150, 160)], max_new_tokens=200)
    next(pieces)
    started = time.perf_counter()
    pieces.close()
    assert time.perf_counter() - started < 1.0
    assert "ferret-generate" not in [t.name for t in threading.enumerate()]
    cancel = threading.Event()
    cancel.set()
    assert list(engine.chat.stream(str(SHAPES), "Hi?", max_new_tokens=50, cancel=cancel)) == []


# ---------------------------------------------------------------------------------------------
# Faults: a worker killed under load, restarts


def _spawn_worker(model_path: Path, port: int, controller_url: str, log) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("FERRET_API_KEY", None)
    return subprocess.Popen(
        [sys.executable, "-m", "ferret.serve.model_worker", "--model-path", str(model_path), "--model-name", "tiny",
         "--port", str(port), "--controller", controller_url, "--heartbeat-interval", "1", "--device", "cpu"],
        stdout=log, stderr=log, env=env, cwd=ROOT,
    )


def _wait_registered(controller: Controller, urls: set[str], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not urls <= set(controller.workers):
        assert time.monotonic() < deadline, f"workers {urls - set(controller.workers)} did not register"
        time.sleep(0.1)


def test_a_killed_worker_under_load_fails_over_and_restarts_re_register(tiny_path, tmp_path):
    controller = Controller(heartbeat_expiration=30, refresh_timeout=1.0)
    controller_port = free_port()
    controller_server = Server(build_controller_app(controller), controller_port)
    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    log = open(tmp_path / "workers.log", "w")
    processes = [_spawn_worker(tiny_path, p, controller_server.url, log) for p in ports]
    try:
        _wait_registered(controller, set(urls))
        client = ControllerClient(controller_server.url, timeout=180)
        body = {**worker_body(), "max_new_tokens": 60}
        records, stop = [], threading.Event()
        lock = threading.Lock()
        killed_at: list[float] = []

        def load():
            while not stop.is_set():
                started = time.monotonic()
                try:
                    chunks = list(client.stream(body))
                    outcome = "ok" if chunks[-1].get("done") else "incomplete"
                    status = None
                except ServeError as error:
                    outcome, status = str(error), error.status
                with lock:
                    records.append((started, time.monotonic(), outcome, status))

        def wait_for(condition, timeout: float = 240) -> None:
            deadline = time.monotonic() + timeout
            while not condition():
                assert time.monotonic() < deadline, "the load did not make progress"
                time.sleep(0.1)

        threads = [threading.Thread(target=load) for _ in range(8)]
        for thread in threads:
            thread.start()
        wait_for(lambda: len(records) >= 8)  # both workers busy (a count, not a time: CI CPUs may be shared)
        processes[0].send_signal(signal.SIGKILL)  # the first worker dies mid-load
        processes[0].wait(10)
        killed_at.append(time.monotonic())
        wait_for(lambda: sum(1 for r in list(records) if r[0] >= killed_at[0]) >= 8)
        stop.set()
        for thread in threads:
            thread.join(60)
        kill = killed_at[0]
        before = [r for r in records if r[0] < kill]
        after = [r for r in records if r[0] >= kill]
        assert len(before) >= 8 and len(after) >= 8, (len(before), len(after))
        failed_after = [r for r in after if r[2] != "ok"]
        assert not failed_after, failed_after[:3]  # every request after the kill succeeded on the other worker
        in_flight = [r for r in before if r[1] >= kill]
        failed = [r for r in before if r[2] != "ok"]
        assert len(failed) <= len(in_flight) <= 8, (failed, in_flight)  # only requests in flight at the kill fail ...
        for _start, _end, message, status in failed:  # ... each with a clear 503 naming the worker
            assert status == 503 and message.startswith("worker http://127.0.0.1:"), message
        assert urls[0] not in controller.workers  # reported, probed and removed well before its expiry
        print(f"\nfailover: {len(before)} requests before the kill ({len(failed)} failed, all 503), "
              f"{len(after)} after it, all answered")

        # A restarted worker registers again; a restarted controller is re-populated by heartbeats.
        processes[0] = _spawn_worker(tiny_path, ports[0], controller_server.url, log)
        _wait_registered(controller, {urls[0]})
        controller_server.stop()
        controller = Controller(heartbeat_expiration=30)
        controller_server = Server(build_controller_app(controller), controller_port)
        _wait_registered(controller, set(urls), timeout=60)
        assert ControllerClient(controller_server.url).list_models() == ["tiny"]
        assert list(ControllerClient(controller_server.url, timeout=60).stream(body))[-1]["done"]
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
        controller_server.stop()
        log.close()


# ---------------------------------------------------------------------------------------------
# Bounded memory: the worst request the limits allow, once and 100 times

MEMORY_IMAGE = (320, 250)  # 80,000 pixels: the worker below is started with --max-image-pixels 80000
PEAK_BOUND_MB = 300


def _rss_mb(pid: int) -> dict:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(value.split()[0]) / 1024
    return values


def test_worst_allowed_request_has_bounded_memory_and_does_not_accumulate(tmp_path):
    """The embedded model behind a worker whose image limit is 80,000 pixels (other limits at their
    defaults). The worst requests the limits allow: 16 full-image mask regions in one turn (the
    most that fit the model's context; every mask region is decoded and becomes a full-size mask),
    and 32 (the conversation limit, refused by the context check before any mask is built).
    Bound: peak RSS rises by less than 300 MB over the idle worker, and after 100 such requests
    RSS is within 10 % of what it was after the first one (warm-up: lazily built kernels, caches)."""
    from ferret.model.builder import NoDefaultModelError, resolve_model_path

    try:
        model = resolve_model_path(None)
    except (NoDefaultModelError, FileNotFoundError):
        pytest.skip("no embedded model ships")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "worker.log", "w")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("FERRET_API_KEY", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "ferret.serve.model_worker", "--model-path", str(model), "--port", str(port),
         "--device", "cpu", "--max-image-pixels", str(MEMORY_IMAGE[0] * MEMORY_IMAGE[1])],
        stdout=log, stderr=log, env=env, cwd=ROOT)
    width, height = MEMORY_IMAGE
    import numpy as np

    noise = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    image = png_b64(Image.fromarray(noise))
    full = png_b64(Image.new("L", (width, height), 255))

    def request(regions_now: int, history_turns: int, filler_words: int = 0) -> dict:
        mask = {"type": "mask", "mask": full}
        history = [{"question": "q", "answer": "a", "regions": [mask] * 16}] * history_turns
        if filler_words:  # a long text-only turn: past any model's context, whatever its tokenizer
            history.append({"question": "describe " * filler_words, "answer": "a"})
        return {"image": image, "question": "What is this?", "regions": [mask] * regions_now, "max_new_tokens": 1,
                "history": history}

    accepted, refused = request(16, 0), request(16, 1, filler_words=1500)
    try:
        deadline = time.monotonic() + 300  # generous: CI machines may be shared
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and process.poll() is None, "the worker did not start"
            time.sleep(0.2)
        small = {"image": image, "question": "What is <region>?", "regions": [{"type": "box", "box": [20, 20, 80, 80]}],
                 "max_new_tokens": 4}
        assert httpx.post(url + "/worker_generate_stream", json=small, timeout=120).status_code == 200
        idle = _rss_mb(process.pid)
        first = httpx.post(url + "/worker_generate_stream", json=accepted, timeout=120)
        assert first.status_code == 200, first.text
        over = httpx.post(url + "/worker_generate_stream", json=refused, timeout=120)
        assert over.status_code == 400 and "context" in over.json()["error"]["message"], over.text
        warm = _rss_mb(process.pid)
        peak_rise = warm["VmHWM"] - idle["VmRSS"]
        for i in range(100):
            response = httpx.post(url + "/worker_generate_stream", json=accepted if i % 2 == 0 else refused, timeout=120)
            assert response.status_code in (200, 400)
        after = _rss_mb(process.pid)
        print(f"\nmemory: idle {idle['VmRSS']:.0f} MB, peak rise of the worst request {peak_rise:.0f} MB, "
              f"after warm-up {warm['VmRSS']:.0f} MB, after 100 more {after['VmRSS']:.0f} MB "
              f"(peak {after['VmHWM']:.0f} MB)")
        assert peak_rise < PEAK_BOUND_MB, (idle, warm)
        assert after["VmHWM"] - idle["VmRSS"] < PEAK_BOUND_MB, (idle, after)
        assert after["VmRSS"] < 1.10 * warm["VmRSS"], (warm, after)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
