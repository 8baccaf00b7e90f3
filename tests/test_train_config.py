"""Typed training config: file + overrides -> dataclasses; every bad key is named in one line."""

import sys
from pathlib import Path

import pytest

from ferret.training.config import (
    TrainConfig,
    TrainConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_train_config,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "train" / "configs"


def minimal() -> dict:
    return {"model": {"tiny": True}, "data": {"data_path": ["a.json"]}}


def test_minimal_dict_gets_defaults():
    cfg = config_from_dict(minimal())
    assert cfg.model.tiny and cfg.model.pretrained is None
    assert cfg.train.learning_rate == 2e-5 and cfg.train.lr_scheduler == "cosine"
    assert cfg.lora.enable is False


def test_unknown_key_is_named():
    data = minimal()
    data["train"] = {"lr": 1e-3}
    with pytest.raises(TrainConfigError, match=r"^train\.lr: unknown config key") as err:
        config_from_dict(data)
    assert "\n" not in str(err.value)


def test_unknown_section_is_named():
    data = minimal()
    data["optim"] = {}
    with pytest.raises(TrainConfigError, match=r"^optim: unknown config section"):
        config_from_dict(data)


@pytest.mark.parametrize(
    "section,key,value,pattern",
    [
        ("train", "per_device_batch_size", "8", r"train\.per_device_batch_size: expected an integer"),
        ("train", "per_device_batch_size", 2.5, r"train\.per_device_batch_size: expected an integer"),
        ("train", "tensorboard", "yes", r"train\.tensorboard: expected true/false"),
        ("train", "lr_scheduler", "linear", r"train\.lr_scheduler: 'linear' is not one of"),
        ("data", "data_multiple", [1, "x"], r"data\.data_multiple\[1\]: expected a number"),
        ("data", "data_path", "a.json", r"data\.data_path: expected a list"),
        ("lora", "r", True, r"lora\.r: expected an integer"),
    ],
)
def test_ill_typed_values_are_named(section, key, value, pattern):
    data = minimal()
    data.setdefault(section, {})[key] = value
    with pytest.raises(TrainConfigError, match=pattern):
        config_from_dict(data)


def test_yaml_style_float_strings_are_numbers():
    data = minimal()
    data["train"] = {"learning_rate": "2e-5"}  # yaml 1.1 reads 2e-5 as a string
    assert config_from_dict(data).train.learning_rate == pytest.approx(2e-5)


@pytest.mark.parametrize(
    "patch,pattern",
    [
        ({"model": {"tiny": True, "pretrained": "x"}}, r"model\.pretrained / model\.base_llm / model\.tiny"),
        ({"model": {}}, r"model\.pretrained / model\.base_llm / model\.tiny"),
        ({"model": {"base_llm": "vicuna"}}, r"model\.vision_tower: a CLIP folder"),
        ({"model": {"tiny": True, "mm_projector": "p.bin"}}, r"model\.mm_projector: only used with"),
        ({"data": {"data_path": []}}, r"data\.data_path"),
        ({"data": {"data_path": ["a", "b"], "image_folder": ["x"]}}, r"data\.image_folder: 1 folders for 2"),
        ({"data": {"data_path": ["a"], "data_multiple": [1.0, 2.0]}}, r"data\.data_multiple: 2 values for 1"),
        ({"train": {"warmup_ratio": 1.5}}, r"train\.warmup_ratio"),
        ({"train": {"learning_rate": 0}}, r"train\.learning_rate: must be > 0"),
        ({"lora": {"dropout": 1.0}}, r"lora\.dropout"),
    ],
)
def test_inconsistent_values_are_named(patch, pattern):
    data = minimal()
    for section, values in patch.items():
        data[section] = values
    with pytest.raises(TrainConfigError, match=pattern):
        config_from_dict(data)


def test_overrides_parse_by_type():
    cfg = config_from_dict(minimal())
    cfg = apply_overrides(cfg, [
        "train.learning_rate=1e-4", "train.max_steps=7", "lora.enable=true",
        "data.data_multiple=[3, 0.2]", "data.data_path=a.json,b.json", "train.global_batch_size=none",
        "model.tiny_overrides={\"num_hidden_layers\": 1}",
    ])
    assert cfg.train.learning_rate == pytest.approx(1e-4)
    assert cfg.train.max_steps == 7 and cfg.lora.enable is True
    assert cfg.data.data_multiple == [3.0, 0.2] and cfg.data.data_path == ["a.json", "b.json"]
    assert cfg.train.global_batch_size is None
    assert cfg.model.tiny_overrides == {"num_hidden_layers": 1}


@pytest.mark.parametrize(
    "override,pattern",
    [
        ("train.lr=1", r"^train\.lr: unknown config key"),
        ("trainer.seed=1", r"^trainer\.seed: unknown config section"),
        ("train.max_steps=ten", r"^train\.max_steps: expected an integer"),
        ("max_steps", r"must look like section\.key=value"),
    ],
)
def test_bad_overrides_are_named(override, pattern):
    with pytest.raises(TrainConfigError, match=pattern):
        apply_overrides(config_from_dict(minimal()), [override])


def test_global_batch_derives_accumulation():
    cfg = config_from_dict({**minimal(), "train": {"per_device_batch_size": 16, "global_batch_size": 128}})
    assert cfg.accumulation_steps(8) == 1
    assert cfg.accumulation_steps(2) == 4
    with pytest.raises(TrainConfigError, match=r"train\.global_batch_size: 128 is not a multiple"):
        cfg.accumulation_steps(3)


def test_missing_and_unparsable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="training config not found"):
        load_train_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(TrainConfigError, match="cannot parse config"):
        load_train_config(bad)


