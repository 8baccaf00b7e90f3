"""End-to-end DeepSpeed training on CPU: 2 processes (gloo), tiny Ferret, synthetic GRIT data.

One module-scoped set of runs, each a few steps:
  zero2      6 steps, checkpoints every 2, HF export            (the reference curve)
  crashed    same config, rank 0 dies while staging checkpoint 4 (crashing_train.py checkpoint_staged)
  resumed    `--resume` of the crashed run                      -> must equal the reference curve
  mixed      zero2's run with train.precision=bf16-mixed
  zero3      ZeRO-3, rank 0 exits hard after step 3 (crashing_train.py after_step), then resumed
  lora       LoRA on the LLM (gradient checkpointing on), projector + sampler trained, merged HF export
  staged     1 step, then a second stage (config `stages`) of 3 on another world; against two launches,
             and crashed in its second stage then resumed
  souped     1 step, then a stage exporting the average of its start and two variants of 3 steps
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "train" / "ferret_train.py"
CRASHING = REPO / "tests" / "crashing_train.py"  # the same entry point with a crash callback
CONFIG = REPO / "train" / "configs" / "small.yaml"

pytest.importorskip("deepspeed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    from ferret.data.synthetic import generate
    from ferret.model.tiny import build_tiny_tokenizer

    generate(str(root / "synth"), n=24, seed=3, workers=1)
    build_tiny_tokenizer(save_dir=root / "tokenizer")
    return root


def train(workspace: Path, name: str, *overrides: str, crash: tuple[str, int] | None = None, resume: bool = False,
          expect_ok: bool = True, config: Path = CONFIG) -> subprocess.CompletedProcess:
    """A 2-process run; `crash` = (callback, step) kills rank 0 there (tests/crashing_train.py)."""
    out = workspace / name
    entry = [str(SCRIPT)] if crash is None else [str(CRASHING), crash[0], str(crash[1]), "--"]
    args = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
        *entry, "--config", str(config),
        f"data.data_path={workspace / 'synth' / 'train.json'}",
        f"model.tokenizer={workspace / 'tokenizer'}",
        f"train.output_dir={out}",
        "train.max_steps=6", "train.per_device_batch_size=2", "train.global_batch_size=8",
        "train.save_steps=2", "train.logging_steps=1", "train.learning_rate=2e-3", "train.warmup_steps=1",
        *overrides,
    ]
    if resume:
        args.insert(args.index("--config"), "--resume")
    run_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(args, cwd=REPO, env=run_env, capture_output=True, text=True, timeout=600)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"training run {name} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def tail(proc: subprocess.CompletedProcess) -> str:
    errors = [line for line in proc.stderr.splitlines() if "Error" in line or "error" in line][:20]
    return "\n".join(["stdout:", proc.stdout[-2000:], "errors:", *errors, "stderr:", proc.stderr[-3000:]])


def curve(out: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in records}


@pytest.fixture(scope="module")
def zero2(workspace):
    proc = train(workspace, "zero2")
    return workspace / "zero2", proc


def test_zero2_smoke_loss_goes_down_and_reports(zero2):
    out, proc = zero2
    metrics = curve(out)
    assert sorted(metrics) == [1, 2, 3, 4, 5, 6]
    losses = [metrics[s]["loss"] for s in range(1, 7)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.05, losses
    for record in metrics.values():
        assert record["grad_norm"] > 0 and record["samples_per_s"] > 0 and record["tokens_per_s"] > 0
    assert metrics[1]["lr"] == 0.0 and metrics[2]["lr"] == pytest.approx(2e-3)  # 1 warmup step, then cosine
    assert metrics[6]["lr"] < metrics[3]["lr"]
    # stdout: per-step lines, the ZeRO stage, the final summary
    assert "ZeRO-2" in proc.stdout and "step 6/6 loss" in proc.stdout and "[ferret_train] done: 6 steps" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_loss"] == pytest.approx(losses[-1])
    assert summary["checkpoint"].endswith("step-00000006")
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    # checkpoints every 2 steps, at most save_total_limit (3) kept, `latest` names the last one
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000006"
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == [
        "step-00000002", "step-00000004", "step-00000006"]


def test_bf16_mixed_keeps_fp32_weights_and_runs_the_matmuls_in_bf16(zero2, workspace):
    # train.precision=bf16-mixed (session 39's candidate recipe, bench/probes/configs/): zero2's run with
    # bf16 autocast around the forward and the losses. Its weights and export stay fp32; its losses
    # track the fp32 run's closely but not exactly (the matmuls did run in bf16).
    from safetensors.torch import load_file

    proc = train(workspace, "mixed", "train.precision=bf16-mixed", "train.save_steps=0")
    assert "bf16-mixed on cpu" in proc.stdout
    mixed, fp32 = curve(workspace / "mixed"), curve(zero2[0])
    assert sorted(mixed) == sorted(fp32) == [1, 2, 3, 4, 5, 6]
    for step in (1, 2, 6):
        assert mixed[step]["loss"] != fp32[step]["loss"]
        assert mixed[step]["loss"] == pytest.approx(fp32[step]["loss"], rel=0.05), (step, mixed[step], fp32[step])
    weights = load_file(str(next((workspace / "mixed" / "hf").glob("*.safetensors"))))
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float32}


def test_export_loads_with_load_pretrained(zero2, workspace):
    from ferret.model.builder import load_pretrained

    out, _ = zero2
    tokenizer, model, image_processor, context_len = load_pretrained(out / "hf", device="cpu")
    ds_state = torch.load(out / "checkpoints" / "step-00000006" / "mp_rank_00_model_states.pt",
                          map_location="cpu", weights_only=False)["module"]
    loaded = model.state_dict()
    assert set(ds_state) == set(loaded)
    for name, tensor in ds_state.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=name)
    assert tokenizer.convert_tokens_to_ids("<region_fea>") == model.config.im_region_fea_token
    assert image_processor is not None and context_len > 0
    # the trained weights differ from the initial ones (the run did train), the frozen tower does not
    from ferret.model.tiny import build_tiny_model

    init, _ = build_tiny_model(tokenizer, seed=0)
    init_state = init.state_dict()
    assert not torch.equal(init_state["model.mm_projector.weight"], loaded["model.mm_projector.weight"])
    assert not torch.equal(init_state["model.layers.0.self_attn.q_proj.weight"],
                           loaded["model.layers.0.self_attn.q_proj.weight"])
    tower = [n for n in init_state if n.startswith("model.vision_tower.")]
    assert tower and all(torch.equal(init_state[n], loaded[n]) for n in tower)


def test_crash_during_save_then_resume_reproduces_the_curve(zero2, workspace):
    reference = curve(zero2[0])
    crashed = train(workspace, "crashed", crash=("checkpoint_staged", 4), expect_ok=False)
    out = workspace / "crashed"
    assert crashed.returncode != 0
    # the step-4 save was staged but never published: `latest` still names step 2
    assert (out / "checkpoints" / "latest").is_file(), tail(crashed)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    assert (out / "checkpoints" / ".staging" / "step-00000004").is_dir()
    assert not (out / "checkpoints" / "step-00000004").exists()

    resumed = train(workspace, "crashed", resume=True)
    assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout
    got = curve(out)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 7):
        for key in ("loss", "grad_norm", "lr"):
            assert got[step][key] == pytest.approx(reference[step][key], rel=1e-6, abs=1e-9), (step, key)
    # and the final weights agree (bitwise in quiet runs; one run under heavy machine load was off
    # by float rounding in a sampler bias, so allow that much: a lost optimizer state is ~lr off)
    from safetensors.torch import load_file

    a, b = load_file(zero2[0] / "hf" / "model.safetensors"), load_file(out / "hf" / "model.safetensors")
    assert set(a) == set(b)
    for name in a:
        worst = (a[name] - b[name]).abs().max().item()
        assert worst <= 1e-6 + 1e-5 * a[name].abs().max().item(), (name, worst)


def test_zero3_hard_kill_resume_and_export(zero2, workspace):
    crashed = train(workspace, "zero3", "train.deepspeed=train/configs/ds_zero3.json",
                    crash=("after_step", 3), expect_ok=False)
    assert crashed.returncode != 0
    out = workspace / "zero3"
    assert (out / "checkpoints" / "latest").is_file(), tail(crashed)
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    resumed = train(workspace, "zero3", "train.deepspeed=train/configs/ds_zero3.json", resume=True)
    assert "ZeRO-3" in resumed.stdout
    got, reference = curve(out), curve(zero2[0])
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    losses = [got[s]["loss"] for s in range(1, 7)]
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.05, losses
    # same data, same math as ZeRO-2: only the reduction order differs
    for step in range(1, 7):
        assert got[step]["loss"] == pytest.approx(reference[step]["loss"], rel=1e-4), step

    from ferret.model.builder import load_pretrained

    _, model, _, _ = load_pretrained(out / "hf", device="cpu")
    ref_state = load_pretrained(zero2[0] / "hf", device="cpu")[1].state_dict()
    for name, tensor in model.state_dict().items():  # full (gathered) weights, close to ZeRO-2's
        assert tensor.shape == ref_state[name].shape and tensor.numel() > 0, name
        torch.testing.assert_close(tensor, ref_state[name], rtol=1e-3, atol=1e-4, msg=name)


def test_lora_run_trains_adapters_projector_and_sampler(workspace):
    # with gradient checkpointing on: LoRA freezes the embeddings, non-reentrant checkpointing copes
    proc = train(workspace, "lora", "lora.enable=true", "lora.r=4", "lora.alpha=8", "lora.dropout=0.0",
                 "model.gradient_checkpointing=true",
                 "train.max_steps=4", "train.save_steps=0", "train.learning_rate=5e-3")
    out = workspace / "lora"
    assert "trainable parameters" in proc.stdout and ", LoRA, gradient checkpointing" in proc.stdout
    losses = [curve(out)[s]["loss"] for s in range(1, 5)]
    assert losses[-1] < losses[0], losses

    from ferret.model.builder import load_pretrained
    from ferret.model.tiny import build_tiny_model

    tokenizer, model, _, _ = load_pretrained(out / "hf", device="cpu")
    trained = model.state_dict()
    assert not any("lora" in name for name in trained)
    init = build_tiny_model(tokenizer, seed=0)[0].state_dict()
    assert set(init) == set(trained)
    changed = {name for name in init if not torch.equal(init[name], trained[name])}
    # LoRA on decoder Linear layers (a rank <= 4 update), projector and sampler fully trained
    delta = trained["model.layers.0.self_attn.q_proj.weight"] - init["model.layers.0.self_attn.q_proj.weight"]
    assert delta.abs().max() > 0 and torch.linalg.matrix_rank(delta, atol=1e-6) <= 4
    assert "model.mm_projector.weight" in changed
    assert any(name.startswith("model.region_geo_sampler.") for name in changed)
    # everything else is frozen: embeddings, norms, lm_head, vision tower
    for name in changed:
        assert (name.startswith(("model.mm_projector.", "model.region_geo_sampler."))
                or (name.startswith("model.layers.") and "_proj." in name and "norm" not in name)), name


@pytest.fixture(scope="module")
def world_tokenizer(workspace) -> Path:
    """The readout needs each colour and shape name as one token, number smoothing each number 0-999:
    a tokenizer trained on the world, with number tokens as the embedded model's."""
    from ferret.data.build_tokenizer import build
    from ferret.data.synthetic import generate

    generate(str(workspace / "tokenizer_corpus"), n=300, seed=5, workers=1)  # every colour and shape
    build(str(workspace / "tokenizer_corpus"), str(workspace / "world_tokenizer"), vocab_size=600, number_tokens=True)
    return workspace / "world_tokenizer"


