"""A run directory read back for a study: its config, its logged steps and evaluations, and the
three x axes a scaling study plots against (samples seen, training compute, wall-clock).

Compute is the model's own count (`models/flops.py`: forward + backward of the visible tokens only,
so a 75%-masked step costs what it really costs) times the samples seen. Wall-clock is the
time of the logged intervals (each record's samples over its `images_per_s`): start-up, the final
checkpoint and the final evaluation are left out; periodic saves and evaluations inside the run,
and the first step (compilation, warm-up), fall inside an interval and are included. Runs resumed
several times add up their intervals as if they had run at once.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from ..config import ConfigError, config_from_dict, flatten_tree
from ..models.flops import flops_for_config


class RunDirError(ValueError):
    """A run directory that cannot be read for a study (no config.yaml, a config of another version)."""


def read_jsonl_tolerant(path: Path) -> tuple[list[dict], Optional[str]]:
    """The complete records of a JSON-lines file and a note on what was left out (None if nothing).

    A half-written last line (a run killed mid-write, a copy taken while it ran) is dropped with a
    note; so is a broken line in the middle. A missing file is no records and a note.
    """
    path = Path(path)
    if not path.exists():
        return [], f"{path.name} missing"
    records, bad = [], []
    lines = path.read_text(errors="replace").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad.append(number)
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad.append(number)
    if not bad:
        return records, None
    last = records[-1]["step"] if records and "step" in records[-1] else None
    where = "last line" if bad == [len(lines)] else f"line(s) {', '.join(map(str, bad))}"
    upto = f", read up to step {last}" if last is not None else ", no complete record"
    return records, f"{path.name}: {where} incomplete{upto}"


def _kept_after_restarts(records: list[dict]) -> list[dict]:
    """The records of the steps the run kept: a resume from an older checkpoint logs its steps
    again, and the later copy is the one that counts."""
    kept: list[dict] = []
    for record in records:
        step = record.get("step")
        if step is None:
            continue
        while kept and kept[-1]["step"] >= step:
            kept.pop()
        kept.append(record)
    return kept


@dataclass
class Run:
    """One run directory, read."""

    path: Path
    config: dict  # the resolved config tree of config.yaml
    metrics: list[dict]  # metrics.jsonl, complete records of the steps kept, step-ordered
    evals: list[dict]  # eval.jsonl, the same
    flops_per_sample: int  # training FLOPs of one sample (forward + backward, visible tokens only)
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def batch_size(self) -> int:
        return int(self.config["train"]["global_batch_size"])

    @property
    def max_steps(self) -> int:
        return int(self.config["train"]["max_steps"])

    @property
    def last_step(self) -> int:
        return self.metrics[-1]["step"] if self.metrics else 0

    def samples_at(self, step: float) -> float:
        """Samples seen after `step` (every step takes one global batch)."""
        return float(step) * self.batch_size

    def train_seconds(self) -> list[float]:
        """Cumulative training seconds at each metrics record."""
        out, total, previous = [], 0.0, 0.0
        for record in self.metrics:
            samples = record.get("samples_seen", self.samples_at(record["step"]))
            rate = record.get("images_per_s")
            if rate and rate > 0 and math.isfinite(rate):
                total += max(samples - previous, 0.0) / rate
            previous = samples
            out.append(total)
        return out

    def seconds_at(self, step: float) -> float:
        """Training seconds until `step`, interpolated between the logged records."""
        steps = [0.0] + [float(r["step"]) for r in self.metrics]
        seconds = [0.0] + self.train_seconds()
        if step >= steps[-1]:
            if len(steps) < 2 or steps[-1] <= 0:
                return seconds[-1]
            return seconds[-1] * step / steps[-1]  # beyond the last record: at the run's mean rate
        for i in range(1, len(steps)):
            if step <= steps[i]:
                left, right = steps[i - 1], steps[i]
                share = (step - left) / (right - left) if right > left else 1.0
                return seconds[i - 1] + share * (seconds[i] - seconds[i - 1])
        return seconds[-1]

    def x_values(self, records: list[dict], axis: str) -> list[float]:
        """The x coordinate of each record on `axis` (see AXES)."""
        if axis not in AXES:
            raise ValueError(f"x axis '{axis}' is not one of {', '.join(AXES)}")
        steps = [float(r["step"]) for r in records]
        if axis == "step":
            return steps
        if axis == "samples":
            return [self.samples_at(s) for s in steps]
        if axis == "flops":
            return [self.samples_at(s) * self.flops_per_sample for s in steps]
        return [self.seconds_at(s) for s in steps]

    def series(self, metric: str, axis: str) -> tuple[list[float], list[float]]:
        """(x, y) of `metric` from metrics.jsonl or eval.jsonl (wherever it is logged)."""
        records = [r for r in self.metrics if _number(r.get(metric))]
        if not records:
            records = [r for r in self.evals if _number(r.get(metric))]
        return self.x_values(records, axis), [float(r[metric]) for r in records]

    def final(self, metric: str) -> Optional[float]:
        """The metric's last logged value (the last evaluation for evaluation metrics)."""
        _, values = self.series(metric, "step")
        return values[-1] if values else None

    @property
    def compute(self) -> float:
        """Training FLOPs of the steps logged so far."""
        return self.samples_at(self.last_step) * self.flops_per_sample