@pytest.mark.parametrize("name", ["small.yaml", "ferret_7b.yaml", "ferret_13b.yaml"])
def test_shipped_configs_validate(name):
    cfg = load_train_config(CONFIGS / name)
    assert isinstance(cfg, TrainConfig)
    assert (REPO / cfg.train.deepspeed).is_file()


@pytest.mark.parametrize("name", ["ferret_7b.yaml", "ferret_13b.yaml"])
def test_released_recipe(name):
    """7B/13B: global batch 128, lr 2e-5, 3 epochs, 2048 tokens, warmup 0.03, cosine, no decay, the mix."""
    cfg = load_train_config(CONFIGS / name)
    t, d = cfg.train, cfg.data
    assert t.global_batch_size == 128 and cfg.accumulation_steps(8) * t.per_device_batch_size * 8 == 128
    assert (t.learning_rate, t.num_train_epochs, t.warmup_ratio, t.weight_decay) == (2e-5, 3.0, 0.03, 0.0)
    assert t.lr_scheduler == "cosine" and d.model_max_length == 2048
    assert cfg.model.gradient_checkpointing and cfg.model.freeze_vision_tower and not cfg.lora.enable
    assert d.point_input_sample == "segment_mask|center"
    mix = dict(zip((Path(p).name for p in d.data_path), d.data_multiple))
    assert mix == {
        "git_instruction.json": 3.0, "vg_objects.json": 1.0, "vg_relations.json": 0.2, "vg_regions.json": 0.2,
        "grounded_llava_boxes_detail.json": 1.0, "grounded_llava_boxes_complex_reasoning.json": 1.0,
        "grounded_llava_boxes_conversation.json": 1.0, "refexp_all.json": 1.0, "flickr.json": 1.0,
        "objects365.json": 1.0,
    }


def test_cli_reports_a_bad_key_in_one_line():
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, str(REPO / "train" / "ferret_train.py"), "--config", str(CONFIGS / "small.yaml"),
         "train.lr=1e-3"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("ferret_train: error: train.lr: unknown config key"), proc.stderr
    assert "Traceback" not in proc.stderr


def staged(*stages) -> dict:
    data = minimal()
    data["train"] = {"output_dir": "out/run", "learning_rate": 1e-3, "max_steps": 100}
    data["stages"] = list(stages)
    return data


def test_stages_chain_each_from_the_export_before_it():
    cfg = config_from_dict(staged(
        {"name": "small", "overrides": {"data.data_path": ["small.json"], "train.learning_rate": "3e-4"}},
        {"name": "last", "overrides": {"train.max_steps": 5}}))
    first, small, last = cfg.stage_configs()
    assert first is cfg and first.model.tiny and first.train.output_dir == "out/run"
    assert small.stages == [] and last.stages == []
    # a stage is the one before plus its overrides, from the model that one exported
    assert small.model.pretrained == str(Path("out/run/hf")) and not small.model.tiny
    assert small.train.output_dir == str(Path("out/run/small"))
    assert small.data.data_path == ["small.json"] and small.train.learning_rate == 3e-4
    assert small.train.max_steps == 100
    assert last.model.pretrained == str(Path("out/run/small/hf"))
    assert last.train.output_dir == str(Path("out/run/last"))
    assert last.data.data_path == ["small.json"] and last.train.learning_rate == 3e-4 and last.train.max_steps == 5


