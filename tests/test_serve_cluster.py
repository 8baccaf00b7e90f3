"""Controller + several model workers (two models) as in-process uvicorn servers on loopback ports,
with a tiny random Ferret: registration, streaming, least-loaded dispatch, a worker that dies
and expires, error responses while the servers stay up, the OpenAI API and the API key."""

from __future__ import annotations

import base64
import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from PIL import Image

from ferret.serve.client import ControllerClient, ServeError
from ferret.serve.controller import Controller
from ferret.serve.controller import build_app as build_controller_app
from ferret.serve.demo import free_port
from ferret.serve.engine import ChatEngine
from ferret.serve.model_worker import ModelWorker
from ferret.serve.model_worker import build_app as build_worker_app
from ferret.serve.protocol import encode_image

EXAMPLES = Path(__file__).resolve().parents[1] / "ferret" / "assets" / "examples"
EXPIRATION = 3.0  # seconds; heartbeats every 0.3 s, with room for a busy shared CPU


class Server:
    """A uvicorn server in a daemon thread (``port`` given when the app must know it first)."""

    def __init__(self, app, port: int | None = None, wait: bool = True):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        if wait:
            self.wait_started()

    def wait_started(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from ferret.model.tiny import save_tiny_model

    path = save_tiny_model(tmp_path_factory.mktemp("serve") / "tiny-ferret")
    return ChatEngine.load(path, device="cpu")


@pytest.fixture(scope="module")
def cluster(engine, tmp_path_factory):
    allowed = tmp_path_factory.mktemp("allowed")
    Image.open(EXAMPLES / "shapes.png").save(allowed / "shapes.png")
    controller = Controller(heartbeat_expiration=EXPIRATION)
    controller_server = Server(build_controller_app(controller))
    servers, workers = {}, {}
    for name, model_name in (("a", "tiny"), ("b", "tiny"), ("c", "tiny-b")):
        port = free_port()
        worker = ModelWorker(
            ChatEngine(engine.chat, model_name), f"http://127.0.0.1:{port}", controller_server.url,
            heartbeat_interval=0.3, allowed_image_dir=allowed,
        )
        servers[name] = Server(build_worker_app(worker), port, wait=False)  # all three start together
        workers[name] = worker
    deadline = time.monotonic() + 20
    while len(controller.workers) < 3 or not all(s.server.started for s in servers.values()):
        assert time.monotonic() < deadline, "workers did not register"
        time.sleep(0.05)
    yield {"controller": controller, "controller_url": controller_server.url, "servers": servers,
           "workers": workers, "allowed": allowed}
    for server in servers.values():
        server.stop()
    for worker in workers.values():
        worker.stop()
    controller_server.stop()


def image_b64(name="shapes.png") -> str:
    return base64.b64encode((EXAMPLES / name).read_bytes()).decode()


def payload(**overrides) -> dict:
    data = {"model": "tiny", "image": image_b64(), "question": "What is <region>?",
            "regions": [{"type": "box", "box": [50, 60, 150, 160]}], "max_new_tokens": 6}
    data.update(overrides)
    return data


def test_workers_register_with_their_models(cluster):
    client = ControllerClient(cluster["controller_url"])
    assert client.list_models() == ["tiny", "tiny-b"]
    status = client.status()
    assert set(status["workers"]) == {s.url for s in cluster["servers"].values()}
    assert all(w["memory_bytes"] > 0 for w in status["workers"].values())


def test_answer_streams_through_the_controller(cluster, engine):
    chunks = list(ControllerClient(cluster["controller_url"]).stream(payload()))
    texts = [c["text"] for c in chunks]
    assert chunks[-1]["done"] is True and chunks[-1]["error_code"] == 0
    assert all(texts[i + 1].startswith(texts[i]) for i in range(len(texts) - 1))  # accumulating
    assert len(chunks) >= 2
    # The streamed answer is what the model answers directly (greedy).
    from ferret.regions import Box

    direct = engine.chat.ask(Image.open(EXAMPLES / "shapes.png"), "What is <region>?",
                             regions=[Box(50, 60, 150, 160)], max_new_tokens=6)
    assert texts[-1] == direct.text


def test_multi_turn_history_and_sketch_region(cluster):
    mask = Image.new("L", (400, 300), 0)
    mask.paste(255, (60, 70, 140, 150))
    chunks = list(ControllerClient(cluster["controller_url"]).stream(payload(
        question="And <region>?", regions=[{"type": "mask", "mask": encode_image(mask)}],
        history=[{"question": "What is <region>?", "regions": [{"type": "point", "point": [100, 100]}], "answer": "a circle"}],
    )))
    assert chunks[-1]["done"] and chunks[-1]["error_code"] == 0


def test_least_loaded_dispatch_uses_both_workers_of_a_model(cluster):
    controller = cluster["controller"]
    results, errors = [], []

    def ask():
        try:
            results.append(list(ControllerClient(cluster["controller_url"]).stream(payload(max_new_tokens=3)))[-1])
        except Exception as error:  # noqa: BLE001 - collected and asserted below
            errors.append(error)

    picked = []
    original = controller.get_worker_address

    def recording(model, *args):
        address = original(model, *args)
        picked.append(address)
        return address

    controller.get_worker_address = recording
    try:
        threads = [threading.Thread(target=ask) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        controller.get_worker_address = original
    assert not errors and len(results) == 6 and all(r["done"] for r in results)
    a, b = cluster["servers"]["a"].url, cluster["servers"]["b"].url
    assert set(picked) == {a, b} and abs(picked.count(a) - picked.count(b)) <= 2


def test_bad_requests_get_clear_errors_and_servers_stay_up(cluster):
    worker_url = cluster["servers"]["a"].url + "/worker_generate_stream"
    corrupt = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64).decode()
    empty_mask = encode_image(Image.new("L", (400, 300), 0))
    huge = base64.b64encode(_huge_png()).decode()
    cases = [
        (payload(image=corrupt), 400, "not a readable image"),
        (payload(regions=[{"type": "mask", "mask": empty_mask}]), 400, "empty"),
        (payload(regions=[{"type": "box", "box": [500, 400, 600, 500]}]), 400, "wholly outside"),
        (payload(image=huge), 413, "10000x10000"),
        (payload(model="no-such-model"), 404, "serves 'tiny', not 'no-such-model'"),
        (payload(question="<region> and <region>?"), 400, "2 <region> placeholder"),
        (payload(max_new_tokens=600), 400, "context"),
    ]
    for body, status, fragment in cases:
        response = httpx.post(worker_url, json=body, timeout=30)
        assert response.status_code == status, (fragment, response.text)
        assert fragment in response.json()["error"]["message"]
    oversize = httpx.post(worker_url, content=b"{" + b" " * (33 * 1024 * 1024) + b"}", timeout=30)
    assert oversize.status_code == 413 and "over the 32 MiB limit" in oversize.json()["error"]["message"]
    malformed = httpx.post(worker_url, content=b'{"image": ', timeout=10)
    assert malformed.status_code == 400 and "not valid JSON" in malformed.json()["error"]["message"]
    with pytest.raises(ServeError, match="no worker serves model 'ghost'") as info:
        list(ControllerClient(cluster["controller_url"]).stream(payload(model="ghost")))
    assert info.value.status == 404
    assert list(ControllerClient(cluster["controller_url"]).stream(payload()))[-1]["done"]  # still serving


def _huge_png() -> bytes:
    """A valid 10,000 x 10,000 PNG (100 MP, 12 KB: one bit per pixel, all black)."""
    import io

    buffer = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buffer, "PNG")
    return buffer.getvalue()


