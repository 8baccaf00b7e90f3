"""Ferret-Bench: question conversion, answer post-processing, judges (offline heuristic and an
OpenAI-compatible endpoint served by a fake server on 127.0.0.1), the released summary."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from ferret.eval import ferret_bench, judge as J

DATA = Path(__file__).parent / "data" / "eval" / "ferret_bench"
SHARED_BENCH = Path(__file__).resolve().parents[1] / ".." / "shared" / "ferret_bench"


def make_images(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (200, 100), (10, 200, 10)).save(folder / "000000000301.jpg")  # 302 is missing


class FakeOpenAI:
    """Chat-completions server: replies with a queue of (status, body) or a default review."""

    def __init__(self, replies=(), default="8 6\nAssistant 2 misses details."):
        self.requests, self.replies, self.default = [], list(replies), default
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                status, content = owner.replies.pop(0) if owner.replies else (200, owner.default)
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}
                                     if status == 200 else {"error": content}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_question_regions_become_placeholders_with_pixel_boxes():
    text, regions = ferret_bench.question_with_regions("What is [0.621, 0.082, 0.772, 0.132] near?", (640, 480))
    assert text == "What is <region> near?"
    assert regions[0].coords == pytest.approx((397.44, 39.36, 494.08, 63.36))
    from ferret.regions import format_region
    assert format_region(regions[0], 640, 480) == "[621, 82, 772, 132] <region_fea>"  # released int(v * 1000)
    assert ferret_bench.question_with_regions("Where [0.1, 0.2, 0.3, 0.4]?", None) == ("Where [0.1, 0.2, 0.3, 0.4]?", ())


def test_postprocess_answer_as_released():
    assert ferret_bench.postprocess_answer("A sign [100, 200, 300, 400] on a wall [1, 2, 3, 4].", "refer_desc") \
        == "A sign on a wall."
    assert ferret_bench.postprocess_answer("A man [201, 2, 940, 758] and [5, 6] junk.", "ground_conv") \
        == "A man [0.201, 0.002, 0.940, 0.758] and  junk."


def test_parse_score_pair():
    assert J.parse_score_pair("8 6\nbecause") == (8.0, 6.0)
    assert J.parse_score_pair("9, 7.5") == (9.0, 7.5)
    assert J.parse_score_pair("Assistant 1: 8\n") is None
    assert J.parse_score_pair("") is None


def test_offline_judge_is_deterministic_and_ranks_better_answers_higher():
    offline = J.OfflineHeuristicJudge()
    ref = "The dog [0.100, 0.200, 0.500, 0.600] is running on the grass."
    good = J.ReviewRequest("ground_conv", "", "q", ref, "A dog [0.100, 0.200, 0.500, 0.600] running on grass.")
    bad = J.ReviewRequest("ground_conv", "", "q", ref, "A cat [0.700, 0.700, 0.900, 0.900] sleeping.")
    good_scores = J.parse_score_pair(offline.review("", good))
    bad_scores = J.parse_score_pair(offline.review("", bad))
    assert good_scores[0] == bad_scores[0] == 10.0
    assert good_scores[1] > bad_scores[1] >= 1.0
    assert offline.review("", good) == offline.review("", good)
    assert J.word_f1("brown dog runs", "the brown dog runs") == 1.0
    assert J.box_match("[0.1, 0.1, 0.5, 0.5]", "[0.1, 0.1, 0.5, 0.5] [0.6, 0.6, 0.9, 0.9]") == pytest.approx(0.5)


def test_judge_from_env_selects_endpoint_or_offline():
    assert J.judge_from_env({}).name == J.OFFLINE_JUDGE_NAME
    remote = J.judge_from_env({"FERRET_JUDGE_URL": "http://127.0.0.1:1/v1", "FERRET_JUDGE_MODEL": "m",
                               "FERRET_JUDGE_API_KEY": "k"})
    assert isinstance(remote, J.OpenAIJudge) and remote.name == "openai-compatible:m"
    assert remote.url == "http://127.0.0.1:1/v1/chat/completions"


def test_openai_judge_against_fake_server_with_retry_and_fatal_errors():
    with FakeOpenAI(replies=[(500, "overloaded"), (200, "7 5\nok")]) as server:
        remote = J.OpenAIJudge(server.url, model="judge-model", api_key="secret", retry_wait_s=0.01)
        assert remote.review("hello") == "7 5\nok"
        assert len(server.requests) == 2
        request = server.requests[-1]
        assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer secret"
        assert request["body"]["model"] == "judge-model" and request["body"]["temperature"] == 0.2
        assert request["body"]["messages"][0] == {"role": "system", "content": J.SYSTEM_PROMPT}
        assert request["body"]["messages"][1]["content"] == "hello"
    with FakeOpenAI(replies=[(401, "bad key")]) as server:
        with pytest.raises(J.JudgeError, match="HTTP 401"):
            J.OpenAIJudge(server.url, retry_wait_s=0.01).review("x")
        assert len(server.requests) == 1  # not retried
    with pytest.raises(J.JudgeError, match="failed after 2 tries"):
        J.OpenAIJudge("http://127.0.0.1:9/v1", retries=2, retry_wait_s=0.01, timeout_s=1).review("x")


def fake_model(items):
    answers = []
    for _, question, regions in items:
        if "coordinates" in question:
            answers.append("The dog [100, 200, 500, 600] is running.")
        else:
            assert regions and "<region>" in question
            answers.append("A brown dog [100, 200, 500, 600] on the grass.")
    return answers


def test_ferret_bench_with_fake_openai_judge(tmp_path, monkeypatch):
    images = tmp_path / "images"
    make_images(images)
    out = tmp_path / "out"
    with FakeOpenAI(default="8 6\nfine") as server:
        monkeypatch.setenv("FERRET_JUDGE_URL", server.url)
        monkeypatch.setenv("FERRET_JUDGE_MODEL", "fake-gpt")
        metrics = ferret_bench.main(["--data", str(DATA), "--images", str(images), "--out", str(out),
                                     "--no-progress", "--batch-size", "2"], answer_fn=fake_model)
        prompts = [r["body"]["messages"][1]["content"] for r in server.requests]
    assert metrics["judge"] == "openai-compatible:fake-gpt"
    assert metrics["scores"] == {"all": 75.0, "ground_conv": 75.0, "refer_desc": 75.0}
    assert metrics["missing_images"] == 1 and metrics["num_reviews"] == 2
    # The review prompt carries the context, original question, both answers and the category rule;
    # the referring answer lost its box, the grounded one has it normalised.
    refer = next(p for p in prompts if "doing?" in p)
    assert refer.startswith("[Context]\nObjects:\nObject 0 : dog at [0.100, 0.200, 0.500, 0.600].\n\n[Question]\n"
                            "What is the object [0.100, 0.200, 0.500, 0.600] doing?")
    assert "[Assistant 2]\nA brown dog on the grass.\n\n[End of Assistant 2]" in refer
    assert refer.rstrip().endswith("First line: the two scores separated by a space.")
    ground = next(p for p in prompts if "coordinates" in p)
    assert "The dog [0.100, 0.200, 0.500, 0.600] is running." in ground
    # Resume: a second run asks neither the model nor the judge again.
    with FakeOpenAI(default="1 1\nnever used") as server:
        monkeypatch.setenv("FERRET_JUDGE_URL", server.url)
        again = ferret_bench.main(["--data", str(DATA), "--images", str(images), "--out", str(out),
                                   "--no-progress"], answer_fn=lambda items: pytest.fail("asked again"))
        assert server.requests == []
    assert again["scores"] == metrics["scores"]


def test_ferret_bench_offline_judge_is_labelled(tmp_path, monkeypatch):
    monkeypatch.delenv("FERRET_JUDGE_URL", raising=False)
    images = tmp_path / "images"
    make_images(images)
    metrics = ferret_bench.main(["--data", str(DATA), "--images", str(images), "--out", str(tmp_path / "out"),
                                 "--no-progress", "--visualize", "1"], answer_fn=fake_model)
    assert metrics["judge"] == "offline-heuristic (not GPT-4)"
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["judge"] == "offline-heuristic (not GPT-4)"
    assert 0 < saved["scores"]["all"] < 100
    assert len(list((tmp_path / "out" / "visualize").glob("*.png"))) == 1


def test_unparsable_review_is_listed_and_excluded(tmp_path, monkeypatch):
    images = tmp_path / "images"
    make_images(images)
    with FakeOpenAI(replies=[(200, "Assistant 1 is better.")], default="10 5\nok") as server:
        monkeypatch.setenv("FERRET_JUDGE_URL", server.url)
        metrics = ferret_bench.main(["--data", str(DATA), "--images", str(images), "--out", str(tmp_path / "o"),
                                     "--no-progress"], answer_fn=fake_model)
    assert metrics["num_unparsable_reviews"] == 1
    assert metrics["scores"]["all"] == 50.0 and metrics["num_reviews"] == 1


def test_released_bench_files_load(tmp_path):
    if not SHARED_BENCH.is_dir():
        pytest.skip(f"released Ferret-Bench not found at {SHARED_BENCH}")
    loaded = ferret_bench.load_samples([str(SHARED_BENCH)], str(tmp_path))
    categories = {s.meta["category"] for s in loaded.samples}
    assert len(loaded.samples) == 120 and categories == {"refer_desc", "refer_reason", "ground_conv"}
    assert not loaded.bad_annotations
    rules = json.loads((SHARED_BENCH / "rule.json").read_text())
    assert categories <= set(rules)
