#!/usr/bin/env python
"""Run a grid of flip-train runs: expand a sweep YAML into named run directories, then run them here
one after another (--local), submit them as one Slurm job array through a slurm/ template (--slurm),
or only print the plan with each run's compute and the sweep's total (--dry-run).

    python tools/sweep.py configs/sweeps/flip_effect.yaml --dry-run
    python tools/sweep.py configs/sweeps/flip_effect.yaml --local              # runs/sweeps/flip_effect/<run>
    python tools/sweep.py configs/sweeps/flip_effect.yaml --local train.device=cpu   # + overrides for every run
    python tools/sweep.py my_sweep.yaml --slurm slurm/flip_b16.sh --sbatch-args="-p gpu --time=4:00:00"
    python tools/sweep.py my_sweep.yaml --slurm slurm/flip_b16.sh --dry-run    # the array script and sbatch command

The sweep file (keys base, grid, name, overrides; flip_scale/studies/grid.py):

    name: flip_effect
    base: configs/tiny.yaml
    grid: {model.mask_ratio: [0, 0.5, 0.75], train.max_steps: [75, 150, 300]}

Resumable: a finished run (its latest checkpoint at train.max_steps and, where it evaluates at the
end, the evaluation of that step in eval.jsonl) is skipped, a half one is continued with
`--resume auto` (at max_steps that runs the final evaluation only); call it again after an
interruption. Under --slurm array task i runs the i-th unfinished run: the generated script sets
RUN_DIR, FLIP_CONFIG and FLIP_ARGS and runs the template, which resumes from `latest` as any of our
Slurm jobs does. FLIP_ARGS from the submitting environment is prepended to each run's overrides
inside the job; the plan and compute printed here do not reflect it (pass such overrides on this
command line instead to see them in the plan). --slurm refuses to submit while jobs named after the
sweep are still queued or running (squeue -h -n NAME; --force submits anyway).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from flip_scale.config import ConfigError, resolve_config_path  # noqa: E402
from flip_scale.studies.grid import (  # noqa: E402
    PlannedRun,
    Sweep,
    SweepError,
    describe_sweep,
    load_sweep,
    plan_sweep,
)

# Template lines the array script sets itself (a name for the sweep, one log per array task).
OWN_SBATCH_OPTIONS = ("--job-name", "-J", "--output", "-o", "--error", "-e", "--array", "-a")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tools/sweep.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="the sweep YAML (keys: base, grid, name, overrides)")
    parser.add_argument("overrides", nargs="*", help="key=value for every run (before the grid's values)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--local", action="store_true", help="run the unfinished runs here, one after another")
    mode.add_argument("--slurm", metavar="TEMPLATE", help="submit the unfinished runs as one job array through this "
                                                          "slurm/*.sh template")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and compute (with --slurm: write the "
                                                               "array script and print the sbatch command) only")
    parser.add_argument("--sweep-dir", help="where the run directories go (default runs/sweeps/<name>)")
    parser.add_argument("--sbatch-args", default="", help="extra sbatch options, e.g. \"-p gpu --time=2:00:00\"")
    parser.add_argument("--force", action="store_true", help="--slurm: submit even while jobs named after the "
                                                            "sweep are queued or running (squeue -h -n NAME)")
    parser.add_argument("--max-parallel", type=int, default=0, help="--slurm: at most this many array tasks at "
                                                                    "once (sbatch --array=0-N%%M; 0: no limit)")
    args = parser.parse_intermixed_args(argv)  # overrides may follow the options
    if not (args.local or args.slurm or args.dry_run):
        parser.error("choose --dry-run, --local or --slurm TEMPLATE")
    if args.max_parallel < 0:
        parser.error(f"--max-parallel must be 0 (no limit) or more, got {args.max_parallel}")
    return args


def train_command(base: Path, run: PlannedRun) -> list[str]:
    """flip-train's own entry for one run, resuming what is there."""
    return [sys.executable, "-u", "-m", "flip_scale.train", "--config", str(base), "--run-dir", str(run.run_dir),
            "--resume", "auto", *run.overrides]