def test_dense_readout_run_logs_and_lowers_the_auxiliary_loss(workspace, world_tokenizer):
    # The synthetic world writes scenes_train.json; the readout loss reads the patch and region
    # targets from it through hooks, on both ranks, and the export stays the plain architecture.
    # Number smoothing reads every position's logits: the one loss that needs the LM head's full
    # output (train steps ask the model for the labelled positions' logits otherwise).
    proc = train(workspace, "dense", "train.dense_loss_weight=1.0", f"model.tokenizer={world_tokenizer}",
                 f"data.scene_records={workspace / 'synth' / 'scenes_train.json'}", "train.number_smoothing_weight=0.1",
                 "train.max_steps=6", "train.save_steps=0", "train.learning_rate=5e-3")
    out = workspace / "dense"
    metrics = curve(out)
    dense = [metrics[s]["dense_loss"] for s in range(1, 7)]
    assert all(d > 0 for d in dense) and "dense_loss" in proc.stdout
    assert sum(dense[-2:]) / 2 < sum(dense[:2]) / 2, dense

    from ferret.model.builder import load_pretrained
    from ferret.model.tiny import build_tiny_model

    tokenizer, model, _, _ = load_pretrained(out / "hf", device="cpu")
    assert set(model.state_dict()) == set(build_tiny_model(tokenizer, seed=0)[0].state_dict())


