"""What a new user types, taken as meant: checkpoint.every_steps=0 (no periodic checkpoints) and
parallel.pp without parallel.microbatches (2 x pp)."""

import pytest
from fault_runs import tiny_overrides

from flip_scale.checkpoint import find_latest
from flip_scale.config import ConfigError, load_config
from flip_scale.train import main, parse_args


def test_every_steps_zero_means_only_the_final_checkpoint(tmp_path, synthetic_dir):
    run_dir = tmp_path / "run"
    assert main(["--run-dir", str(run_dir), *tiny_overrides(synthetic_dir, 3, 0)]) == 0
    assert [p.name for p in run_dir.glob("step_*")] == ["step_00000003"]
    assert find_latest(run_dir).name == "step_00000003"
    with pytest.raises(ConfigError, match=r"checkpoint.every_steps: must be 0 \(no periodic checkpoints"):
        load_config(None, ["checkpoint.every_steps=-1"])


def test_help_says_what_zero_every_steps_and_unset_microbatches_mean(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = capsys.readouterr().out
    assert "checkpoint.every_steps=0" in out and "only the final one and preemption saves" in out
    assert "2 x parallel.pp" in out


def test_pipeline_microbatches_default_to_twice_the_stages(capsys):
    cfg = load_config(None, ["parallel.pp=2"])
    assert cfg.parallel.microbatches == 4 and cfg.parallel.microbatches_from_default
    assert load_config(None, []).parallel.microbatches == 1
    assert load_config(None, ["parallel.pp=2", "parallel.microbatches=2"]).parallel.microbatches == 2
    with pytest.raises(ConfigError, match=r"parallel.microbatches: must be 0 \(2 x parallel.pp"):
        load_config(None, ["parallel.microbatches=-1"])
    assert main(["--dry-run", "--world-size", "2", "parallel.pp=2"]) == 0
    assert "pipeline micro-batches 4 = 2 x parallel.pp: parallel.microbatches not set" in capsys.readouterr().out
    # What cannot work is still refused: fewer micro-batches than stages.
    assert main(["--dry-run", "--world-size", "2", "parallel.pp=2", "parallel.microbatches=1"]) == 2
    assert "parallel.microbatches=1 < parallel.pp=2" in capsys.readouterr().err