def train_env() -> dict:
    """This environment, with this repository first on PYTHONPATH (the flip_scale the tool imports)."""
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=str(REPO) + (os.pathsep + path if path else ""))


def run_local(base: Path, runs: list[PlannedRun], statuses: list[str]) -> int:
    failed = []
    for index, (run, status) in enumerate(zip(runs, statuses), 1):
        prefix = f"[{index}/{len(runs)}] {run.name}"
        if status == "finished":
            print(f"{prefix}: finished, skipped", flush=True)
            continue
        run.run_dir.mkdir(parents=True, exist_ok=True)
        log = run.run_dir / "sweep.log"
        print(f"{prefix}: {'resuming' if status == 'partial' else 'starting'} ({' '.join(run.overrides)}); "
              f"log {log}", flush=True)
        with open(log, "a") as out:
            code = subprocess.run(train_command(base, run), stdout=out, stderr=subprocess.STDOUT,
                                  env=train_env()).returncode
        state = run.status()
        if code != 0 or state != "finished":
            failed.append(run.name)
            print(f"{prefix}: FAILED (exit code {code}, {state}); the last lines of {log}:\n"
                  + "\n".join(log.read_text(errors="replace").splitlines()[-15:]), flush=True)
        else:
            print(f"{prefix}: finished", flush=True)
    if failed:
        print(f"sweep: {len(failed)} run(s) failed: {', '.join(failed)}; call again to resume them", file=sys.stderr)
        return 1
    print(f"sweep: all {len(runs)} runs finished")
    return 0


def template_sbatch_lines(template: Path) -> list[str]:
    """The template's #SBATCH lines, less the ones the array script sets itself."""
    lines = []
    for line in template.read_text().splitlines():
        if not line.startswith("#SBATCH"):
            continue
        option = line[len("#SBATCH"):].strip().split("=", 1)[0].split(" ", 1)[0]
        if option not in OWN_SBATCH_OPTIONS:
            lines.append(line)
    return lines


def array_script(sweep: Sweep, base: Path, template: Path, runs: list[PlannedRun], sweep_dir: Path) -> str:
    """The batch script of the job array: task i exports run i's RUN_DIR and overrides, then sources
    the template (which sources slurm/common.sh and launches flip-train with --resume auto)."""
    for run in runs:
        spaced = [o for o in run.overrides if any(ch.isspace() for ch in o)]
        if spaced:
            raise SweepError(f"run {run.name}: override(s) {spaced} contain whitespace, which FLIP_ARGS cannot carry "
                             f"(the templates split it on spaces)")
    cases = [f"  {i}) RUN_DIR={shlex.quote(str(run.run_dir))}; FLIP_SWEEP_ARGS={shlex.quote(' '.join(run.overrides))} ;;"
             for i, run in enumerate(runs)]
    inside_repo = template.resolve().parent == (REPO / "slurm").resolve()
    source = f'"$FLIP_HOME/slurm/{template.name}"' if inside_repo else shlex.quote(str(template.resolve()))
    return "\n".join([
        "#!/bin/bash",
        f"# Generated by tools/sweep.py: sweep {sweep.name}, {len(runs)} runs of {base} through {template.name}.",
        "# Array task i runs run i: its RUN_DIR and overrides (after FLIP_ARGS of the submitting environment),",
        "# then the template as a single job would (flip-train --resume auto: a requeued or resubmitted task resumes).",
        *template_sbatch_lines(template),
        f"#SBATCH --job-name={sweep.name}",
        f"#SBATCH --output={sweep_dir}/%x-%A_%a.out",
        'case "${SLURM_ARRAY_TASK_ID:-}" in',
        *cases,
        f'  *) echo "flip_scale sweep {sweep.name}: no run for array task \'${{SLURM_ARRAY_TASK_ID:-}}\' (tasks 0-{len(runs) - 1}; '
        'submit with sbatch --array)" >&2; exit 2 ;;',
        "esac",
        "export RUN_DIR",
        f"export FLIP_CONFIG={shlex.quote(str(base))}",
        'export FLIP_ARGS="${FLIP_ARGS:+$FLIP_ARGS }$FLIP_SWEEP_ARGS"',
        f"export FLIP_HOME=${{FLIP_HOME:-{shlex.quote(str(REPO))}}}",
        f"source {source}",
        "",
    ])


