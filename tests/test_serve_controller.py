"""Controller registry: dispatch, heartbeats, expiry, HTTP errors, API key (no model needed)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from ferret.serve.controller import Controller, build_app
from ferret.serve.protocol import RequestError, UnknownModelError


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def status(*models, queue=0, speed=1):
    return {"model_names": list(models), "queue_length": queue, "speed": speed}


def test_shortest_queue_spreads_a_burst_and_prefers_the_idle_worker():
    controller = Controller("shortest_queue")
    controller.register_worker("http://a", True, status("m", queue=3))
    controller.register_worker("http://b", True, status("m", queue=0))
    controller.register_worker("http://c", True, status("other"))
    picks = [controller.get_worker_address("m") for _ in range(5)]
    # b starts 3 behind a: it takes the first three, then they alternate.
    assert picks == ["http://b", "http://b", "http://b", "http://a", "http://b"]
    assert controller.get_worker_address("other") == "http://c"
    assert controller.list_models() == ["m", "other"]


def test_speed_weights_the_queue():
    controller = Controller("shortest_queue")
    controller.register_worker("http://slow", True, status("m", queue=1, speed=1))
    controller.register_worker("http://fast", True, status("m", queue=3, speed=4))
    assert controller.get_worker_address("m") == "http://fast"  # 3/4 < 1/1


def test_lottery_only_picks_workers_of_the_model():
    controller = Controller("lottery")
    controller.register_worker("http://a", True, status("m"))
    controller.register_worker("http://b", True, status("n"))
    assert {controller.get_worker_address("m") for _ in range(20)} == {"http://a"}


def test_unknown_model_names_the_available_ones():
    controller = Controller()
    controller.register_worker("http://a", True, status("m"))
    with pytest.raises(UnknownModelError, match=r"no worker serves model 'x'; available: \['m'\]"):
        controller.get_worker_address("x")


def test_heartbeats_keep_workers_and_silence_expires_them():
    clock = FakeClock()
    controller = Controller(heartbeat_expiration=10, clock=clock)
    controller.register_worker("http://a", True, status("m"))
    controller.register_worker("http://b", True, status("m"))
    controller.register_worker("http://pinned", False, status("m"))  # asks not to be checked: ignored
    clock.now += 8
    assert controller.receive_heart_beat("http://a", queue_length=2)
    clock.now += 5  # b and pinned silent for 13 s, a for 5 s
    assert controller.remove_expired_workers() == ["http://b", "http://pinned"]
    assert set(controller.workers) == {"http://a"}
    assert controller.workers["http://a"].queue_length == 2
    assert not controller.receive_heart_beat("http://b", 0)  # forgotten: the worker must re-register


def test_refresh_drops_unreachable_workers():
    controller = Controller()
    controller.register_worker("http://127.0.0.1:9", True, status("m"))  # port 9: nothing listens
    controller.refresh_all_workers()
    assert controller.workers == {}


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="dispatch method"):
        Controller("round_robin")
    with pytest.raises(ValueError, match="expiration must be positive"):
        Controller(heartbeat_expiration=0)


def test_http_api_and_its_errors():
    controller = Controller()
    with TestClient(build_app(controller)) as client:
        ok = client.post("/register_worker", json={"worker_name": "http://127.0.0.1:1", "worker_status": status("m")})
        assert ok.status_code == 200
        assert client.post("/list_models").json() == {"models": ["m"]}
        assert client.post("/get_worker_address", json={"model": "m"}).json() == {"address": "http://127.0.0.1:1"}
        assert client.post("/receive_heart_beat", json={"worker_name": "http://127.0.0.1:1", "queue_length": 4}).json() == {"exist": True}
        assert client.post("/worker_get_status").json()["queue_length"] == 4

        bad = client.post("/get_worker_address", content=b"{not json")
        assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
        unknown = client.post("/get_worker_address", json={"model": "nope"})
        assert unknown.status_code == 404 and "no worker serves model 'nope'" in unknown.json()["error"]["message"]
        assert client.post("/get_worker_address", json={}).status_code == 400
        assert client.post("/register_worker", json={"worker_name": "w"}).status_code == 400
        assert client.post("/receive_heart_beat", json={"worker_name": "x", "queue_length": "3"}).status_code == 400
        assert client.get("/health").json() == {"ok": True}  # still serving after the bad requests


def test_api_key_is_required_when_set(monkeypatch):
    controller = Controller(api_key="s3cret")
    with TestClient(build_app(controller)) as client:
        assert client.post("/list_models").status_code == 401
        assert client.post("/list_models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.post("/list_models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.post("/list_models", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert client.get("/health").status_code == 200
        # Registration needs the key too; with it, any host may register.
        register = {"worker_name": "http://10.1.2.3:21002", "worker_status": status("m")}
        assert client.post("/register_worker", json=register).status_code == 401
        assert controller.workers == {}
        assert client.post("/register_worker", json=register, headers={"X-API-Key": "s3cret"}).status_code == 200


# -- issue 16: trusted workers ------------------------------------------------------------------


def test_without_a_key_only_loopback_workers_may_register():
    controller = Controller(allowed_worker_hosts=["gpu-box.internal"])
    with TestClient(build_app(controller)) as client:
        def register(url):
            return client.post("/register_worker", json={"worker_name": url, "worker_status": status("m")})

        for url in ("http://127.0.0.1:21002", "http://localhost:21002", "http://[::1]:21002", "http://127.0.0.9:1",
                    "http://gpu-box.internal:21002"):
            assert register(url).status_code == 200, url
        for url in ("http://10.0.0.5:21002", "http://evil.example:80", "http://192.168.1.1:8080"):
            refused = register(url)
            assert refused.status_code == 403 and "loopback" in refused.json()["error"]["message"], url
        # The controller calls only scheme://host:port + its own paths: anything else is refused.
        for url in ("http://127.0.0.1:21002/admin/delete", "http://127.0.0.1:1?x=1", "http://u:p@127.0.0.1:1",
                    "ftp://127.0.0.1:1", "http://127.0.0.1:99999", "127.0.0.1:21002", 5, None):
            assert register(url).status_code == 400, url
        assert set(controller.workers) == {"http://127.0.0.1:21002", "http://localhost:21002", "http://[::1]:21002",
                                           "http://127.0.0.9:1", "http://gpu-box.internal:21002"}


@pytest.mark.parametrize("bad, fragment", [
    ({"model_names": [{"x": 1}]}, "invalid name"),
    ({"model_names": []}, "model_names"),
    ({"model_names": "m"}, "model_names"),
    ({"model_names": ["m"] * 65}, "model_names"),
    ({"model_names": ["m"], "speed": "fast"}, "speed"),
    ({"model_names": ["m"], "speed": 0}, "speed"),
    ({"model_names": ["m"], "speed": -1}, "speed"),
    ({"model_names": ["m"], "speed": 10**400}, "speed"),
    ({"model_names": ["m"], "queue_length": -1}, "queue_length"),
    ({"model_names": ["m"], "queue_length": 1.5}, "queue_length"),
    ({"model_names": ["m"], "memory_bytes": "1 GB"}, "memory_bytes"),
    ({"model_names": ["m"], "heartbeat_interval": 0}, "heartbeat_interval"),
    ("not an object", "must be an object"),
])
def test_malformed_worker_status_is_refused_and_never_stored(bad, fragment):
    controller = Controller()
    with TestClient(build_app(controller)) as client:
        if bad == {"model_names": ["m"], "speed": 10**400}:
            body = b'{"worker_name": "http://127.0.0.1:5", "worker_status": {"model_names": ["m"], "speed": 1' + b"0" * 400 + b"}}"
            refused = client.post("/register_worker", content=body)
        else:
            refused = client.post("/register_worker", json={"worker_name": "http://127.0.0.1:5", "worker_status": bad})
        assert refused.status_code == 400, refused.text
        assert controller.workers == {}
        assert client.post("/list_models").status_code == 200
        assert client.post("/worker_get_status").status_code == 200
    with pytest.raises(RequestError, match=fragment):
        controller.register_worker("http://127.0.0.1:5", True, bad)
    assert controller.workers == {}


def test_speed_nan_in_a_status_is_refused():
    controller = Controller()
    with TestClient(build_app(controller)) as client:
        body = b'{"worker_name": "http://127.0.0.1:5", "worker_status": {"model_names": ["m"], "speed": NaN}}'
        assert client.post("/register_worker", content=body).status_code == 400
        assert controller.workers == {} and client.post("/list_models").json() == {"models": []}


class SilentServer:
    """A TCP port that accepts connections and never answers (a hung or hostile worker)."""

    def __init__(self):
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def close(self):
        self.sock.close()


def test_refresh_asks_all_workers_at_once_and_drops_the_silent_ones():
    import time

    silent = [SilentServer() for _ in range(8)]
    controller = Controller(refresh_timeout=1.0)
    try:
        for server in silent:
            controller.register_worker(server.url, True, status("m"))
        started = time.monotonic()
        controller.refresh_all_workers()
        elapsed = time.monotonic() - started
        assert elapsed < 5.0, elapsed  # serial refreshes would take 8 x 1 s at least
        assert controller.workers == {}
    finally:
        for server in silent:
            server.close()


def test_dispatch_skips_a_failed_worker_and_a_retry_excludes_it():
    clock = FakeClock()
    controller = Controller(clock=clock)
    controller.register_worker("http://127.0.0.1:1", True, status("m"))
    controller.register_worker("http://127.0.0.1:2", True, {**status("m"), "heartbeat_interval": 5})
    assert controller.report_failure("http://127.0.0.1:1", probe=False)
    assert {controller.get_worker_address("m") for _ in range(4)} == {"http://127.0.0.1:2"}
    assert controller.get_worker_address("m", exclude=["http://127.0.0.1:2"]) == "http://127.0.0.1:1"  # failing beats none
    with pytest.raises(RequestError, match="no other worker") as info:
        controller.get_worker_address("m", exclude=["http://127.0.0.1:1", "http://127.0.0.1:2"])
    assert info.value.status == 503
    assert controller.receive_heart_beat("http://127.0.0.1:1", 0)  # alive again: eligible
    clock.now += 16  # worker 2 missed two heartbeats (interval 5 s) and 5 s more: overdue, skipped
    assert controller.receive_heart_beat("http://127.0.0.1:1", 0)
    assert {controller.get_worker_address("m") for _ in range(4)} == {"http://127.0.0.1:1"}


def test_a_reported_failure_of_a_dead_worker_removes_it():
    import time

    controller = Controller(refresh_timeout=1.0)
    controller.register_worker("http://127.0.0.1:9", True, status("m"))  # nothing listens on port 9
    with TestClient(build_app(controller)) as client:
        assert client.post("/report_worker_failure", json={"worker_name": "http://127.0.0.1:9"}).json() == {"known": True}
        deadline = time.monotonic() + 5
        while controller.workers and time.monotonic() < deadline:
            time.sleep(0.05)
        assert controller.workers == {}
