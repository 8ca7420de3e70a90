"""Scaling studies: tools/sweep.py, tools/plot_runs.py, tools/scaling_fit.py and flip_scale/studies/.

One sweep of four 3- and 5-step tiny runs (mask 0 / 0.75 x 3 / 5 steps, batch 16), run once for the
module through `sweep.py --local` (flip-train's own entry in a subprocess per run), serves the sweep,
the plot and the fit tests. The fit's numbers are checked on synthetic points of a known law.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from flip_scale.config import load_config
from flip_scale.models.flops import flops_for_config
from flip_scale.studies import (
    SweepError,
    differing_keys,
    fit_power_law,
    frontier,
    interpolated_compute_for,
    load_run,
    parse_sweep,
    plan_sweep,
    read_jsonl_tolerant,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_slurm import slurm_cluster  # noqa: E402, F401  (the one-node Slurm of the Slurm tests)

REPO = Path(__file__).resolve().parent.parent


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tools_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sweep_tool, plot_tool, fit_tool = _tool("sweep"), _tool("plot_runs"), _tool("scaling_fit")


def _data_overrides(data_dir: Path) -> list[str]:
    return [f"data.synthetic_dir={data_dir}", f"data.train_shards={data_dir}/train-{{000000..000007}}.tar",
            f"data.tokenizer={data_dir}/tokenizer.model", f"eval.zero_shot_shards={data_dir}/eval-{{000000..000000}}.tar",
            f"eval.classnames={data_dir}/classnames.txt", f"eval.templates={data_dir}/templates.txt"]


GRID = {"model.mask_ratio": [0, 0.75], "train.max_steps": [3, 5]}
NAMES = ["mask_ratio0_max_steps3", "mask_ratio0_max_steps5", "mask_ratio0.75_max_steps3", "mask_ratio0.75_max_steps5"]
FIXED = ["train.global_batch_size=16", "train.log_every_steps=1", "checkpoint.every_steps=3", "checkpoint.keep_last=2",
         "logging.tensorboard=false", "eval.batch_size=300"]


def _sweep_file(tmp: Path, grid=GRID, name="tiny_grid") -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "base": "configs/tiny.yaml", "grid": grid, "overrides": FIXED}))
    return path


@pytest.fixture(scope="module")
def sweep_dir(synthetic_dir, tmp_path_factory):
    """The 2 x 2 grid run by `sweep.py --local`: four finished runs."""
    tmp = tmp_path_factory.mktemp("sweep")
    out = tmp / "runs"
    code = sweep_tool.main([str(_sweep_file(tmp)), "--local", "--sweep-dir", str(out), *_data_overrides(synthetic_dir)])
    logs = "\n".join((out / n / "sweep.log").read_text()[-2000:] for n in NAMES if (out / n / "sweep.log").exists())
    assert code == 0, logs
    return out


# ----------------------------------------------------------------------------------------- sweep.py


def test_dry_run_expands_the_grid_to_named_runs_with_their_compute(tmp_path, capsys):
    code = sweep_tool.main([str(_sweep_file(tmp_path)), "--dry-run", "--sweep-dir", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert code == 0, out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("mask_ratio")]
    assert [r[0] for r in rows] == NAMES and all(r[1] == "new" for r in rows)
    total = 0.0
    for row, (mask, steps) in zip(rows, [(0, 3), (0, 5), (0.75, 3), (0.75, 5)]):
        model = load_config("configs/tiny.yaml", [f"model.mask_ratio={mask}"]).model
        per_sample = flops_for_config(model, training=True)["total"]  # what flip-train --dry-run multiplies
        assert int(row[2]) == steps and int(row[3]) == steps * 16
        assert float(row[4]) == pytest.approx(per_sample / 1e9, abs=1e-4)
        total += per_sample * steps * 16
    assert f"({total:.4g} FLOPs)" in out
    # A masked sample costs what its visible tokens cost: 75% masking is well under half the unmasked.
    assert float(rows[2][4]) < 0.5 * float(rows[0][4])


def test_bad_sweep_files_are_refused_with_what_is_valid(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base": "configs/tiny.yaml", "grid": {"model.mask_ratoi": [0, 0.5]}}))
    assert sweep_tool.main([str(bad), "--dry-run"]) == 2
    assert "unknown config key 'model.mask_ratoi'; did you mean 'model.mask_ratio'" in capsys.readouterr().err
    bad.write_text(yaml.safe_dump({"base": "configs/tiny.yaml", "grid": {"model.mask_ratio": 0.5}, "runs": 3}))
    assert sweep_tool.main([str(bad), "--dry-run"]) == 2
    assert "unknown key(s) runs; valid keys: name, base, grid, overrides" in capsys.readouterr().err


@pytest.mark.slow  # four flip-train processes, then one resumed (~100 s with the fixture)
def test_local_sweep_finishes_every_run_skips_them_again_and_resumes_a_half_one(sweep_dir, synthetic_dir, tmp_path,
                                                                              capsys):
    for name in NAMES:
        steps = int(name.rsplit("max_steps", 1)[1])
        run = load_run(sweep_dir / name)
        assert (sweep_dir / name / "latest").read_text().strip() == f"step_{steps:08d}"
        assert [r["step"] for r in run.metrics] == list(range(1, steps + 1))
        assert run.evals[-1]["step"] == steps and "zero_shot_top1" in run.evals[-1]
        assert run.config["model"]["mask_ratio"] == float(name.split("_")[1][len("ratio"):])
    # A half run: back to its step-3 checkpoint, as if stopped there.
    half = sweep_dir / "mask_ratio0.75_max_steps5"
    (half / "latest").write_text("step_00000003\n")
    shutil.rmtree(half / "step_00000005")
    # A run killed during its final evaluation: the step-3 checkpoint is there, its evaluation not.
    unevaluated = sweep_dir / NAMES[0]
    (unevaluated / "eval.jsonl").unlink()
    before = {n: (sweep_dir / n / "metrics.jsonl").read_text() for n in NAMES}
    code = sweep_tool.main([str(_sweep_file(tmp_path)), "--local", "--sweep-dir", str(sweep_dir),
                            *_data_overrides(synthetic_dir)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.count("finished, skipped") == 2 and "mask_ratio0.75_max_steps5: resuming" in out
    assert f"{NAMES[0]}: resuming" in out
    for name in NAMES[:3]:
        assert (sweep_dir / name / "metrics.jsonl").read_text() == before[name]  # no step trained again
    # Resumed at max_steps, flip-train ran the final evaluation only.
    assert [r["step"] for r in load_run(unevaluated).evals] == [3]
    steps = [r["step"] for r in read_jsonl_tolerant(half / "metrics.jsonl")[0]]
    assert steps == [1, 2, 3, 4, 5, 4, 5]  # resumed at 3: only steps 4 and 5 ran again
    assert (half / "latest").read_text().strip() == "step_00000005"
    assert "resumed from" in (half / "sweep.log").read_text()


def test_a_run_is_finished_only_with_its_final_evaluation(tmp_path):
    from flip_scale.studies import run_status

    run = tmp_path / "run"
    assert run_status(run, 5, evaluates_at_end=True) == "new"
    (run / "step_00000005").mkdir(parents=True)
    (run / "latest").write_text("step_00000005\n")
    (run / "config.yaml").write_text("{}\n")
    assert run_status(run, 5, evaluates_at_end=False) == "finished"  # eval.at_end=false: the checkpoint says it
    assert run_status(run, 5, evaluates_at_end=True) == "partial"  # stopped in the final evaluation
    (run / "eval.jsonl").write_text('{"step": 3, "zero_shot_top1": 0.1}\n{"step": 5, "zero_')  # killed mid-line
    assert run_status(run, 5, evaluates_at_end=True) == "partial"
    (run / "eval.jsonl").write_text('{"step": 3, "zero_shot_top1": 0.1}\n{"step": 5, "zero_shot_top1": 0.2}\n')
    assert run_status(run, 5, evaluates_at_end=True) == "finished"
    assert run_status(run, 8, evaluates_at_end=True) == "partial"
    # The plan knows which runs evaluate at the end: an evaluation configured and eval.at_end.
    sweep = parse_sweep({"base": "configs/tiny.yaml", "grid": {"eval.at_end": [True, False]},
                         "overrides": ["eval.zero_shot_shards=/data/eval-000000.tar"]})
    assert [r.evaluates_at_end for r in plan_sweep(sweep, tmp_path)] == [True, False]
    sweep = parse_sweep({"base": "configs/tiny.yaml", "grid": {"eval.at_end": [True]},
                         "overrides": ["eval.zero_shot_shards=", "eval.retrieval_shards="]})
    assert [r.evaluates_at_end for r in plan_sweep(sweep, tmp_path)] == [False]  # nothing to evaluate
    # The config a run ran with decides (FLIP_ARGS of a Slurm job may have turned the evaluation off).
    planned = plan_sweep(parse_sweep({"base": "configs/tiny.yaml", "grid": {"train.max_steps": [5]}}), tmp_path)[0]
    (planned.run_dir / "step_00000005").mkdir(parents=True)
    (planned.run_dir / "latest").write_text("step_00000005\n")
    cfg = load_config("configs/tiny.yaml", ["train.max_steps=5"])
    cfg.save(planned.run_dir / "config.yaml")
    assert planned.evaluates_at_end and planned.status() == "partial"
    load_config("configs/tiny.yaml", ["train.max_steps=5", "eval.at_end=false"]).save(planned.run_dir / "config.yaml")
    assert planned.status() == "finished"


def test_float_grid_values_train_exactly_and_name_runs_short(tmp_path):
    sweep = parse_sweep({"base": "configs/tiny.yaml", "grid": {"optim.lr": [0.0012345678, 1e-05]}})
    runs = plan_sweep(sweep, tmp_path)
    assert [r.name for r in runs] == ["lr0.00123457", "lr1e-05"]
    assert runs[0].overrides == ["optim.lr=0.0012345678"] and runs[1].overrides == ["optim.lr=1e-05"]
    assert load_config("configs/tiny.yaml", runs[0].overrides).optim.lr == 0.0012345678
    with pytest.raises(SweepError, match=r"grid.optim.lr values 0.0012345678 and 0.00123457 both appear as "
                                         r"'0.00123457' in run names"):
        parse_sweep({"base": "configs/tiny.yaml", "grid": {"optim.lr": [0.0012345678, 0.00123457]}})


def _fake_squeue(tmp_path, monkeypatch, lines: str):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "squeue").write_text(f'#!/bin/bash\necho "$@" >> {bin_dir}/calls\nprintf "{lines}"\n')
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir / "calls"


def test_slurm_refuses_while_an_array_of_the_sweep_is_queued(tmp_path, monkeypatch, capsys):
    calls = _fake_squeue(tmp_path, monkeypatch, "4242_[2-3] PENDING\\n4242_1 RUNNING\\n")
    argv = [str(_sweep_file(tmp_path)), "--slurm", "slurm/flip_b16.sh", "--dry-run", "--sweep-dir", str(tmp_path / "r")]
    assert sweep_tool.main(argv) == 1
    err = capsys.readouterr().err
    assert "jobs of sweep tiny_grid are still queued or running (4242_[2-3] PENDING, 4242_1 RUNNING)" in err
    assert "--force" in err and "-h --me -n tiny_grid" in calls.read_text()
    assert not (tmp_path / "r" / "sweep_array.sh").exists()
    assert sweep_tool.main([*argv, "--force"]) == 0
    assert "command: sbatch --parsable --array=0-3" in capsys.readouterr().out
    _fake_squeue(tmp_path, monkeypatch, "")  # nothing queued: submitted as before
    assert sweep_tool.main(argv) == 0


def test_slurm_dry_run_writes_the_array_script_and_the_sbatch_command(tmp_path, capsys):
    runs = tmp_path / "runs"
    code = sweep_tool.main([str(_sweep_file(tmp_path)), "--slurm", "slurm/flip_b16.sh", "--dry-run", "--sweep-dir",
                            str(runs), "--sbatch-args=-p gpu --time=1:00:00", "--max-parallel", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    script = runs / "sweep_array.sh"
    assert f"command: sbatch --parsable --array=0-3%2 -p gpu --time=1:00:00 {script}" in out
    text = script.read_text()
    subprocess.run(["bash", "-n", str(script)], check=True)
    # The template's resources, the sweep's own name and one log per array task.
    assert "#SBATCH --nodes=8" in text and "#SBATCH --requeue" in text and "--job-name=flip_b16" not in text
    assert "#SBATCH --job-name=tiny_grid" in text and f"#SBATCH --output={runs}/%x-%A_%a.out" in text
    # Task 2 runs the third run through the template, with FLIP_ARGS of the environment first.
    fake_home = tmp_path / "home"
    (fake_home / "slurm").mkdir(parents=True)
    (fake_home / "slurm" / "flip_b16.sh").write_text('echo "RUN_DIR=$RUN_DIR"; echo "FLIP_CONFIG=$FLIP_CONFIG"; '
                                                      'echo "FLIP_ARGS=$FLIP_ARGS"\n')
    env = dict(os.environ, SLURM_ARRAY_TASK_ID="2", FLIP_HOME=str(fake_home), FLIP_ARGS="train.device=cpu")
    shown = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, check=True).stdout
    assert f"RUN_DIR={runs / NAMES[2]}" in shown and f"FLIP_CONFIG={REPO / 'configs' / 'tiny.yaml'}" in shown
    assert f"FLIP_ARGS=train.device=cpu {' '.join(FIXED)} model.mask_ratio=0.75 train.max_steps=3" in shown
    bad = subprocess.run(["bash", str(script)], env=dict(env, SLURM_ARRAY_TASK_ID="4"), capture_output=True, text=True)
    assert bad.returncode == 2 and "no run for array task '4' (tasks 0-3" in bad.stderr


@pytest.mark.slow
def test_slurm_sweep_submits_one_array_whose_tasks_finish(slurm_cluster, synthetic_dir, tmp_path, monkeypatch,  # noqa: F811
                                                          capsys):
    """On the one-node Slurm of tests/test_slurm.py (skipped with its reason where it cannot start)."""
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    for key, value in {"SLURM_CONF": slurm_cluster.env["SLURM_CONF"], "FLIP_DEVICE": "cpu", "FLIP_PYTHON": sys.executable,
                       "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MASTER_ADDR": "127.0.0.1",
                       "FLIP_ARGS": " ".join(_data_overrides(synthetic_dir))}.items():
        monkeypatch.setenv(key, value)
    runs = tmp_path / "runs"
    sweep = str(_sweep_file(tmp_path, {"model.mask_ratio": [0, 0.75], "train.max_steps": [3]}, "slurm_grid"))
    resources = "-N 1 --ntasks-per-node=1 --cpus-per-task=1 --gpus-per-node=0 --time=15"
    code = sweep_tool.main([sweep, "--slurm", "slurm/flip_b16.sh", "--sweep-dir", str(runs), "--sbatch-args", resources])
    out = capsys.readouterr().out
    assert code == 0, out
    job = re.search(r"submitted job array (\d+)", out).group(1)
    for task in (0, 1):
        log = runs / f"slurm_grid-{job}_{task}.out"
        info = slurm_cluster.wait_for(f"{job}_{task}", lambda i: i.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED",
                                                                                         "TIMEOUT"), 240, "the end", log)
        text = log.read_text()
        assert info["JobState"] == "COMPLETED", text[-3000:]
        # The template ran it (its banner, the run's directory and the sweep's recipe), flip-train to the end.
        assert "(slurm_grid) start" in text and f"recipe {REPO / 'configs' / 'tiny.yaml'}, run dir {runs}/" in text
        assert re.search(r"^0: .*step 3/3", text, re.M) and "trainer exit code 0" in text
    for name in ("mask_ratio0_max_steps3", "mask_ratio0.75_max_steps3"):
        assert (runs / name / "latest").read_text().strip() == "step_00000003"
        run = load_run(runs / name)
        assert [r["step"] for r in run.metrics] == [1, 2, 3] and run.config["model"]["mask_ratio"] == float(name[10:-11])
    # Called again, nothing is left to submit.
    assert sweep_tool.main([sweep, "--slurm", "slurm/flip_b16.sh", "--sweep-dir", str(runs)]) == 0
    assert "all 2 runs finished; nothing to submit" in capsys.readouterr().out


# ------------------------------------------------------------------------------------- plot_runs.py


@pytest.mark.slow  # on the sweep's runs
def test_plot_runs_draws_one_labelled_curve_per_run_up_to_a_truncated_line(sweep_dir, tmp_path, capsys):
    from flip_scale.studies.plots import plot_runs

    chosen = [sweep_dir / NAMES[0], sweep_dir / NAMES[1], tmp_path / "cut"]
    shutil.copytree(sweep_dir / NAMES[3], chosen[2], ignore=shutil.ignore_patterns("step_*"))
    metrics = chosen[2] / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:3]) + "\n" + lines[3][: len(lines[3]) // 2])  # killed while writing step 4
    out = tmp_path / "fig.png"
    assert plot_tool.main([*map(str, chosen), "--out", str(out), "--x", "flops", "--y", "loss,zero_shot_top1",
                           "--size", "900x300", "--svg"]) == 0
    printed = capsys.readouterr().out
    from PIL import Image

    with Image.open(out) as image:
        assert image.size == (900, 300)
    assert out.with_suffix(".svg").stat().st_size > 0
    table = (tmp_path / "fig_summary.html").read_text()
    assert "metrics.jsonl: last line incomplete, read up to step 3" in table and "3/5" in table
    assert "note: cut: metrics.jsonl: last line incomplete, read up to step 3" in printed

    # The same figure through matplotlib's objects: one curve per run, labels naming the differing keys.
    runs = [load_run(p) for p in chosen]
    assert differing_keys([r.config for r in runs]) == ["train.max_steps", "model.mask_ratio"]
    fig = plot_runs(runs, "samples", ["loss", "zero_shot_top1"], size=(900, 300))
    loss_axis, top1_axis = fig.axes
    assert [line.get_label() for line in loss_axis.lines] == [
        "train.max_steps=3, model.mask_ratio=0", "train.max_steps=5, model.mask_ratio=0",
        "train.max_steps=5, model.mask_ratio=0.75"]
    assert list(loss_axis.lines[2].get_xdata()) == [16, 32, 48]  # the cut run: up to its last complete line
    assert list(loss_axis.lines[1].get_xdata()) == [16 * s for s in range(1, 6)]
    assert len(top1_axis.lines) == 3 and list(top1_axis.lines[0].get_xdata()) == [48]
    assert fig.get_size_inches() * fig.dpi == pytest.approx([900, 300])
    # Compute is the model's count times samples: at equal steps the masked run has spent less.
    assert runs[2].series("loss", "flops")[0][-1] < 0.5 * runs[1].series("loss", "flops")[0][2]
    seconds = runs[1].series("loss", "time")[0]
    assert all(b > a for a, b in zip(seconds, seconds[1:]))

    # --final-by: each run's last accuracy as a point, the runs of one mask ratio joined (FLIP's figure).
    out = tmp_path / "finals.png"
    assert plot_tool.main([*(str(sweep_dir / n) for n in NAMES), "--final-by", "model.mask_ratio", "--x", "samples",
                           "--y", "zero_shot_top1", "--out", str(out)]) == 0
    from flip_scale.studies.plots import plot_finals

    axis = plot_finals([load_run(sweep_dir / n) for n in NAMES], "samples", ["zero_shot_top1"], "model.mask_ratio").axes[0]
    assert [line.get_label() for line in axis.lines] == ["model.mask_ratio=0", "model.mask_ratio=0.75"]
    assert [list(line.get_xdata()) for line in axis.lines] == [[48, 80], [48, 80]]


# ----------------------------------------------------------------------------------- scaling_fit.py


def test_power_law_fit_recovers_a_known_law_from_noisy_points():
    rng = np.random.default_rng(0)
    a, b, c = 40.0, 0.25, 1.8
    compute = np.geomspace(1e6, 1e12, 24)
    values = (a * compute**-b + c) * (1 + 0.003 * rng.standard_normal(compute.size))
    fit = fit_power_law(compute, values)
    assert fit.a == pytest.approx(a, rel=0.05) and fit.b == pytest.approx(b, rel=0.05)
    assert fit.c == pytest.approx(c, rel=0.05)
    # The uncertainties are real numbers, small here, and cover the truth within a few sigma.
    for value, err, true in ((fit.a, fit.a_err, a), (fit.b, fit.b_err, b), (fit.c, fit.c_err, c)):
        assert 0 < err < 0.05 * abs(true) and abs(value - true) < 4 * err
    # Reaching a target: the inverse of the law; below c it is never reached.
    assert fit.compute_for(float(fit(1e9))) == pytest.approx(1e9, rel=1e-6)
    assert fit.compute_for(fit.c - 0.01) == math.inf
    # The pure power law of the scaling-law paper (c fixed at 0).
    pure = fit_power_law(compute, 5.0 * compute**-0.1 * np.exp(0.002 * rng.standard_normal(compute.size)), fixed_c=0)
    assert pure.a == pytest.approx(5.0, rel=0.05) and pure.b == pytest.approx(0.1, rel=0.05) and pure.c == 0


def test_frontier_is_the_lower_envelope_of_a_constructed_example():
    #            0     1     2     3     4     5     6
    compute = [1.0, 2.0, 2.0, 4.0, 8.0, 8.0, 16.0]
    loss = [5.0, 4.0, 4.5, 4.2, 3.0, 3.0, 3.5]
    # 2 is beaten by 1 at the same compute, 3 by 1 with less, 5 ties 4 (one kept), 6 by 4.
    assert frontier(compute, loss) == [0, 1, 4]
    accuracy = [0.1, 0.3, 0.2, 0.25, 0.6, 0.5, 0.7]
    assert frontier(compute, accuracy, lower_is_better=False) == [0, 1, 4, 6]
    # Compute to reach 0.45 along the accuracy frontier: halfway between 2 and 8 in log compute.
    assert interpolated_compute_for(compute, accuracy, 0.45, lower_is_better=False) == pytest.approx(4.0)
    assert interpolated_compute_for(compute, accuracy, 0.9, lower_is_better=False) == math.inf


def _fake_runs(tmp_path, errors: dict, steps=(100, 200, 400, 800, 1600)) -> list[str]:
    """Run directories of tiny runs (config, one metrics and one eval record each) whose zero-shot
    error is errors[mask](compute, index)."""
    dirs = []
    for mask, error_of in errors.items():
        for index, n in enumerate(steps):
            run = tmp_path / f"m{mask}_{n}"
            run.mkdir()
            cfg = load_config("configs/tiny.yaml", [f"model.mask_ratio={mask}", f"train.max_steps={n}"])
            cfg.save(run / "config.yaml")
            compute = n * cfg.train.global_batch_size * flops_for_config(cfg.model, training=True)["total"]
            (run / "metrics.jsonl").write_text(f'{{"step": {n}, "loss": 1.0, "images_per_s": 100.0, '
                                               f'"samples_seen": {n * 128}}}\n')
            (run / "eval.jsonl").write_text(f'{{"step": {n}, "zero_shot_top1": {1 - error_of(compute, index)}}}\n')
            dirs.append(str(run))
    return dirs


def _law(mult):  # error(C) = 2 (C m)^-0.3 + 0.1
    return lambda compute, index: 2.0 * (compute / 1e12 * mult) ** -0.3 + 0.1


def _needs_line(printed: str, group: str) -> str:
    return next(line for line in printed.splitlines() if line.startswith(f"  model.mask_ratio={group}: needs"))


def test_scaling_fit_tool_fits_groups_and_reports_the_speed_up(tmp_path, capsys):
    """Runs made to lie on known laws: masked runs reach each error with 3x less compute."""
    dirs = _fake_runs(tmp_path, {"0": _law(1.0), "0.75": _law(3.0)})
    out = tmp_path / "fit.png"
    assert fit_tool.main([*dirs, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.stat().st_size > 0
    assert re.search(r"fit model.mask_ratio=0: error \(1 - zero_shot_top1\)\(C\) = a C\^-b \+ c: a = \S+ \+- \S+, "
                     r"b = 0.3 ", printed), printed
    speed = re.search(r"model.mask_ratio=0.75: needs .*speed-up over model.mask_ratio=0: \S+ \(frontier\), "
                      r"(\S+)x \(fit\)", printed)
    # Per sample the masked model costs less too, so at equal steps it reached the error with 3x less
    # compute: the fit says so.
    assert float(speed.group(1)) == pytest.approx(3.0, rel=0.02), printed
    assert "compute-optimal frontier" in printed and "m0.75_1600" in printed.split("frontier")[1].splitlines()[0]


def test_read_jsonl_tolerant_keeps_the_complete_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"st')
    records, note = read_jsonl_tolerant(path)
    assert [r["step"] for r in records] == [1, 2] and note == "metrics.jsonl: last line incomplete, read up to step 2"
    assert read_jsonl_tolerant(tmp_path / "none.jsonl") == ([], "none.jsonl missing")
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')  # a broken line in the middle is left out, said so
    records, note = read_jsonl_tolerant(path)
    assert [r["step"] for r in records] == [1, 3] and note == "metrics.jsonl: line(s) 2 incomplete, read up to step 3"


def test_scaling_fit_marks_a_fit_of_non_convex_points_unreliable(tmp_path, capsys):
    bent = [0.8, 0.79, 0.78, 0.5, 0.2]  # flat, then falling fast: no a C^-b + c with c >= 0
    fit = fit_power_law(np.geomspace(1e9, 16e9, 5), bent)
    assert any("c = " in d and "< 0" in d for d in fit.doubts()) and any("exceeds b" in d for d in fit.doubts())
    assert fit_power_law(np.geomspace(1e6, 1e12, 8), 40 * np.geomspace(1e6, 1e12, 8) ** -0.25 + 1.8).doubts() == []
    dirs = _fake_runs(tmp_path, {"0": lambda compute, index: bent[index], "0.75": _law(3e5)})
    assert fit_tool.main([*dirs, "--target", "0.6", "--out", str(tmp_path / "fit.png")]) == 0
    printed = capsys.readouterr().out
    from flip_scale.studies.plots import plot_fit

    fit_lines = [line.get_label() for line in plot_fit({"m=0": ([1e9, 2e9], [0.2, 0.8])}, {"m=0": fit}, [],
                                                        "top-1", accuracy=True).axes[0].lines]
    assert any(label.endswith("(unreliable)") for label in fit_lines), fit_lines
    assert re.search(r"^fit model.mask_ratio=0: .*; UNRELIABLE \(.*c = \S+ < 0.*\): its compute figures are not "
                     r"printed$", printed, re.M), printed
    assert "UNRELIABLE" not in next(line for line in printed.splitlines() if line.startswith("fit model.mask_ratio=0.75"))
    reference = _needs_line(printed, "0")
    assert re.search(r"needs \S+ \S+ \(runs' frontier\), - \(fit\); .*, - \(fit\)$", reference), reference
    masked = _needs_line(printed, "0.75")
    assert re.search(r"\d \S*FLOP \(fit\); .*\d+\.\d+x \(frontier\), - \(fit\)$", masked), masked  # no ratio to an unreliable fit


def test_scaling_fit_prints_no_extrapolation_far_past_the_largest_run(tmp_path, capsys):
    dirs = _fake_runs(tmp_path, {"0": _law(1e5), "0.75": _law(3e5)})
    assert fit_tool.main([*dirs, "--target", "0.895"]) == 0  # error 0.105: the law reaches it only far away
    printed = capsys.readouterr().out
    assert "reaches the target only past 10x its largest run's compute: not printed" in printed
    for group in ("0", "0.75"):
        line = _needs_line(printed, group)
        assert "not reached (runs' frontier), - (fit)" in line and line.endswith("- (frontier), - (fit)"), line


def test_scaling_fit_speed_up_is_not_determined_when_the_reference_starts_at_the_target(tmp_path, capsys):
    dirs = _fake_runs(tmp_path, {"0": _law(1e5), "0.75": _law(1e6)})
    assert fit_tool.main([*dirs, "--target", "0.1"]) == 0  # every run of both groups reaches it
    printed = capsys.readouterr().out
    for group in ("0", "0.75"):
        line = _needs_line(printed, group)
        assert "needs at most" in line, line
        assert ("not determined (the reference's cheapest run already reaches the target) (frontier)" in line), line
    # Where only the masked group's cheapest run reaches it, the ratio is a lower bound.
    cheapest = load_run(tmp_path / "m0.75_100").evals[-1]["zero_shot_top1"]
    assert fit_tool.main([*dirs, "--target", str(cheapest - 1e-9)]) == 0
    printed = capsys.readouterr().out
    assert "needs at most" not in _needs_line(printed, "0") and "not determined" not in printed
    assert re.search(r"needs at most .*: at least \d+\.\d+x \(frontier\)", _needs_line(printed, "0.75")), printed