# x axes: training steps, samples seen, training FLOPs, training wall-clock seconds.
AXES = ("step", "samples", "flops", "time")
AXIS_LABELS = {"step": "training step", "samples": "samples seen", "flops": "training compute (FLOPs)",
               "time": "training wall-clock (s)"}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def train_flops_per_sample(tree: dict, where: str = "config") -> int:
    """Training FLOPs of one sample for a resolved config tree, from the model's own count."""
    try:
        cfg = config_from_dict(tree)
    except ConfigError as error:
        raise RunDirError(f"{where}: not a config this version reads: {error}") from error
    return int(flops_for_config(cfg.model, training=True)["total"])


def load_run(path) -> Run:
    """Read a run directory (config.yaml required; metrics.jsonl and eval.jsonl may be missing or
    cut short: what is complete is read, and `notes` says what was not)."""
    path = Path(path)
    config_path = path / "config.yaml"
    if not config_path.is_file():
        raise RunDirError(f"{path}: no config.yaml (is it a flip-train run directory?)")
    try:
        tree = yaml.safe_load(config_path.read_text()) or {}
    except yaml.YAMLError as error:
        raise RunDirError(f"{config_path}: not readable YAML: {error}") from error
    if not isinstance(tree, dict) or "train" not in tree or "model" not in tree:
        raise RunDirError(f"{config_path}: not a flip-train config (no train/model sections)")
    notes = []
    metrics, note = read_jsonl_tolerant(path / "metrics.jsonl")
    if note:
        notes.append(note)
    evals, note = read_jsonl_tolerant(path / "eval.jsonl")
    if note and metrics:  # a run without evaluations is common; say it only when training was logged
        notes.append(note)
    return Run(path=path, config=tree, metrics=_kept_after_restarts(metrics), evals=_kept_after_restarts(evals),
               flops_per_sample=train_flops_per_sample(tree, str(config_path)), notes=notes)


# Keys that differ between runs without being what the study varies.
IGNORED_KEYS = ("data.synthetic_dir", "data.train_shards", "data.tokenizer", "eval.zero_shot_shards",
                "eval.classnames", "eval.templates", "eval.retrieval_shards", "train.device")


def differing_keys(configs: list[dict], ignore=IGNORED_KEYS) -> list[str]:
    """The dotted config keys whose values are not the same in every one of `configs`, in the
    configs' own order (train.max_steps, model.mask_ratio, ...). Paths to data are ignored."""
    flats = [flatten_tree(c) for c in configs]
    keys: list[str] = []
    for flat in flats:
        keys += [k for k in flat if k not in keys]
    missing = object()
    return [k for k in keys if k not in ignore and len({repr(f.get(k, missing)) for f in flats}) > 1]


def run_labels(runs: list[Run], ignore=IGNORED_KEYS) -> list[str]:
    """A legend label per run naming the values of the keys that differ between the runs
    ("model.mask_ratio=0.75, train.max_steps=200"); the directory name when nothing differs."""
    keys = differing_keys([r.config for r in runs], ignore)
    if not keys:
        return [r.name for r in runs]
    labels = []
    for run in runs:
        flat = flatten_tree(run.config)
        labels.append(", ".join(f"{k}={format_value(flat.get(k))}" for k in keys))
    if len(set(labels)) < len(labels):  # same config twice (a repeat): the directory tells them apart
        labels = [f"{label} ({run.name})" for label, run in zip(labels, runs)]
    return labels


def format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def group_order(value: str):
    """Sort key of group values: numbers by value (0, 0.5, 0.75), then the rest by name."""
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)