def sbatch_command(script: Path, count: int, sbatch_args: str, max_parallel: int) -> list[str]:
    array = f"0-{count - 1}" + (f"%{max_parallel}" if max_parallel else "")
    return ["sbatch", "--parsable", f"--array={array}", *shlex.split(sbatch_args), str(script)]


def queued_jobs(name: str) -> list[str]:
    """Ids and states of this user's queued or running jobs named `name` (`squeue -h -n NAME`); []
    where squeue is not installed (sbatch would say so)."""
    if shutil.which("squeue") is None:
        return []
    proc = subprocess.run(["squeue", "-h", "--me", "-n", name, "-o", "%i %T"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SweepError(f"squeue -h --me -n {name} failed (exit code {proc.returncode}): {proc.stderr.strip()}; "
                         f"cannot tell whether an earlier array of this sweep is queued (--force submits anyway)")
    return [line.strip() for line in proc.stdout.splitlines() if line.strip()]


def run_slurm(sweep, base, template: Path, runs, statuses, sweep_dir: Path, args) -> int:
    if not template.is_file():
        print(f"sweep: --slurm {template}: no such template (the templates are slurm/*.sh)", file=sys.stderr)
        return 2
    todo = [run for run, status in zip(runs, statuses) if status != "finished"]
    if not todo:
        print(f"sweep: all {len(runs)} runs finished; nothing to submit")
        return 0
    if not args.force:
        try:
            queued = queued_jobs(sweep.name)
        except SweepError as error:
            if not args.dry_run:
                raise
            queued = []
            print(f"note: {error}")
        if queued:
            print(f"sweep: jobs of sweep {sweep.name} are still queued or running ({', '.join(queued)}): a new "
                  f"array would run their unfinished runs a second time into the same directories. Wait for them "
                  f"(or scancel them), or submit anyway with --force", file=sys.stderr)
            return 1
    sweep_dir.mkdir(parents=True, exist_ok=True)
    script = sweep_dir / "sweep_array.sh"
    script.write_text(array_script(sweep, base, template, todo, sweep_dir))
    command = sbatch_command(script, len(todo), args.sbatch_args, args.max_parallel)
    print(f"array script: {script} ({len(todo)} tasks; {len(runs) - len(todo)} finished runs left out)")
    print("command: " + " ".join(shlex.quote(c) for c in command))
    if args.dry_run:
        return 0
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"sweep: sbatch failed (exit code {proc.returncode}): {proc.stderr.strip()}", file=sys.stderr)
        return 1
    job = proc.stdout.strip().split(";")[0]
    print(f"submitted job array {job}: logs {sweep_dir}/{sweep.name}-{job}_<task>.out")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        sweep = load_sweep(args.sweep)
        base = resolve_config_path(sweep.base).resolve()
        sweep.overrides = [*sweep.overrides, *args.overrides]
        sweep_dir = Path(args.sweep_dir or Path("runs") / "sweeps" / sweep.name).resolve()
        runs = plan_sweep(sweep, sweep_dir)
    except (SweepError, ConfigError) as error:
        print(f"sweep: {error}", file=sys.stderr)
        return 2
    statuses = [run.status() for run in runs]
    print(describe_sweep(sweep, runs, statuses), flush=True)
    if args.slurm:
        try:
            return run_slurm(sweep, base, Path(args.slurm), runs, statuses, sweep_dir, args)
        except SweepError as error:
            print(f"sweep: {error}", file=sys.stderr)
            return 2
    if args.dry_run:
        return 0
    return run_local(base, runs, statuses)


if __name__ == "__main__":
    sys.exit(main())