def test_stages_survive_the_round_trip_through_config_json():
    cfg = config_from_dict(staged({"name": "small", "overrides": {"train.max_steps": 5}}))
    again = config_from_dict(config_to_dict(cfg))
    assert again == cfg and [c.train.output_dir for c in again.stage_configs()] == ["out/run", str(Path("out/run/small"))]
    # command-line overrides apply to the first stage and so to every later one
    moved = apply_overrides(cfg, ["train.output_dir=elsewhere", "train.seed=7"])
    assert [(c.train.output_dir, c.train.seed) for c in moved.stage_configs()] == [
        ("elsewhere", 7), (str(Path("elsewhere/small")), 7)]


def test_a_soup_stage_trains_its_variants_from_one_start_then_averages_them():
    from ferret.training.config import WeightAverage

    cfg = config_from_dict(staged(
        {"name": "mix", "overrides": {"train.max_steps": 5},
         "soup": [{"data.data_path": ["narrow.json"]}, {"data.data_path": ["wide.json"], "train.learning_rate": 2e-4}]},
        {"name": "last", "overrides": {"train.max_steps": 2}}))
    first, narrow, wide, average, last = cfg.launch_steps()
    assert first is cfg
    # each variant: the stage before + the stage's overrides + its own, from the same export
    assert narrow.model.pretrained == wide.model.pretrained == str(Path("out/run/hf"))
    assert narrow.train.output_dir == str(Path("out/run/mix/mix-0")) and wide.train.output_dir == str(Path("out/run/mix/mix-1"))
    assert narrow.data.data_path == ["narrow.json"] and wide.data.data_path == ["wide.json"]
    assert (narrow.train.max_steps, wide.train.max_steps) == (5, 5)
    assert (narrow.train.learning_rate, wide.train.learning_rate) == (1e-3, 2e-4)
    assert average == WeightAverage(((str(Path("out/run/mix/mix-0/hf")), 1.0), (str(Path("out/run/mix/mix-1/hf")), 1.0)),
                                    str(Path("out/run/mix")))
    # the next stage starts from the average, on the stage's common config (no variant's overrides)
    assert last.model.pretrained == str(Path("out/run/mix/hf")) and last.train.output_dir == str(Path("out/run/last"))
    assert last.data.data_path == minimal()["data"]["data_path"] and last.train.learning_rate == 1e-3
    assert last.train.max_steps == 2
    assert cfg.stage_configs() == [first, narrow, wide, last]
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_a_start_weight_averages_the_stage_with_the_model_it_started_from():
    from ferret.training.config import WeightAverage

    cfg = config_from_dict(staged({"name": "wise", "overrides": {"train.max_steps": 5}, "start_weight": 1}))
    first, trained, average = cfg.launch_steps()
    assert trained.model.pretrained == str(Path("out/run/hf")) and trained.train.output_dir == str(Path("out/run/wise/wise-0"))
    assert trained.train.max_steps == 5
    assert average == WeightAverage(((str(Path("out/run/hf")), 1.0), (str(Path("out/run/wise/wise-0/hf")), 1.0)),
                                    str(Path("out/run/wise")))
    assert config_from_dict(config_to_dict(cfg)) == cfg
    # without it (and without a soup) a stage is trained in its own folder, as before
    assert [c.train.output_dir for c in config_from_dict(staged({"name": "plain"})).launch_steps()] == [
        "out/run", str(Path("out/run/plain"))]