def test_vision_warm_up_trains_the_tower_alone_before_the_loop(workspace, world_tokenizer):
    # Stage 1 (train.vision_warmup_steps): tower + projector on the readout only, gradients
    # averaged over the 2 ranks; its loss falls, then the DeepSpeed loop runs as usual.
    proc = train(workspace, "warmup", "train.dense_loss_weight=1.0", f"model.tokenizer={world_tokenizer}",
                 f"data.scene_records={workspace / 'synth' / 'scenes_train.json'}", "train.vision_warmup_steps=12",
                 "train.vision_warmup_learning_rate=5e-3", "train.max_steps=2", "train.save_steps=0")
    line = next(l for l in proc.stdout.splitlines() if "vision warm-up done" in l)
    first, last = (float(v) for v in line.split("readout loss ")[1].split(" (")[0].split(" -> "))
    assert last < first, line
    assert "step 2/2" in proc.stdout
    # a resumed run does not warm up again: the tower's state is in the checkpoint
    again = train(workspace, "warmup", "train.dense_loss_weight=1.0", f"model.tokenizer={world_tokenizer}",
                  f"data.scene_records={workspace / 'synth' / 'scenes_train.json'}", "train.vision_warmup_steps=12",
                  "train.max_steps=3", "train.save_steps=0", resume=True)
    assert "vision warm-up" not in again.stdout and "resumed from" in again.stdout


