"""Controller registry: dispatch, heartbeats, expiry, HTTP errors, API key (no model needed)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from ferret.serve.controller import Controller, build_app
from ferret.serve.protocol import UnknownModelError


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
    controller.register_worker("http://pinned", False, status("m"))  # not heartbeat-checked
    clock.now += 8
    assert controller.receive_heart_beat("http://a", queue_length=2)
    clock.now += 5  # b silent for 13 s, a for 5 s
    assert controller.remove_expired_workers() == ["http://b"]
    assert set(controller.workers) == {"http://a", "http://pinned"}
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
        ok = client.post("/register_worker", json={"worker_name": "http://w:1", "worker_status": status("m")})
        assert ok.status_code == 200
        assert client.post("/list_models").json() == {"models": ["m"]}
        assert client.post("/get_worker_address", json={"model": "m"}).json() == {"address": "http://w:1"}
        assert client.post("/receive_heart_beat", json={"worker_name": "http://w:1", "queue_length": 4}).json() == {"exist": True}
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
