"""Scaling studies: run directories read back (`runs`), sweeps expanded into named runs (`grid`),
power-law fits and the compute-optimal frontier (`fit`), and their figures (`plots`).

Imported by tools/plot_runs.py, tools/sweep.py and tools/scaling_fit.py only; it imports the
config and the model's FLOPs count, nothing of training.
"""

from .fit import FitError, PowerLawFit, fit_power_law, frontier, interpolated_compute_for
from .grid import PlannedRun, Sweep, SweepError, describe_sweep, expand, load_sweep, parse_sweep, plan_sweep, run_name, run_status
from .runs import AXES, Run, RunDirError, differing_keys, load_run, read_jsonl_tolerant, run_labels

__all__ = [
    "AXES", "FitError", "PlannedRun", "PowerLawFit", "Run", "RunDirError", "Sweep", "SweepError", "describe_sweep",
    "differing_keys", "expand", "fit_power_law", "frontier", "interpolated_compute_for", "load_run", "load_sweep",
    "parse_sweep", "plan_sweep", "read_jsonl_tolerant", "run_labels", "run_name", "run_status",
]