def test_a_launch_after_its_warm_up_trains_as_a_launch_from_the_warm_ups_export(workspace, world_tokenizer):
    # The embedded recipe warms up and trains the LLM in one launch; its probes start LLM stages
    # from the warm-up's export. Both must train alike, bit for bit: the warm-up's last gradients
    # once leaked into the first LLM step and moved the whole run (session 27).
    world = (f"model.tokenizer={world_tokenizer}", "train.dense_loss_weight=1.0",
             f"data.scene_records={workspace / 'synth' / 'scenes_train.json'}", "train.vision_warmup_steps=8",
             "train.vision_warmup_learning_rate=5e-3", "train.save_steps=0")
    train(workspace, "warm_one_launch", *world, "train.max_steps=3")
    # the warm-up alone: one LLM step at learning rate 0 (the linear warm-up starts there) exports it
    train(workspace, "warm_export", *world, "train.max_steps=1")
    assert curve(workspace / "warm_export")[1]["lr"] == 0.0
    train(workspace, "warm_from_export", *world[:3], f"model.pretrained={workspace / 'warm_export' / 'hf'}",
          "model.tiny=false", "train.max_steps=3", "train.save_steps=0")
    one, two = curve(workspace / "warm_one_launch"), curve(workspace / "warm_from_export")
    assert sorted(one) == sorted(two) == [1, 2, 3]
    for step in one:
        for key in ("loss", "grad_norm", "dense_loss"):
            assert one[step][key] == two[step][key], (step, key, one[step][key], two[step][key])

    # Killed after LLM step 1, before its first save (every 2 steps): the warm-up was saved as
    # step 0, so `--resume` does not warm up again and lands on the uninterrupted curve.
    saving = (*world[:-1], "train.save_steps=2", "train.max_steps=3")
    killed = train(workspace, "warm_killed", *saving, crash=("after_step", 1), expect_ok=False)
    assert killed.returncode != 0
    assert (workspace / "warm_killed" / "checkpoints" / "latest").read_text().strip() == "step-00000000"
    again = train(workspace, "warm_killed", *saving, resume=True)
    assert "vision warm-up" not in again.stdout and "step-00000000 at step 0" in again.stdout, again.stdout[-2000:]
    three = curve(workspace / "warm_killed")
    for step in one:
        for key in ("loss", "grad_norm", "dense_loss"):
            assert one[step][key] == three[step][key], (step, key, one[step][key], three[step][key])