def test_openai_chat_completions(cluster):
    base = cluster["servers"]["a"].url
    models = httpx.get(base + "/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    image_part = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image_b64()}}
    body = {"model": "tiny", "max_tokens": 5, "messages": [
        {"role": "system", "content": "ignored"},
        {"role": "user", "content": [{"type": "text", "text": "What is [125, 200, 375, 533] <region_fea>?"}, image_part]},
    ]}
    answer = httpx.post(base + "/v1/chat/completions", json=body, timeout=30).json()
    text = answer["choices"][0]["message"]["content"]
    assert answer["object"] == "chat.completion" and answer["choices"][0]["finish_reason"] == "stop"

    with httpx.stream("POST", base + "/v1/chat/completions", json={**body, "stream": True}, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    deltas = [json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-1]]
    assert "".join(deltas) == text  # the stream adds up to the same (greedy) answer

    local = {**body, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": str(cluster["allowed"] / "shapes.png")}}]}]}
    assert httpx.post(base + "/v1/chat/completions", json=local, timeout=30).status_code == 200
    outside = {**body, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": str(EXAMPLES / "shapes.png")}}]}]}
    refused = httpx.post(base + "/v1/chat/completions", json=outside, timeout=30)
    assert refused.status_code == 403 and "outside the allowed folder" in refused.json()["error"]["message"]
    no_image = httpx.post(base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert no_image.status_code == 400 and "needs an image" in no_image.json()["error"]["message"]
    wrong_model = httpx.post(base + "/v1/chat/completions", json={**body, "model": "gpt-4"})
    assert wrong_model.status_code == 404


def test_api_key_guards_worker_and_openai_endpoints(engine):
    worker = ModelWorker(ChatEngine(engine.chat, "tiny"), "http://127.0.0.1:1", api_key="k3y")
    server = Server(build_worker_app(worker))
    try:
        for method, path in (("POST", "/worker_get_status"), ("GET", "/v1/models"),
                             ("POST", "/v1/chat/completions"), ("POST", "/worker_generate_stream")):
            assert httpx.request(method, server.url + path, json={}).status_code == 401
        assert httpx.post(server.url + "/worker_get_status", headers={"Authorization": "Bearer k3y"}).status_code == 200
        assert httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer k3y"}).status_code == 200
    finally:
        server.stop()


def test_a_forgotten_worker_registers_again_on_its_next_heartbeat(cluster):
    controller, worker = cluster["controller"], cluster["workers"]["a"]
    controller.remove_worker(worker.worker_address)  # e.g. the controller restarted
    worker.send_heartbeat()  # (its own heartbeat thread may beat us to it: same path)
    assert controller.workers[worker.worker_address].model_names == ["tiny"]


def test_a_dead_worker_expires_and_its_model_disappears(cluster):
    controller = cluster["controller"]
    dead = cluster["servers"]["c"]
    cluster["workers"]["c"].stop()  # no more heartbeats ...
    dead.stop()  # ... and no more answers
    deadline = time.monotonic() + EXPIRATION + 6
    while dead.url in controller.workers:
        assert time.monotonic() < deadline, "the dead worker was not expired"
        time.sleep(0.1)
    client = ControllerClient(cluster["controller_url"])
    assert client.list_models() == ["tiny"]
    with pytest.raises(ServeError, match="no worker serves model 'tiny-b'"):
        client.worker_address("tiny-b")
    assert list(client.stream(payload()))[-1]["done"]  # the others keep serving


def test_worker_reports_its_queue_soon_after_a_request(engine):
    controller = Controller(heartbeat_expiration=120)
    controller_server = Server(build_controller_app(controller))
    port = free_port()
    worker = ModelWorker(ChatEngine(engine.chat, "tiny"), f"http://127.0.0.1:{port}", controller_server.url,
                         heartbeat_interval=60)  # the periodic beat alone would come far too late
    worker_server = Server(build_worker_app(worker), port)
    try:
        deadline = time.monotonic() + 20
        while worker.worker_address not in controller.workers:
            assert time.monotonic() < deadline, "the worker did not register"
            time.sleep(0.05)
        client = ControllerClient(controller_server.url)
        assert list(client.stream(payload(max_new_tokens=2)))[-1]["done"]
        # Dispatch counted the request; the worker's early heartbeat brings the count back to 0.
        deadline = time.monotonic() + 5
        while controller.workers[worker.worker_address].queue_length != 0:
            assert time.monotonic() < deadline, "no heartbeat after the request finished"
            time.sleep(0.05)
    finally:
        worker.stop()
        worker_server.stop()
        controller_server.stop()
