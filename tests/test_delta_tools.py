"""apply_delta / make_delta / consolidate on tiny checkpoints: exact round trip, vocabulary growth, CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ferret.model import FerretLlamaForCausalLM
from ferret.model.apply_delta import main as apply_main
from ferret.model.checkpoint_io import load_state_dict, run_cli
from ferret.model.consolidate import main as consolidate_main
from ferret.model.make_delta import main as make_main
from ferret.model.tiny import build_tiny_model


@pytest.fixture(scope="module")
def folders(tiny_tokenizer, tmp_path_factory):
    """A tiny Ferret target (vocab V) and its 'Vicuna' base (vocab V-1, LLaMA weights slightly different)."""
    root = tmp_path_factory.mktemp("delta")
    target, tokenizer = build_tiny_model(tiny_tokenizer, seed=7, feature_layout="official")
    target.save_pretrained(root / "target")
    tokenizer.save_pretrained(root / "target")

    cfg = target.config
    base_config = LlamaConfig(
        vocab_size=cfg.vocab_size - 1, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings,
    )
    base = LlamaForCausalLM(base_config)
    generator = torch.Generator().manual_seed(0)
    target_state = target.state_dict()
    with torch.no_grad():
        for name, tensor in base.state_dict().items():
            source = target_state[name][: tensor.shape[0]] if name in ("model.embed_tokens.weight", "lm_head.weight") \
                else target_state[name]
            # "fine-tuning" moved every weight a little: the base is the target minus an update
            tensor.copy_(source - 0.01 * torch.randn(source.shape, generator=generator))
    # The released Vicuna layout: sharded .bin + index, plus an old rotary buffer.
    base_dir = root / "base"
    base_dir.mkdir()
    state = dict(base.state_dict())
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    names = list(state)
    half = len(names) // 2
    shards = {"pytorch_model-00001-of-00002.bin": names[:half], "pytorch_model-00002-of-00002.bin": names[half:]}
    for file, keys in shards.items():
        torch.save({k: state[k] for k in keys}, base_dir / file)
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (base_dir / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    base_config.save_pretrained(base_dir)
    return root


def test_make_then_apply_restores_the_target_exactly(folders):
    root = folders
    assert run_cli(make_main, ["--base", str(root / "base"), "--target", str(root / "target"),
                               "--delta", str(root / "delta")]) == 0
    assert run_cli(apply_main, ["--base", str(root / "base"), "--target", str(root / "restored"),
                                "--delta", str(root / "delta")]) == 0
    target = load_state_dict(root / "target")
    restored = load_state_dict(root / "restored")
    assert set(restored) == set(target)
    unequal = [name for name in target if not torch.equal(target[name], restored[name])]
    assert unequal == []
    assert all(t.dtype == torch.float64 for t in load_state_dict(root / "delta").values())  # one step wider
    # The restored folder is a loadable Ferret checkpoint with config and tokenizer.
    model, info = FerretLlamaForCausalLM.from_pretrained(root / "restored", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (root / "restored" / "tokenizer.json").is_file()


def test_delta_content_follows_the_released_rule(folders):
    root = folders
    if not (root / "delta").exists():
        run_cli(make_main, ["--base", str(root / "base"), "--target", str(root / "target"), "--delta", str(root / "delta")])
    base, target, delta = (load_state_dict(root / n) for n in ("base", "target", "delta"))
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" not in base  # stale buffer dropped on read
    rows = base["model.embed_tokens.weight"].shape[0]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert delta[name].shape[0] == rows + 1
        torch.testing.assert_close(delta[name][:rows].float(), target[name][:rows] - base[name], atol=1e-6, rtol=0)
        assert torch.equal(delta[name][rows:].float(), target[name][rows:])  # the <region_fea> row is kept raw
    name = "model.layers.1.mlp.up_proj.weight"
    torch.testing.assert_close(delta[name].float(), target[name] - base[name], atol=1e-6, rtol=0)
    for name in target:
        if name.startswith(("model.vision_tower.", "model.mm_projector.", "model.region_geo_sampler.")):
            assert torch.equal(delta[name].float(), target[name])


def test_same_precision_delta_is_exact_where_representable(folders, tmp_path):
    """A released-style delta (same dtype as the target): exact almost everywhere, else within an ulp."""
    root = folders
    assert run_cli(make_main, ["--base", str(root / "base"), "--target", str(root / "target"),
                               "--delta", str(tmp_path / "d32"), "--delta-dtype", "float32"]) == 0
    assert run_cli(apply_main, ["--base", str(root / "base"), "--target", str(tmp_path / "r32"),
                                "--delta", str(tmp_path / "d32")]) == 0
    target, restored = load_state_dict(root / "target"), load_state_dict(tmp_path / "r32")
    total = sum(t.numel() for t in target.values())
    exact = sum(int((target[n] == restored[n]).sum()) for n in target)
    assert exact / total > 0.9
    for name in target:
        torch.testing.assert_close(restored[name], target[name], atol=1e-8, rtol=2.5e-7)
        if name.startswith(("model.vision_tower.", "model.mm_projector.", "model.region_geo_sampler.")):
            assert torch.equal(restored[name], target[name])


def test_consolidate_checks_against_the_config(folders, tmp_path):
    root = folders
    assert run_cli(consolidate_main, ["--src", str(root / "target"), "--dst", str(tmp_path / "c"), "--dtype", "float16"]) == 0
    out = load_state_dict(tmp_path / "c")
    assert all(t.dtype == torch.float16 for t in out.values())
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert config["dtype"] == "float16"  # the config names the stored dtype
    # A checkpoint whose weights don't match its config is refused.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((root / "target" / "config.json").read_text())
    state = load_state_dict(root / "target")
    del state["model.mm_projector.bias"]
    torch.save(state, broken / "pytorch_model.bin")
    assert run_cli(consolidate_main, ["--src", str(broken), "--dst", str(tmp_path / "c2")]) == 2


def test_user_errors_are_one_line_exit_2(folders, tmp_path, capsys):
    root = folders
    cases = [
        (apply_main, ["--base", str(tmp_path / "nope"), "--target", str(tmp_path / "t"), "--delta", str(root / "target")],
         "base folder"),
        (apply_main, ["--base", str(root / "base"), "--target", str(root / "target"), "--delta", str(root / "target")],
         "already exists"),
        (apply_main, ["--base", str(tmp_path), "--target", str(tmp_path / "t2"), "--delta", str(root / "target")],
         "no weights"),
        (make_main, ["--base", str(root / "base"), "--target", str(tmp_path / "missing"), "--delta", str(tmp_path / "d")],
         "target folder"),
    ]
    for main, argv, message in cases:
        assert run_cli(main, argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_base_of_the_wrong_shape_is_refused(folders, tmp_path, capsys):
    root = folders
    wrong = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4))
    wrong.save_pretrained(tmp_path / "wrong")
    code = run_cli(apply_main, ["--base", str(tmp_path / "wrong"), "--target", str(tmp_path / "out"),
                                "--delta", str(root / "target")])
    err = capsys.readouterr().err
    assert code == 2 and "does not fit" in err and "Vicuna" in err


def test_cli_process_reports_errors_without_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ferret.model.apply_delta", "--base", str(tmp_path / "a"), "--target",
         str(tmp_path / "b"), "--delta", str(tmp_path / "c")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: base folder")
