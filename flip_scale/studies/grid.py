"""A sweep: a small YAML of a base recipe and a grid of config values, expanded into named runs.

    name: flip_effect                 # optional; default: the file's stem
    base: configs/tiny.yaml           # the recipe every run starts from
    grid:                             # every combination is one run (the first key varies slowest)
      model.mask_ratio: [0, 0.5, 0.75]
      train.max_steps: [75, 150, 300]
    overrides: [eval.at_end=true]     # optional: key=value applied to every run, before the grid's

A run is named by its grid values (`mask_ratio0.75_max_steps150`; the whole dotted key where two
grid keys share a last part) and lives in `<sweep dir>/<name>`. Its compute is the figure
`flip-train --dry-run` prints: training FLOPs per sample (the model's own count, visible tokens
only) x max_steps x global_batch_size.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from ..config import ConfigError, load_config
from ..models.flops import flops_for_config

SWEEP_KEYS = ("name", "base", "grid", "overrides")


class SweepError(ValueError):
    """A sweep file that cannot be expanded; the message says what is wrong and what is valid."""


@dataclass
class Sweep:
    name: str
    base: str
    grid: dict  # dotted key -> list of values, in the file's order
    overrides: list = field(default_factory=list)


@dataclass
class PlannedRun:
    name: str
    run_dir: Path
    overrides: list  # key=value for flip-train: the sweep's overrides, then this run's grid values
    values: dict  # grid key -> this run's value
    max_steps: int
    samples: int
    flops_per_sample: int
    evaluates_at_end: bool = False  # eval.at_end with an evaluation configured: finished needs its record

    def status(self) -> str:
        """run_status of the run; whether it evaluates at the end is read from the config.yaml it
        ran with where there is one (FLIP_ARGS of a Slurm job may have changed it), else the plan's."""
        return run_status(self.run_dir, self.max_steps, _evaluates_at_end(self.run_dir, self.evaluates_at_end))

    @property
    def flops(self) -> float:
        return float(self.samples) * self.flops_per_sample


def parse_sweep(tree, where: str = "sweep") -> Sweep:
    """Check a sweep file's tree and turn it into a `Sweep` (default name: `where`'s stem)."""
    if not isinstance(tree, dict):
        raise SweepError(f"{where}: expected a mapping with keys {', '.join(SWEEP_KEYS)}, got {type(tree).__name__}")
    unknown = sorted(set(tree) - set(SWEEP_KEYS))
    if unknown:
        raise SweepError(f"{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(SWEEP_KEYS)}")
    base = tree.get("base")
    if not isinstance(base, str) or not base:
        raise SweepError(f"{where}: 'base' must name a recipe, e.g. base: configs/tiny.yaml")
    grid = tree.get("grid")
    if not isinstance(grid, dict) or not grid:
        raise SweepError(f"{where}: 'grid' must map config keys to lists of values, e.g. "
                         f"grid: {{model.mask_ratio: [0, 0.5, 0.75]}}")
    for key, values in grid.items():
        if not isinstance(key, str) or "." not in key:
            raise SweepError(f"{where}: grid key '{key}' is not a dotted config key such as model.mask_ratio")
        if not isinstance(values, list) or not values:
            raise SweepError(f"{where}: grid.{key} must be a non-empty list of values, got {values!r}")
        if any(isinstance(v, (dict, list)) for v in values):
            raise SweepError(f"{where}: grid.{key} values must be plain values (numbers, strings), got {values!r}")
        if len({repr(v) for v in values}) < len(values):
            raise SweepError(f"{where}: grid.{key} repeats a value: {values!r}")
        named = {}
        for value in values:
            other = named.setdefault(_name_text(value), value)
            if other is not value:
                raise SweepError(f"{where}: grid.{key} values {other!r} and {value!r} both appear as "
                                 f"'{_name_text(value)}' in run names (floats are named to 6 significant digits); "
                                 f"make them differ there")
    overrides = tree.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise SweepError(f"{where}: 'overrides' must be a list of key=value strings, got {overrides!r}")
    name = tree.get("name") or Path(where).stem
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", str(name)):
        raise SweepError(f"{where}: name '{name}' must be letters, digits, '.', '_' or '-' (it names directories)")
    return Sweep(name=str(name), base=base, grid=dict(grid), overrides=list(overrides))


def load_sweep(path) -> Sweep:
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file {path} not found")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise SweepError(f"{path}: not readable YAML: {error}") from error
    return parse_sweep(tree, str(path))