@pytest.mark.parametrize(
    "stage,pattern",
    [
        ({"name": "s", "start_weight": -1}, r"^stages\[0\] \(s\): start_weight: -1.0 is not a weight >= 0"),
        ({"name": "s", "start_weight": "half"}, r"^stages\[0\]: expected \{name: str, overrides"),
        ({"name": "s", "start_weight": True}, r"^stages\[0\]: expected \{name: str, overrides"),
        ({"name": "s", "soup": [{"train.max_steps": 3}]}, r"^stages\[0\] \(s\): soup: a soup needs two variants"),
        ({"name": "s", "soup": [{}, {"train.output_dir": "x"}]}, r"^stages\[0\] \(s\): soup\[1\]: train\.output_dir: set by the stage"),
        ({"name": "s", "soup": [{}, {"train.max_steps": "many"}]}, r"^stages\[0\] \(s\): soup\[1\]: train\.max_steps: expected an integer"),
        ({"name": "s", "soup": {"a": 1}}, r"^stages\[0\]: expected \{name: str, overrides"),
        ({"name": "s", "soup": ["train.max_steps=3", {}]}, r"^stages\[0\]: expected \{name: str, overrides"),
    ],
)
def test_bad_soups_are_named(stage, pattern):
    with pytest.raises(TrainConfigError, match=pattern) as err:
        config_from_dict(staged(stage))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "stage,pattern",
    [
        ({"name": "s", "overrides": {"train.lr": 1}}, r"^stages\[0\] \(s\): train\.lr: unknown config key"),
        ({"name": "s", "overrides": {"train.max_steps": "many"}}, r"^stages\[0\] \(s\): train\.max_steps: expected an integer"),
        ({"name": "s", "overrides": {"train.learning_rate": -1.0}}, r"^stages\[0\] \(s\): train\.learning_rate"),
        ({"name": "s", "overrides": {"model.pretrained": "x"}}, r"^stages\[0\] \(s\): model\.pretrained: set by the stage"),
        ({"name": "s", "overrides": {"train.output_dir": "x"}}, r"^stages\[0\] \(s\): train\.output_dir: set by the stage"),
        ({"name": "s", "overrides": {"steps": 3}}, r"^stages\[0\] \(s\): steps: a key must look like section\.key"),
        ({"name": "hf"}, r"^stages\[0\] \(hf\): a stage needs its own folder name"),
        ({"name": "../up"}, r"^stages\[0\] \(\.\./up\): a stage needs its own folder name"),
        ({"overrides": {}}, r"^stages\[0\]: expected \{name: str, overrides"),
        ({"name": "s", "steps": 3}, r"^stages\[0\]: expected \{name: str, overrides"),
    ],
)
def test_bad_stages_are_named(stage, pattern):
    with pytest.raises(TrainConfigError, match=pattern) as err:
        config_from_dict(staged(stage))
    assert "\n" not in str(err.value)


def test_stage_names_are_unique_and_need_the_export_before_them():
    with pytest.raises(TrainConfigError, match=r"^stages\[1\] \(a\): a stage needs its own folder name"):
        config_from_dict(staged({"name": "a"}, {"name": "a"}))
    data = staged({"name": "a"})
    data["train"]["export_hf"] = False
    with pytest.raises(TrainConfigError, match=r"^stages\[0\] \(a\): the stage before it must export its model"):
        config_from_dict(data)
    with pytest.raises(TrainConfigError, match=r"^stages: expected a list"):
        config_from_dict({**minimal(), "stages": {"name": "a"}})


def test_resume_before_an_override_keeps_the_override(monkeypatch):
    # `--resume` takes an optional folder, so `--resume train.output_dir=X` used to read the
    # override as a checkpoint folder and fail with "X=... is not a complete checkpoint".
    import importlib.util

    spec = importlib.util.spec_from_file_location("ferret_train_cli", REPO / "train" / "ferret_train.py")
    cli = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, cli)  # its dataclasses look their module up
    spec.loader.exec_module(cli)
    args = cli.parse_args(["--config", "c.yaml", "--resume", "train.output_dir=out", "train.seed=3"])
    assert args.resume == "latest" and args.overrides == ["train.output_dir=out", "train.seed=3"]
    args = cli.parse_args(["--config", "c.yaml", "train.output_dir=out", "--resume"])
    assert args.resume == "latest" and args.overrides == ["train.output_dir=out"]
    args = cli.parse_args(["--config", "c.yaml", "--resume", "runs/x/checkpoints/step-00000010"])
    assert args.resume == "runs/x/checkpoints/step-00000010" and args.overrides == []


def test_length_grouping_needs_a_shuffled_order():
    data = {**minimal(), "data": {"data_path": ["a.json"], "group_by_length": True}, "train": {"shuffle": False}}
    with pytest.raises(TrainConfigError, match=r"^data.group_by_length: .*train.shuffle false"):
        config_from_dict(data)
    data["train"]["shuffle"] = True
    assert config_from_dict(data).data.group_by_length
