"""Config loading: `_base_` inheritance, overrides, validation messages, recipes, save/load, lr rule."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from flip_scale import config as config_module
from flip_scale.config import (
    CONFIG_DIR,
    Config,
    ConfigError,
    config_from_dict,
    effective_lr,
    load_config,
    merge_trees,
    validate,
)


def write(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


# ----------------------------------------------------------------------------- _base_ inheritance


def test_child_overrides_one_key_and_keeps_the_rest(tmp_path):
    write(tmp_path / "base.yaml", {"train": {"max_steps": 10, "global_batch_size": 64}, "model": {"mask_ratio": 0.75}})
    child = write(tmp_path / "child.yaml", {"_base_": "base.yaml", "train": {"max_steps": 20}})
    cfg = load_config(child)
    assert cfg.train.max_steps == 20
    assert cfg.train.global_batch_size == 64  # kept from the base (deep merge, not section replace)
    assert cfg.model.mask_ratio == 0.75
    assert cfg.train.seed == Config().train.seed  # untouched keys keep the dataclass default


def test_list_of_bases_later_wins_and_chains_resolve(tmp_path):
    write(tmp_path / "root.yaml", {"train": {"seed": 7}})
    write(tmp_path / "a.yaml", {"_base_": "root.yaml", "train": {"max_steps": 1, "global_batch_size": 32}})
    write(tmp_path / "b.yaml", {"train": {"max_steps": 2}, "model": {"name": "B/16"}})
    child = write(tmp_path / "child.yaml", {"_base_": ["a.yaml", "b.yaml"], "model": {"mask_ratio": 0.25}})
    cfg = load_config(child)
    assert cfg.train.max_steps == 2  # b comes after a
    assert cfg.train.global_batch_size == 32  # only in a
    assert cfg.train.seed == 7  # a's own base
    assert (cfg.model.name, cfg.model.mask_ratio) == ("B/16", 0.25)


def test_diamond_is_not_a_cycle(tmp_path):
    write(tmp_path / "root.yaml", {"train": {"seed": 3}})
    write(tmp_path / "a.yaml", {"_base_": "root.yaml"})
    write(tmp_path / "b.yaml", {"_base_": "root.yaml"})
    child = write(tmp_path / "child.yaml", {"_base_": ["a.yaml", "b.yaml"]})
    assert load_config(child).train.seed == 3


def test_base_cycle_is_refused(tmp_path):
    write(tmp_path / "a.yaml", {"_base_": "b.yaml", "train": {"seed": 1}})
    write(tmp_path / "b.yaml", {"_base_": "a.yaml", "train": {"seed": 2}})
    with pytest.raises(ConfigError, match=r"_base_ cycle: .*a\.yaml includes itself"):
        load_config(tmp_path / "a.yaml")
    write(tmp_path / "self.yaml", {"_base_": "self.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "self.yaml")


def test_missing_base_names_the_file(tmp_path):
    child = write(tmp_path / "child.yaml", {"_base_": "nowhere.yaml"})
    with pytest.raises(ConfigError, match="nowhere.yaml' not found"):
        load_config(child)


# ----------------------------------------------------------------------------- overrides


def test_overrides_of_every_type():
    cfg = load_config(
        None,
        [
            "train.max_steps=5",
            "optim.base_lr=4e-6",  # YAML 1.1 reads this as a string; it must still become a float
            "optim.weight_decay=0.1",
            "model.text_pad_mask=true",
            "optim.betas=[0.9, 0.98]",
            "data.train_shards=[a.tar, b.tar]",
            "model.name=B/16",
            "optim.lr=null",
            "optim.fused=false",  # a string option whose values YAML reads as bools
        ],
    )
    assert cfg.train.max_steps == 5 and isinstance(cfg.train.max_steps, int)
    assert cfg.optim.base_lr == 4e-6 and isinstance(cfg.optim.base_lr, float)
    assert cfg.optim.weight_decay == 0.1
    assert cfg.model.text_pad_mask is True
    assert cfg.optim.betas == [0.9, 0.98]
    assert cfg.data.train_shards == ["a.tar", "b.tar"]
    assert cfg.model.name == "B/16"
    assert cfg.optim.lr is None
    assert cfg.optim.fused == "false"
    # An int where a float is expected is accepted as a float.
    assert load_config(None, ["model.mask_ratio=0"]).model.mask_ratio == 0.0


def test_override_replaces_the_recipe_value():
    assert load_config("flip_l16.yaml").train.max_steps == 195313
    assert load_config("flip_l16.yaml", ["train.max_steps=12"]).train.max_steps == 12


def test_malformed_override():
    with pytest.raises(ConfigError, match="not of the form key.sub=value"):
        load_config(None, ["train.max_steps"])


# ----------------------------------------------------------------------------- validation messages


def test_unknown_key_names_it_and_the_closest_valid_key():
    with pytest.raises(ConfigError) as error:
        load_config(None, ["model.mask_ration=0.6"])
    message = str(error.value)
    assert "unknown config key 'model.mask_ration'" in message
    assert "did you mean 'model.mask_ratio'" in message
    with pytest.raises(ConfigError, match="did you mean 'train.max_steps'"):
        load_config(None, ["train.max_step=3"])


def test_unknown_section_names_it_and_the_closest_section():
    with pytest.raises(ConfigError, match=r"unknown config key 'optimizer'; did you mean 'optim'"):
        load_config(None, ["optimizer.lr=1e-3"])


def test_unknown_key_in_a_recipe_file(tmp_path):
    recipe = write(tmp_path / "bad.yaml", {"parallel": {"tp_size": 2}})
    with pytest.raises(ConfigError, match=r"unknown config key 'parallel.tp_size'; did you mean 'parallel.tp'"):
        load_config(recipe)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_steps=abc", "train.max_steps: expected int, got 'abc'"),
        ("train.max_steps=1.5", "train.max_steps: expected int, got 1.5"),
        ("model.text_pad_mask=3", "model.text_pad_mask: expected bool, got 3"),
        ("optim.betas=0.9", "optim.betas: expected list, got 0.9"),
        ("model.image_size=big", "model.image_size: expected int or null, got 'big'"),
        ("model.mask_ratio=half", "model.mask_ratio: expected float, got 'half'"),
        ("model=3", "model: expected a mapping of keys, got 3"),
    ],
)
def test_wrong_type_names_the_key_and_the_expected_type(override, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, [override])
    assert message in str(error.value)


def test_invalid_choice_lists_the_valid_ones():
    with pytest.raises(ConfigError) as error:
        load_config(None, ["parallel.pp_schedule=foo"])
    assert str(error.value) == "parallel.pp_schedule: 'foo' is not valid; choose one of gpipe, 1f1b, interleaved_1f1b"
    with pytest.raises(ConfigError, match="model.vision_pool: 'mean' is not valid; choose one of avg_patches, avg_all, cls"):
        load_config(None, ["model.vision_pool=mean"])
    with pytest.raises(ConfigError, match="optim.fused: 'maybe' is not valid"):
        load_config(None, ["optim.fused=maybe"])


def _literal_fields(cls=Config, prefix=""):
    """dotted key -> the choices of every `Literal[...]` field, read from the dataclass types."""
    out = {}
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            out.update(_literal_fields(tp, f"{prefix}{name}."))
        elif typing.get_origin(tp) is typing.Literal:
            out[f"{prefix}{name}"] = typing.get_args(tp)
    return out


def test_choice_options_are_literal_types():
    fields = _literal_fields()
    assert fields["parallel.engine"] == ("fsdp", "deepspeed")
    assert fields["optim.fused"] == ("auto", "true", "false")
    assert fields["train.device"] == ("auto", "cpu", "cuda")
    assert fields["parallel.reduce_every_microbatch"] == ("auto", "true", "false")
    assert fields["model.vision_pos_embed"] == ("sincos", "learned")
    assert fields["model.act"] == ("gelu", "quick_gelu")
    assert fields["model.text_pool"] == ("auto", "argmax")
    assert fields["model.text_masking"] == ("random", "prioritized")
    assert fields["data.image_decoder"] == ("pillow", "torchvision")
    assert len(fields) == 24
    assert fields["parallel.zero_stage"] == (1, 2, 3)
    assert not hasattr(config_module, "CHOICES")  # the types are the one list of choices


@pytest.mark.parametrize("dotted", sorted(_literal_fields()))
def test_every_literal_field_refuses_a_value_outside_it(tmp_path, dotted):
    choices = _literal_fields()[dotted]
    expected = f"{dotted}: 'nonsense' is not valid; choose one of {', '.join(str(c) for c in choices)}"
    section, key = dotted.split(".")
    # The override path, a recipe file and config_from_dict all go through the same check.
    with pytest.raises(ConfigError) as error:
        load_config(None, [f"{dotted}=nonsense"])
    assert str(error.value) == expected
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path / "bad.yaml", {section: {key: "nonsense"}}))
    assert str(error.value) == expected
    with pytest.raises(ConfigError) as error:
        config_from_dict({section: {key: "nonsense"}})
    assert str(error.value) == expected
    # Every choice is accepted as it is.
    for choice in choices:
        assert getattr(getattr(config_from_dict({section: {key: choice}}), section), key) == choice


def test_a_choice_of_another_type_is_refused_naming_the_choices():
    with pytest.raises(ConfigError) as error:
        load_config(None, ["train.device=3"])
    assert str(error.value) == "train.device: 3 is not valid; choose one of auto, cpu, cuda"
    with pytest.raises(ConfigError, match="train.precision: 'true' is not valid; choose one of auto, fp32, bf16"):
        load_config(None, ["train.precision=true"])  # YAML's bool, read as the word


def test_fused_takes_yaml_bools_and_strings(tmp_path):
    for override, expected in (("optim.fused=true", "true"), ("optim.fused=false", "false"),
                               ("optim.fused='true'", "true"), ("optim.fused='false'", "false"),
                               ("optim.fused=auto", "auto")):
        assert load_config(None, [override]).optim.fused == expected
    assert load_config(write(tmp_path / "f.yaml", {"optim": {"fused": True}})).optim.fused == "true"
    assert load_config(write(tmp_path / "g.yaml", {"optim": {"fused": "false"}})).optim.fused == "false"
    assert config_from_dict({"optim": {"fused": False}}).optim.fused == "false"


def test_validate_refuses_a_choice_set_in_code():
    cfg = Config()
    cfg.parallel.pp_schedule = "zero_bubble"
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    assert str(error.value) == "parallel.pp_schedule: 'zero_bubble' is not valid; choose one of gpipe, 1f1b, interleaved_1f1b"
    cfg.parallel.pp_schedule = "gpipe"
    assert validate(cfg) is cfg


def test_deepspeed_is_a_valid_choice_planned_for_data_parallel_only():
    from flip_scale.parallel import LayoutError
    from flip_scale.preflight import plan_run

    cfg = load_config(None, ["parallel.engine=deepspeed"])
    assert cfg.parallel.engine == "deepspeed"
    assert plan_run(cfg, 2).engine_config["zero_optimization"]["stage"] == cfg.parallel.zero_stage
    with pytest.raises(LayoutError, match="parallel.engine=deepspeed is data parallel only"):
        plan_run(load_config(None, ["parallel.engine=deepspeed", "parallel.tp=2"]), 2)


def test_merge_trees_merges_nested_keys_and_leaves_its_inputs():
    base = {"train": {"max_steps": 1, "seed": 2}, "model": {"name": "tiny"}}
    update = {"train": {"max_steps": 5}, "model": "replaced", "eval": {"at_end": False}}
    merged = merge_trees(base, update)
    assert merged == {"train": {"max_steps": 5, "seed": 2}, "model": "replaced", "eval": {"at_end": False}}
    assert base == {"train": {"max_steps": 1, "seed": 2}, "model": {"name": "tiny"}}
    assert update == {"train": {"max_steps": 5}, "model": "replaced", "eval": {"at_end": False}}


@pytest.mark.parametrize("ratio", ["1.0", "-0.1", "1.5"])
def test_mask_ratio_out_of_range(ratio):
    with pytest.raises(ConfigError, match=rf"model.mask_ratio: {float(ratio)} is outside \[0, 1\)"):
        load_config(None, [f"model.mask_ratio={ratio}"])


def test_other_range_checks():
    with pytest.raises(ConfigError, match="train.global_batch_size: must be >= 1, got 0"):
        load_config(None, ["train.global_batch_size=0"])
    with pytest.raises(ConfigError, match="parallel.dp_shard: must be -1 .* or >= 1, got 0"):
        load_config(None, ["parallel.dp_shard=0"])
    with pytest.raises(ConfigError, match="optim.betas: expected two numbers"):
        load_config(None, ["optim.betas=[0.9]"])
    with pytest.raises(ConfigError, match=r"data.streams: must be 0 \(chosen from the shard count and the batch\)"):
        load_config(None, ["data.streams=-2"])
    with pytest.raises(ConfigError, match="logging.peak_tflops: must be 0"):
        load_config(None, ["logging.peak_tflops=-1"])
    with pytest.raises(ConfigError, match="train.collective_timeout_minutes: must be > 0, got 0"):
        load_config(None, ["train.collective_timeout_minutes=0"])
    with pytest.raises(ConfigError, match="train.collective_timeout_seconds: must be 0 .* or > 0, got -1"):
        load_config(None, ["train.collective_timeout_seconds=-1"])
    from flip_scale.config import collective_timeouts

    # Seconds win over minutes; the start-up allowance is never shorter than the steady one.
    assert collective_timeouts(load_config(None, ["train.collective_timeout_seconds=4"])) == (3600.0, 4.0)
    assert collective_timeouts(load_config(None, ["train.collective_timeout_minutes=90"])) == (5400.0, 5400.0)
    with pytest.raises(ConfigError, match="optim.max_nonfinite_steps: must be 0"):
        load_config(None, ["optim.max_nonfinite_steps=-1"])


def test_missing_recipe_lists_the_shipped_ones():
    with pytest.raises(ConfigError) as error:
        load_config("no_such_recipe.yaml")
    assert "no_such_recipe.yaml' not found" in str(error.value)
    assert "flip_l16.yaml" in str(error.value) and "tiny.yaml" in str(error.value)


# ----------------------------------------------------------------------------- shipped recipes


RECIPES = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))


def test_the_expected_recipes_ship():
    assert {"tiny.yaml", "flip_b16.yaml", "flip_l16.yaml", "flip_h14.yaml", "flip_g14.yaml", "unmask_tune.yaml"} <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_shipped_recipe_loads(recipe):
    cfg = load_config(CONFIG_DIR / recipe)
    assert isinstance(cfg, Config)
    assert 0.0 <= cfg.model.mask_ratio < 1.0


def test_recipe_values():
    assert load_config(None) == load_config("tiny.yaml")  # the default is tiny
    l16 = load_config("flip_l16.yaml")
    assert (l16.model.name, l16.model.mask_ratio, l16.model.context_length) == ("L/16", 0.5, 32)
    assert (l16.optim.betas, l16.optim.weight_decay, l16.train.global_batch_size) == ([0.9, 0.95], 0.2, 65536)
    g14 = load_config("flip_g14.yaml")
    assert (g14.model.name, g14.parallel.tp, g14.schedule.warmup_steps) == ("G/14", 2, 3906)  # warmup from H/14
    tune = load_config(CONFIG_DIR / "unmask_tune.yaml")
    assert (tune.model.mask_ratio, tune.optim.base_lr) == (0.0, 4e-8)


def test_unmask_tune_overlay_on_a_pretraining_recipe(tmp_path):
    recipe = write(tmp_path / "tune.yaml", {"_base_": [str(CONFIG_DIR / "flip_l16.yaml"), str(CONFIG_DIR / "unmask_tune.yaml")]})
    cfg = load_config(recipe)
    assert (cfg.model.name, cfg.model.mask_ratio) == ("L/16", 0.0)
    assert effective_lr(cfg) == pytest.approx(4e-8 * 65536 / 256)  # 1.024e-5, the paper's tuning lr


# ----------------------------------------------------------------------------- save / load, lr


@pytest.mark.parametrize("recipe", ["tiny.yaml", "flip_g14.yaml"])
def test_save_writes_yaml_that_loads_back_equal(tmp_path, recipe):
    cfg = load_config(recipe, ["optim.base_lr=3e-6", "data.train_shards=[x.tar, y.tar]", "optim.fused=true"])
    path = tmp_path / "run" / "config.yaml"
    cfg.save(path)
    assert path.exists() and not path.with_name("config.yaml.tmp").exists()
    assert yaml.safe_load(path.read_text())["optim"]["base_lr"] == 3e-6
    assert load_config(path) == cfg
    assert config_from_dict(cfg.to_dict()) == cfg


def test_effective_lr_linear_scaling():
    cfg = load_config("flip_l16.yaml")
    assert cfg.optim.lr is None
    assert effective_lr(cfg) == pytest.approx(1.024e-3, rel=1e-12)  # 4e-6 x 65536 / 256
    assert effective_lr(load_config("flip_l16.yaml", ["train.global_batch_size=256"])) == pytest.approx(4e-6)
    assert effective_lr(load_config("flip_l16.yaml", ["optim.lr=5e-4"])) == 5e-4  # an explicit lr wins


def test_flip_train_exits_2_on_errors_found_with_the_world_in_hand(tmp_path, capsys):
    """A layout the world cannot hold, or a data.streams the batch cannot use, is as deterministic as
    a config error: exit 2 (which the Slurm templates never requeue), with the message."""
    from flip_scale.train import main

    assert main(["--run-dir", str(tmp_path / "a"), "parallel.tp=2", "train.device=cpu"]) == 2
    assert "does not divide the world size 1" in capsys.readouterr().err
    assert main(["--run-dir", str(tmp_path / "b"), "data.streams=3", "train.device=cpu"]) == 2
    assert "is not divisible by data.streams=3" in capsys.readouterr().err


def test_flip_train_dry_run_checks_a_large_job_without_building_it(tmp_path, capsys, monkeypatch):
    from flip_scale.train import main

    monkeypatch.chdir(tmp_path)  # nothing may be written: no runs/ or data/ appear here
    assert main(["--config", str(CONFIG_DIR / "flip_g14.yaml"), "--dry-run", "--world-size", "256", "parallel.tp=2"]) == 0
    out = capsys.readouterr().out
    assert "G/14, 2516.8M parameters" in out and "dp_shard 128 x tp 2" in out
    assert "256 sample streams (2 per data-parallel rank" in out and "config and layout OK" in out
    assert "sizes 1, 2, 4, 8, 16, 32, 64, 128, 256 draws these same batches" in out  # the data's default
    assert not list(tmp_path.iterdir())
    assert main(["--config", str(CONFIG_DIR / "flip_g14.yaml"), "--dry-run", "--world-size", "100", "parallel.tp=2"]) == 2
    assert "not divisible by the data-parallel size 50" in capsys.readouterr().err
    assert main(["--world-size", "8"]) == 2
    assert "goes with --dry-run" in capsys.readouterr().err


def test_dry_run_refuses_what_the_trainer_refuses(capsys):
    from flip_scale.train import main

    assert main(["--dry-run", "--world-size", "2", "parallel.pp=2", "parallel.microbatches=2",
                 "loss.microbatch_contrast=per_microbatch"]) == 2
    assert "per_microbatch is not available with pipeline parallel" in capsys.readouterr().err