def test_dense_readout_config_errors_name_the_key(workspace):
    proc = train(workspace, "dense_bad", "train.dense_loss_weight=1.0",
                 f"data.scene_records={workspace / 'missing_scenes.json'}", expect_ok=False)
    # each rank exits 2 with one line naming the key (torchrun itself then exits 1)
    assert proc.returncode != 0 and "ferret_train: error: data.scene_records: file" in proc.stderr
    # the generic tiny tokenizer splits "red" in two: the readout cannot find its word embedding
    proc = train(workspace, "dense_split_names", "train.dense_loss_weight=1.0",
                 f"data.scene_records={workspace / 'synth' / 'scenes_train.json'}", expect_ok=False)
    assert proc.returncode != 0 and "train.dense_loss_weight: the readout needs 'red' to be one token" in proc.stderr


@pytest.fixture(scope="module")
def staged(workspace):
    """small.yaml + a stage `second`: 3 more steps on another world at another learning rate."""
    import yaml

    from ferret.data.synthetic import generate

    generate(str(workspace / "synth_second"), n=24, seed=4, workers=1)
    second = {"data.data_path": [str(workspace / "synth_second" / "train.json")], "train.max_steps": 3,
              "train.learning_rate": 5.0e-4, "train.warmup_steps": 0, "train.save_steps": 1}
    config = yaml.safe_load(CONFIG.read_text())
    config["stages"] = [{"name": "second", "overrides": second}]
    path = workspace / "staged.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = train(workspace, "staged", "train.max_steps=1", config=path)
    return path, second, proc


def test_stages_run_in_one_launch_as_two_launches_would(staged, workspace):
    config, second, proc = staged
    out = workspace / "staged"
    assert "[ferret_train] done: 1 steps" in proc.stdout and "[ferret_train] done: 3 steps" in proc.stdout
    assert sorted(curve(out)) == [1] and sorted(curve(out / "second")) == [1, 2, 3]
    written = json.loads((out / "second" / "config.json").read_text())
    assert written["model"]["pretrained"] == str(out / "hf") and written["stages"] == []
    assert json.loads((out / "config.json").read_text())["stages"][0]["name"] == "second"
    # the same stage launched on its own from the first stage's export: the same curve, bit for bit
    alone = train(workspace, "second_alone", f"model.pretrained={out / 'hf'}", "model.tiny=false",
                  *(f"{key}={json.dumps(value) if isinstance(value, list) else value}" for key, value in second.items()))
    assert "done: 3 steps" in alone.stdout
    reference = curve(workspace / "second_alone")
    for step, record in curve(out / "second").items():
        for key in ("loss", "lr", "grad_norm"):
            assert record[key] == reference[step][key], (step, key)

    from ferret.model.builder import load_pretrained

    _, model, _, _ = load_pretrained(out / "second" / "hf", device="cpu")
    _, first, _, _ = load_pretrained(out / "hf", device="cpu")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(model.state_dict()[name], first.state_dict()[name])  # the second stage trained


