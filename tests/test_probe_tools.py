"""The issue-13 probe tools that other measurements rest on: bench/probes/export_step.py (a mid-run
DeepSpeed checkpoint as a model folder), bench/probes/repro_check.py's step comparison and
bench/probes/weight_soup.py (weight averages of exported models)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ferret.model.checkpoint_io import CheckpointError
from ferret.model.tiny import build_tiny_model

PROBES = Path(__file__).resolve().parents[1] / "bench" / "probes"


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"probe_{name}", PROBES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_repro_compare_is_exact_and_ignores_throughput():
    compare = load_script("repro_check").compare
    reference = [{"step": 10, "loss": 5.25, "grad_norm": 3.0, "samples_per_s": 6.1},
                 {"step": 20, "loss": 4.5, "grad_norm": 2.0, "samples_per_s": 6.0},
                 {"step": 30, "loss": 4.0, "grad_norm": 1.0, "samples_per_s": 6.0}]
    same = [dict(row, samples_per_s=1.0) for row in reference]
    assert [s["equal"] for s in compare(reference, same, 30)] == [True, True, True]
    off = [dict(row) for row in reference]
    off[1]["loss"] = 4.5 + 1e-12  # one ulp-scale difference is a difference
    steps = compare(reference, off, 30)
    assert [s["equal"] for s in steps] == [True, False, True]
    assert steps[1]["differ"] == {"loss": [4.5, 4.5 + 1e-12]}
    assert len(compare(reference, same, 20)) == 2  # only the first `steps` steps
    missing = compare(reference[:1], same, 20)
    assert missing[1]["equal"] is False and "not in the reference" in missing[1]["why"]
    # a number logged since the reference was made is listed, not compared; one the rerun lost differs
    logged_more = [dict(row, attention_mass_head0=0.5) for row in reference]
    assert [s["equal"] for s in compare(reference, logged_more, 30)] == [True, True, True]
    assert compare(reference, logged_more, 10)[0]["new_keys"] == ["attention_mass_head0"]
    lost = [{k: v for k, v in row.items() if k != "grad_norm"} for row in reference]
    assert compare(reference, lost, 10)[0]["differ"] == {"grad_norm": [3.0, None]}


def test_export_step_writes_the_deepspeed_weights_as_a_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM

    import ferret.model  # noqa: F401  (registers the Ferret classes with the Auto factories)

    export = load_script("export_step").main
    model, tokenizer = build_tiny_model()
    like = tmp_path / "like"
    model.save_pretrained(like)
    tokenizer.save_pretrained(like)
    trained = {name: tensor + 0.5 for name, tensor in model.state_dict().items()}  # "later" weights
    step = tmp_path / "step-00000300"
    step.mkdir()
    torch.save({"module": trained}, step / "mp_rank_00_model_states.pt")

    dst = export(["--step-dir", str(step), "--like", str(like), "--dst", str(tmp_path / "out")])
    loaded = AutoModelForCausalLM.from_pretrained(dst)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, trained[name]), name
    assert (dst / "tokenizer.json").is_file()

    wrong = dict(trained)
    wrong["model.embed_tokens.weight"] = wrong["model.embed_tokens.weight"][:, :3]
    torch.save({"module": wrong}, step / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="wrong shape"):
        export(["--step-dir", str(step), "--like", str(like), "--dst", str(tmp_path / "bad")])
    with pytest.raises(SystemExit, match="no DeepSpeed model states"):
        export(["--step-dir", str(tmp_path), "--like", str(like), "--dst", str(tmp_path / "none")])


def test_weight_soup_averages_with_weights_and_refuses_mismatched_models(tmp_path):
    from safetensors.torch import load_file, save_file

    soup = load_script("weight_soup").main
    folders = []
    for i, value in enumerate((1.0, 4.0)):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        save_file({"w": torch.full((2, 3), value), "b": torch.full((3,), value, dtype=torch.float16)},
                  str(folder / "model.safetensors"))
        (folder / "config.json").write_text(f'{{"i": {i}}}')
        folders.append(folder)
    soup(["--out", str(tmp_path / "even"), str(folders[0]), str(folders[1])])
    even = load_file(str(tmp_path / "even" / "model.safetensors"))
    assert torch.equal(even["w"], torch.full((2, 3), 2.5)) and even["b"].dtype == torch.float16
    assert (tmp_path / "even" / "config.json").read_text() == '{"i": 0}'  # the first source's files
    soup(["--out", str(tmp_path / "wise"), f"{folders[0]}:3", f"{folders[1]}:1"])
    assert torch.equal(load_file(str(tmp_path / "wise" / "model.safetensors"))["w"], torch.full((2, 3), 1.75))

    save_file({"w": torch.zeros(3, 2), "b": torch.zeros(3)}, str(folders[1] / "model.safetensors"))
    with pytest.raises(SystemExit, match="shape"):
        soup(["--out", str(tmp_path / "bad"), str(folders[0]), str(folders[1])])
    with pytest.raises(SystemExit, match="not a number"):
        soup(["--out", str(tmp_path / "bad"), f"{folders[0]}:x"])
    with pytest.raises(SystemExit, match="does not exist"):
        soup(["--out", str(tmp_path / "bad"), str(tmp_path / "nowhere")])


def test_scale_projector_scales_every_image_token_and_nothing_else(tmp_path):
    from transformers import AutoModelForCausalLM

    import ferret.model  # noqa: F401  (registers the Ferret classes with the Auto factories)

    scale = load_script("scale_projector").main
    model, tokenizer = build_tiny_model()
    model.save_pretrained(tmp_path / "src", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "src")
    dst = scale([str(tmp_path / "src"), "0.5", "--out", str(tmp_path / "half")])
    scaled = AutoModelForCausalLM.from_pretrained(dst)
    pixels = torch.randn(2, 3, model.config.vision_tower_config().image_size, model.config.vision_tower_config().image_size)
    with torch.no_grad():
        assert torch.allclose(scaled.encode_images(pixels)[1], 0.5 * model.encode_images(pixels)[1], atol=1e-6)
    before, after = model.state_dict(), scaled.state_dict()
    for key in ("model.mm_projector.weight", "model.mm_projector.bias"):
        assert torch.equal(after[key], 0.5 * before[key])
    assert all(torch.equal(before[k], after[k]) for k in before if "mm_projector" not in k)
    with pytest.raises(SystemExit, match="must be > 0"):
        scale([str(tmp_path / "src"), "0", "--out", str(tmp_path / "zero")])


def test_yes_no_readout_splits_absent_names_by_the_words_the_scene_has():
    probe = load_script("yes_no_readout")
    scene = {"objects": [{"color": "red", "shape": "circle"}, {"color": "blue", "shape": "square"}]}
    assert probe.absent_kind(scene, "red square") == "colour+shape"  # both words, on different objects
    assert probe.absent_kind(scene, "red star") == "colour"
    assert probe.absent_kind(scene, "green circle") == "shape"
    assert probe.absent_kind(scene, "green star") == "neither"
    asked = [(scene, "red circle", True), (scene, "red square", False), (scene, "green star", False),
             (scene, "red star", False)]
    says_yes = torch.tensor([True, True, False, False])
    readout_yes = torch.tensor([True, False, False, True])
    matched = torch.tensor([True, False, False, False])
    table = probe.no_by_absent_kind(asked, says_yes, readout_yes, matched)
    assert set(table) == {"colour+shape", "neither", "colour"}  # kinds with no question are left out
    assert table["colour+shape"] == {"questions": 1, "model_no": 0.0, "readout_no": 1.0, "token_match_no": 1.0}
    assert table["colour"] == {"questions": 1, "model_no": 1.0, "readout_no": 0.0, "token_match_no": 1.0}


def test_naming_errors_sorts_each_wrong_name_by_size_shape_and_kind():
    tool = load_script("naming_errors")
    scenes = [{"image": "images/s1.png", "width": 288, "height": 144, "objects": [
        {"name": "red star", "color": "red", "shape": "star", "size": "small", "box": [0, 0, 20, 10]},
        {"name": "blue ring", "color": "blue", "shape": "ring", "size": "large", "box": [0, 0, 80, 40]}]},
        {"image": "images/s2.png", "width": 144, "height": 144, "objects": [
            {"name": "red cross", "color": "red", "shape": "cross", "size": "small", "box": [10, 10, 24, 28]}]}]
    checks = {"accuracy": {c: 0.5 for c in tool.NAMING_CHECKS}, "wrong": [
        {"check": "refer_box", "image": "s1.png", "expected": "red star", "answer": "A red cross."},
        {"check": "refer_box", "image": "s2.png", "expected": "red cross", "answer": "A blue ring."},
        {"check": "refer_point", "image": "s1.png", "expected": "blue ring", "answer": "A green ring."},
        {"check": "refer_free_form", "image": "s1.png", "expected": "blue ring", "answer": "Blue."}]}
    result = tool.breakdown(checks, scenes)
    box = result["refer_box"]
    assert box["wrong"] == 2 and box["error_rate"]["size small"] == 1.0 and box["error_rate"]["size large"] == 0.0
    assert box["kinds"] == {"shape wrong, colour right": 1, "both wrong": 1}
    assert box["shape_swaps"] == {"star -> cross": 1, "cross -> ring": 1}
    # radii in the 144 px input: star min(10, 10) / 2 = 5, cross min(14, 18) / 2 = 7, ring min(40, 40) / 2 = 20
    assert box["objects"]["input radius 00-06 px"] == 1 and box["error_rate"]["input radius 00-06 px"] == 1.0
    assert box["error_rate"]["input radius 06-09 px"] == 1.0 and box["error_rate"]["input radius 15+ px"] == 0.0
    assert tool.input_radius_bin([0, 0, 30, 30], 144, 144) == "15+ px"
    # s1 is squashed 2x (288 x 144), s2 not at all
    assert box["objects"]["squash 1.75+x"] == 2 and box["error_rate"]["squash 1.75+x"] == 0.5
    assert box["error_rate"]["squash 1.00-1.25x"] == 1.0
    assert tool.squash_bin(160, 200) == "1.25-1.50x" and tool.squash_bin(300, 200) == "1.50-1.75x"
    # the star (radius 5, 2x squash) is thin, the ring (radius 20) is not, the cross sits on a square canvas
    assert box["objects"]["thin squash >= 1.5, radius < 9 px"] == 1
    assert box["error_rate"]["thin squash >= 1.5, radius < 9 px"] == 1.0
    assert box["error_rate"]["thin squash >= 1.5, radius >= 9 px"] == 0.0
    assert box["objects"]["thin squash < 1.5, radius < 9 px"] == 1
    assert result["refer_point"]["kinds"] == {"colour wrong, shape right": 1}
    assert result["refer_free_form"]["kinds"] == {"no colour-and-shape name": 1}
    # the star's box holds 1/16 of the ring's (too little to crowd it); the ring's box holds the whole star
    assert box["neighbours"] == {"a name not in the scene, alone in the box": 2}
    assert result["refer_point"]["neighbours"] == {"a name not in the scene, another object in the box": 1}
    ring, star = scenes[0]["objects"][1], scenes[0]["objects"][0]
    assert tool.neighbour_kind("blue ring", star, [ring]) == "another object's name, partly in the box"
    assert tool.neighbour_kind("red star", ring, [star]) == "another object's name, half or more in the box"
    assert tool.neighbour_kind("red star", {**ring, "box": [100, 100, 120, 120]}, [star]) == \
        "another object's name, outside the box"
    assert tool.neighbour_kind("red cross", ring, [star]) == "a name not in the scene, another object in the box"
    # no object above shares its colour with another of its scene; two red objects in one scene do
    assert box["objects"]["colour twin no"] == 3 and "colour twin yes" not in box["objects"]
    twins = [{"image": "images/t.png", "width": 144, "height": 144, "objects": [
        {**scenes[0]["objects"][0], "box": [0, 0, 20, 20]}, {**scenes[1]["objects"][0], "box": [100, 100, 124, 124]},
        {**scenes[0]["objects"][1], "box": [40, 40, 80, 80]}]}]
    twin_box = tool.breakdown({"accuracy": checks["accuracy"], "wrong": [
        {"check": "refer_box", "image": "t.png", "expected": "red star", "answer": "A red cross."}]}, twins)["refer_box"]
    assert twin_box["objects"]["colour twin yes"] == 2 and twin_box["error_rate"]["colour twin yes"] == 0.5
    assert twin_box["error_rate"]["colour twin no"] == 0.0
    assert twin_box["neighbours"] == {"another object's name, outside the box": 1}
    checks["wrong"].append({"check": "refer_box", "image": "s9.png", "expected": "red star", "answer": "No."})
    with pytest.raises(ValueError, match="wrong --scenes"):
        tool.breakdown(checks, scenes)


def test_compare_runs_reads_each_results_file_and_marks_missing_ones(tmp_path):
    row = load_script("compare_runs").row
    (tmp_path / "naming_errors").mkdir()
    (tmp_path / "run_direct_val200.json").write_text(json.dumps(
        {"accuracy": {"refer_box": 0.9, "refer_point": 0.8, "refer_free_form": 0.85, "yes_no_absent": 0.95, "yes_no_present": 0.97}}))
    (tmp_path / "run_grounding_val.json").write_text(json.dumps({"acc50": 0.96}))
    (tmp_path / "run_report_val200.json").write_text(json.dumps({"summary": {"lvis": {"acc_box": 0.94, "acc_point": 0.92}}}))
    (tmp_path / "naming_errors" / "run_ood.json").write_text(json.dumps({"refer_box": {"accuracy": 0.81}}))
    got = row("run", tmp_path)
    assert (got["name box"], got["name point"], got["No"], got["Yes"]) == (0.9, 0.8, 0.95, 0.97)
    assert (got["ground val"], got["LVIS box"], got["LVIS point"], got["ood name box"]) == (0.96, 0.94, 0.92, 0.81)
    assert got["ground ood"] is None and got["ood name point"] is None and got["tokens shape"] is None
    assert all(value is None for value in row("absent", tmp_path).values())


def test_binding_curve_averages_windows_skips_gaps_and_reads_a_running_run_first(tmp_path):
    module = load_script("binding_curve")
    rows = [{"step": 10, "attention_mass": 0.2}, {"step": 20, "attention_mass": 0.4},
            {"step": 30, "attention_mass": float("nan")}, {"step": 40}, {"step": 50, "attention_mass": 0.9}]
    assert module.curve(rows, 20, 80) == pytest.approx([0.3, None, 0.9, None])
    (tmp_path / "checkpoints" / "run").mkdir(parents=True)
    (tmp_path / "bench" / "probes" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "probes" / "results" / "run_metrics.jsonl").write_text('{"step": 10, "attention_mass": 0.1}\n')
    assert module.read_metrics("run", tmp_path) == [{"step": 10, "attention_mass": 0.1}]
    (tmp_path / "checkpoints" / "run" / "metrics.jsonl").write_text('{"step": 10, "attention_mass": 0.7}\n\n')
    assert module.read_metrics("run", tmp_path) == [{"step": 10, "attention_mass": 0.7}]
    assert module.read_metrics("absent", tmp_path) == []


def test_tower_probe_pools_worlds_and_scores_the_out_of_generator_set(tmp_path):
    from ferret.data.synthetic import SyntheticConfig, generate
    from ferret.eval.ood_scenes import generate_ood

    probe = load_script("tower_probe").main
    generate(str(tmp_path / "a"), n=60, seed=1, workers=1)
    generate(str(tmp_path / "b"), n=60, seed=2, workers=1, config=SyntheticConfig(max_rotation=45))
    generate_ood(tmp_path / "ood", n=3, seed=0)
    args = ["--image-size", "48", "--channels", "16,32", "--strides", "4,3", "--max-steps", "3", "--batch", "4",
            "--val-scenes", "4", "--threads", "1", "--eval-every", "100", "--ood", str(tmp_path / "ood")]
    pooled = probe(["--data", str(tmp_path / "a"), str(tmp_path / "b"), *args])
    assert pooled["final"]["step"] == 3 and pooled["final"]["objects"] > 0
    assert pooled["final_ood"]["objects"] == sum(len(s["objects"]) for s in json.loads((tmp_path / "ood" / "scenes_ood.json").read_text()))
    scored_on_b = probe(["--data", str(tmp_path / "a"), "--val-data", str(tmp_path / "b"), *args])
    b_val = json.loads((tmp_path / "b" / "scenes_val.json").read_text())[:4]
    assert scored_on_b["final"]["objects"] == sum(len(s["objects"]) for s in b_val)
    assert "final_ood" not in probe(["--data", str(tmp_path / "a"), *args[:-2]])
    padded = probe(["--data", str(tmp_path / "a"), "--pad", *args])
    assert padded["final"]["objects"] == pooled["final"]["objects"]


def test_tower_probe_pad_scene_keeps_the_aspect_ratio_and_moves_nothing():
    from PIL import Image

    from ferret.data.rle import decode_rle, encode_rle

    tool = load_script("tower_probe")
    mask = np.zeros((40, 100), dtype=bool)
    mask[10:20, 60:90] = True
    image = Image.new("RGB", (100, 40), (200, 10, 10))
    record = {"width": 100, "height": 40, "objects": [{"name": "red square", "box": [60, 10, 90, 20],
                                                        "mask": encode_rle(mask)}]}
    canvas, padded = tool.pad_scene(image, record)
    assert canvas.size == (100, 100) and (padded["width"], padded["height"]) == (100, 100)
    assert canvas.getpixel((50, 20)) == (200, 10, 10) and canvas.getpixel((50, 70)) != (200, 10, 10)
    square = decode_rle(padded["objects"][0]["mask"], (100, 100))
    assert square[:40].tolist() == mask.tolist() and not square[40:].any()
    assert padded["objects"][0]["box"] == [60, 10, 90, 20] and record["width"] == 100  # pixels do not move


def test_token_weight_splits_answers_by_turn_and_weighs_tokens_by_their_micro_batch():
    probe = load_script("token_weight")
    assert probe.answer_segments([-100, 5, 6, -100, -100, 7, -100, 8, 9, 10]) == [2, 1, 3]
    assert probe.answer_segments([-100, -100]) == []
    # Two micro-batches: a long caption alone with a short answer, then two short answers. By
    # tokens the caption has 8 of 12; by weight (1 / micro-batch tokens) 8/10 of one batch of two.
    weights = probe.task_weights([[{"caption": 8}, {"yes_no": 2}], [{"yes_no": 1}, {"yes_no": 1}]])
    assert weights["caption"]["token_share"] == pytest.approx(8 / 12)
    assert weights["caption"]["loss_weight_share"] == pytest.approx(0.8 / 2)
    assert weights["yes_no"]["loss_weight_share"] == pytest.approx((0.2 + 1.0) / 2)


def test_coordinate_attention_box_cells_are_the_cells_whose_centre_is_in_the_box():
    box_cells = load_script("coordinate_attention_probe").box_cells
    # a 200 x 100 image on a 4 x 4 grid: cell centres at x 25, 75, 125, 175 and y 12.5, 37.5, 62.5, 87.5
    cells = box_cells((60, 30, 130, 70), 200, 100, 4)
    assert cells.shape == (4, 4)
    assert cells.nonzero().tolist() == [[1, 1], [1, 2], [2, 1], [2, 2]]
    assert not box_cells((0, 0, 20, 10), 200, 100, 4).any()  # smaller than a cell, off its centre


def test_grow_decoder_appends_a_silent_layer(tmp_path):
    # bench/probes/grow_decoder.py (session 37): one more decoder layer that changes nothing until trained,
    # with its own cache index, saved and loaded back as a model of one more layer.
    from transformers import AutoModelForCausalLM

    import ferret.model  # noqa: F401  (registers the Ferret classes with the Auto factories)

    grow_decoder = load_script("grow_decoder")
    model, tokenizer = build_tiny_model()
    src, out = tmp_path / "src", tmp_path / "out"
    model.save_pretrained(src)
    tokenizer.save_pretrained(src)
    layers = model.config.num_hidden_layers
    grow_decoder.main(["--src", str(src), "--out", str(out)])
    grown = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert grown.config.num_hidden_layers == len(grown.model.layers) == layers + 1
    assert grown.model.layers[-1].self_attn.layer_idx == layers
    assert grown.model.layers[-1].self_attn.o_proj.weight.abs().sum() == 0
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids).logits, grown(input_ids=ids).logits)
        # a generation runs through the cache with the new layer's own index
        grown.generate(input_ids=ids, max_new_tokens=3, do_sample=False)


def test_region_position_probe_ridge_reads_a_linear_position_and_r2_scores_it():
    tool = load_script("region_position_probe")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 8))
    y = x[:, :2] @ np.array([[0.5, -0.2], [0.1, 0.3]]) + 0.4
    predicted = tool.ridge_fit_predict(x[:150], y[:150], x[150:], alpha=1e-6)
    assert np.allclose(predicted, y[150:], atol=1e-4) and tool.r2(predicted, y[150:]) > 0.999
    assert abs(tool.r2(np.repeat(y[150:].mean(0, keepdims=True), 50, 0), y[150:])) < 1e-9  # the mean explains nothing