def _value_text(value) -> str:
    """A grid value as it goes into a key=value override: exact (repr for floats, so optim.lr
    0.0012345678 trains at 0.0012345678)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if value is None:
        return "null"
    return str(value)


def _name_text(value) -> str:
    """A grid value as it goes into a run name: floats short (:g), the characters of a directory name."""
    text = f"{value:g}" if isinstance(value, float) else _value_text(value)
    return re.sub(r"[^A-Za-z0-9._-]", "-", text)


def _short_keys(keys: list[str]) -> dict:
    """Each grid key's name part in run names: its last component, or the whole key where two keys
    share it."""
    leaves = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (leaf if leaves.count(leaf) == 1 else k) for k, leaf in zip(keys, leaves)}


def run_name(values: dict) -> str:
    """`mask_ratio0.75_max_steps150` for {model.mask_ratio: 0.75, train.max_steps: 200}."""
    short = _short_keys(list(values))
    parts = [f"{short[k]}{_name_text(v)}" for k, v in values.items()]
    return re.sub(r"[^A-Za-z0-9._-]", "-", "_".join(parts))


def expand(sweep: Sweep) -> list[dict]:
    """Every combination of the grid, the first key varying slowest: [{key: value, ...}, ...]."""
    keys = list(sweep.grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(sweep.grid[k] for k in keys))]


def plan_sweep(sweep: Sweep, sweep_dir) -> list[PlannedRun]:
    """The runs of the sweep with their directories, flip-train overrides and compute. Every run's
    config is loaded and checked as flip-train would (a bad key or value fails here, naming the run)."""
    sweep_dir = Path(sweep_dir)
    runs = []
    for values in expand(sweep):
        name = run_name(values)
        overrides = [*sweep.overrides, *(f"{k}={_value_text(v)}" for k, v in values.items())]
        try:
            cfg = load_config(sweep.base, overrides)
        except ConfigError as error:
            raise SweepError(f"run {name} ({' '.join(overrides)}): {error}") from error
        samples = cfg.train.max_steps * cfg.train.global_batch_size
        flops = int(flops_for_config(cfg.model, training=True)["total"])
        evaluates = bool(cfg.eval.at_end and (cfg.eval.zero_shot_shards or cfg.eval.retrieval_shards))
        runs.append(PlannedRun(name=name, run_dir=sweep_dir / name, overrides=overrides, values=values,
                               max_steps=cfg.train.max_steps, samples=samples, flops_per_sample=flops,
                               evaluates_at_end=evaluates))
    names = [r.name for r in runs]
    if len(set(names)) < len(names):
        raise SweepError(f"sweep {sweep.name}: two runs get the same name ({names}); make the grid values distinct")
    return runs


def _has_eval_at(run_dir: Path, step: int) -> bool:
    """Whether eval.jsonl holds a complete record of `step`."""
    path = run_dir / "eval.jsonl"
    if not path.is_file():
        return False
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step") == step:
            return True
    return False


def _evaluates_at_end(run_dir: Path, default: bool) -> bool:
    try:
        tree = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
        evaluation = tree["eval"]
        return bool(evaluation["at_end"] and (evaluation.get("zero_shot_shards") or evaluation.get("retrieval_shards")))
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return default


def run_status(run_dir, max_steps: int, evaluates_at_end: bool = False) -> str:
    """'finished', 'partial' (started, resumable with --resume auto) or 'new'.

    Finished: its latest checkpoint is at max_steps and, where the run evaluates at the end
    (eval.at_end with an evaluation configured), eval.jsonl has the record of max_steps. The trainer
    writes the final checkpoint before that evaluation, so a run stopped during it is partial:
    `--resume auto` at max_steps trains no step and runs the final evaluation only."""
    run_dir = Path(run_dir)
    latest = run_dir / "latest"
    step: Optional[int] = None
    if latest.is_file():
        match = re.fullmatch(r"step_(\d+)", latest.read_text().strip())
        if match and (run_dir / match.group(0)).is_dir():
            step = int(match.group(1))
    if step is not None and step >= max_steps and (not evaluates_at_end or _has_eval_at(run_dir, step)):
        return "finished"
    if step is not None or (run_dir / "config.yaml").exists() or (run_dir / "metrics.jsonl").exists():
        return "partial"
    return "new"


def format_flops(flops: float) -> str:
    for unit, scale in (("EFLOP", 1e18), ("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops:.3g} FLOP"


def describe_sweep(sweep: Sweep, runs: list[PlannedRun], statuses: Optional[list[str]] = None) -> str:
    """The plan `tools/sweep.py --dry-run` prints: one line per run and the sweep's total compute."""
    statuses = statuses or ["-"] * len(runs)
    width = max(len(r.name) for r in runs)
    lines = [f"sweep {sweep.name}: {len(runs)} runs of {sweep.base} "
             f"({' x '.join(f'{k} {len(v)}' for k, v in sweep.grid.items())})",
             f"  {'run':<{width}}  {'status':<8}  {'steps':>7}  {'samples':>10}  {'GFLOP/sample':>12}  compute"]
    for run, status in zip(runs, statuses):
        lines.append(f"  {run.name:<{width}}  {status:<8}  {run.max_steps:>7}  {run.samples:>10}  "
                     f"{run.flops_per_sample / 1e9:>12.4f}  {format_flops(run.flops)}")
    total = sum(r.flops for r in runs)
    todo = sum(r.flops for r, s in zip(runs, statuses) if s != "finished")
    lines.append(f"  total compute: {format_flops(total)} ({total:.4g} FLOPs); still to run: {format_flops(todo)}")
    return "\n".join(lines)