def test_a_crash_in_the_second_stage_resumes_there(staged, workspace):
    config, _, _ = staged
    reference = curve(workspace / "staged" / "second")
    # the second stage saves every step; rank 0 dies after its step 2 (the first stage has 1 step)
    crashed = train(workspace, "staged_crash", "train.max_steps=1", config=config, crash=("after_step", 2),
                    expect_ok=False)
    assert crashed.returncode != 0 and "done: 1 steps" in crashed.stdout and "done: 3 steps" not in crashed.stdout
    out = workspace / "staged_crash"
    assert not (out / "second" / "hf").exists()
    first_export = (out / "hf" / "model.safetensors").read_bytes()
    first_summary = (out / "summary.json").read_text()
    resumed = train(workspace, "staged_crash", "train.max_steps=1", config=config, resume=True)
    # the first stage is finished (it only exports again, the same weights); the second goes on
    # from its own last checkpoint and ends as the launch that never crashed
    assert "at step 1 (epoch" in resumed.stdout and "at step 2 (epoch" in resumed.stdout
    assert (out / "hf" / "model.safetensors").read_bytes() == first_export
    # ... and keeps the summary of the launch that trained it (its loss and speed)
    assert "already done: 1 steps" in resumed.stdout and (out / "summary.json").read_text() == first_summary
    assert json.loads(first_summary)["final_loss"] > 0
    again = curve(out / "second")
    assert sorted(again) == [1, 2, 3]
    for step in (1, 2, 3):
        assert again[step]["loss"] == reference[step]["loss"], step
    assert (out / "second" / "hf" / "model.safetensors").read_bytes() == (
        workspace / "staged" / "second" / "hf" / "model.safetensors").read_bytes()


def test_an_averaged_stage_trains_each_variant_from_the_same_export_and_ships_the_average(workspace):
    import yaml
    from safetensors.torch import load_file

    config = yaml.safe_load(CONFIG.read_text())
    config["stages"] = [{"name": "mix", "overrides": {"train.max_steps": 3},
                         "soup": [{"train.learning_rate": 5.0e-4}, {"train.learning_rate": 2.0e-3}], "start_weight": 2}]
    path = workspace / "souped.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = train(workspace, "souped", "train.max_steps=1", config=path)
    out = workspace / "souped"
    assert f"[ferret_train] weight average of {out / 'hf'} (2), {out / 'mix' / 'mix-0' / 'hf'} (1)" in proc.stdout
    low, high = curve(out / "mix" / "mix-0"), curve(out / "mix" / "mix-1")
    assert sorted(low) == sorted(high) == [1, 2, 3]
    # both start from the first stage's export: the same first losses (step 1 is warm-up at lr 0);
    # then their learning rates part them
    assert low[1]["loss"] == high[1]["loss"] and low[2]["loss"] == high[2]["loss"]
    assert (low[2]["lr"], high[2]["lr"]) == (5.0e-4, 2.0e-3) and low[3]["loss"] != high[3]["loss"]
    for variant in ("mix-0", "mix-1"):
        written = json.loads((out / "mix" / variant / "config.json").read_text())
        assert written["model"]["pretrained"] == str(out / "hf")
    a = load_file(str(out / "mix" / "mix-0" / "hf" / "model.safetensors"))
    b = load_file(str(out / "mix" / "mix-1" / "hf" / "model.safetensors"))
    start = load_file(str(out / "hf" / "model.safetensors"))
    soup = load_file(str(out / "mix" / "hf" / "model.safetensors"))
    assert soup.keys() == a.keys()
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(a[name], b[name]) and not torch.equal(a[name], start[name])
    for key in soup:  # start_weight 2, each variant 1
        expected = (2 * start[key].double() + a[key].double() + b[key].double()) / 4
        assert torch.equal(soup[key], expected.to(a[key].dtype)), key
    assert (out / "mix" / "hf" / "config.json").read_text() == (out / "mix" / "mix-0" / "hf" / "config.json").read_text()
