"""The unmasked tuning tool (`tools/unmask_tune.py`): the plan of `flip_scale.unmask.plan`, run as an
ordinary training run (`flip_scale.train.run`), with the run directory's records and the report.

    python tools/unmask_tune.py --from runs/tiny --run-dir runs/tiny_unmask [key=value ...]

Resumable like any run: `--resume auto` continues the tuning run directory's latest checkpoint
(the plan is rebuilt from the source recorded in RUN_DIR/unmask_tune.json). Preemptible like
`flip-train` (flip_scale/preemption.py), from either kind of source: SIGUSR1 stops it after the
step in progress with a checkpoint of that step, and the tool exits preemption.EXIT_CODE (42), on
which slurm/common.sh requeues the job. `--report` also prints zero-shot accuracy before tuning
with masking (as in pre-training), before tuning unmasked, and after tuning unmasked
(RUN_DIR/unmask_report.json: the "before" part as soon as it is measured, so that a requeued run
does not measure it again, the "after" part when the tuning has run to its end).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
from pathlib import Path

import torch

from .. import preemption
from ..checkpoint import CheckpointError, find_latest
from ..config import ConfigError, config_from_dict
from ..distributed import init_distributed, needs_cpu_collectives, slurm_launch_env
from ..evaluation import evaluate_checkpoint
from ..checkpoint import CheckpointSource, open_checkpoint
from ..runtime import configure_determinism, setup_logging, write_json_atomic
from ..train import run
from .plan import DEFAULT_OVERLAY, MEMORY_MODES, TuningPlan, _samples, format_report, plan_tuning

RECORD_FILE = "unmask_tune.json"
REPORT_FILE = "unmask_report.json"

EPILOG = """examples:
  python tools/unmask_tune.py --from runs/tiny_mask75 --run-dir runs/tiny_mask75_unmask --report
  python tools/unmask_tune.py --from runs/l16/step_00190000 --run-dir runs/l16_unmask --dry-run --world-size 256
  python tools/unmask_tune.py --from exports/l16 --run-dir runs/l16_unmask --samples 64e6 train.global_batch_size=32768
  torchrun --nproc_per_node 8 tools/unmask_tune.py --from runs/g14 --run-dir runs/g14_unmask --resume auto parallel.tp=2
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="unmask_tune",
        description="Unmasked tuning of a FLIP checkpoint: mask ratio 0, fresh optimizer, the tuning schedule in "
                    "samples, the checkpoint's config otherwise (key=value pairs after the options override it). "
                    "See flip_scale/unmask/plan.py for the rules.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--from", dest="source", required=True,
                        help="checkpoint to tune: step_XXXXXXXX dir, run dir (its latest), or consolidated dir")
    parser.add_argument("--run-dir", required=True, help="the tuning run directory")
    parser.add_argument("--resume", choices=["auto"], default=None,
                        help="auto: continue the tuning run directory's latest checkpoint (or start if it has none)")
    parser.add_argument("--samples", type=_samples, default=None,
                        help="tuning length in samples (default 128M, at most 10%% of the samples the checkpoint saw)")
    parser.add_argument("--warmup-samples", type=_samples, default=None,
                        help="warmup in samples (default 25.6M, at most 20%% of the length)")
    parser.add_argument("--base-lr", type=float, default=None,
                        help="lr per 256 samples (default: 1%% of the pre-training's, = 4e-8 for the paper's recipes)")
    parser.add_argument("--mask-ratio", type=float, default=None,
                        help="the mask ratio the source was pre-trained with (default: what the checkpoint records: "
                             "0 for weights converted from OpenCLIP unless patch_dropout, else its model.mask_ratio)")
    parser.add_argument("--memory", choices=MEMORY_MODES, default="auto",
                        help="how to pay for the unmasked images' extra activations (default auto; rules in "
                             "flip_scale/unmask/plan.py)")
    parser.add_argument("--overlay", default=str(DEFAULT_OVERLAY), help="YAML put over the checkpoint's config")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    parser.add_argument("--world-size", type=int, default=None,
                        help="with --dry-run: plan for this many ranks (default: the launcher's WORLD_SIZE, else 1), "
                             "e.g. on a login node before submitting")
    parser.add_argument("--report", action="store_true",
                        help="zero-shot accuracy before tuning (masked and unmasked) and after tuning (unmasked)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.global_batch_size=32768")
    return parser.parse_args(argv)


def _source_from_record(record: dict) -> CheckpointSource:
    src = record["source"]
    return CheckpointSource(src["kind"], Path(src["path"]), src["config"], src.get("step"), src.get("samples_seen"),
                            src.get("provenance"), src.get("pretraining_mask_ratio"))


def _record(plan: TuningPlan, args: argparse.Namespace) -> dict:
    s = plan.source
    return {
        "source": {"kind": s.kind, "path": str(s.path.resolve()), "step": s.step, "samples_seen": s.samples_seen,
                   "config": s.config_tree, "provenance": s.provenance, "pretraining_mask_ratio": s.pretraining_mask_ratio},
        "arguments": {"samples": args.samples, "warmup_samples": args.warmup_samples, "base_lr": args.base_lr,
                      "mask_ratio": args.mask_ratio,
                      "memory": args.memory, "overrides": list(args.overrides)},
        "plan": plan.lines,
        "changes": {k: [old, new] for k, (old, new) in plan.changes().items()},
    }


def evaluate_source(plan: TuningPlan) -> tuple:
    """Zero-shot/retrieval of the source weights, masked as in pre-training and unmasked, on the
    tuning run's layout and eval data -> (results, the device). A source trained unmasked is
    evaluated unmasked only ("masked": None). Leaves the process group up for the tuning run."""
    cfg = dataclasses.replace(plan.cfg, parallel=dataclasses.replace(plan.cfg.parallel, activation_checkpointing="none",
                                                                     compile=False))
    proc = init_distributed(cfg.train.device, cfg.train.collective_timeout_minutes, needs_cpu_collectives(cfg.parallel))
    setup_logging(proc.rank)
    ratio = plan.source_mask_ratio
    if ratio is None:
        ratio = config_from_dict(plan.source.config_tree).model.mask_ratio
    views = {"masked": ratio, "unmasked": None} if ratio else {"unmasked": None}
    results = evaluate_checkpoint(plan.source, cfg, proc, views=views)  # builds the model and lets it go
    gc.collect()  # FSDP-wrapped modules sit in reference cycles: free them before the tuning model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"mask_ratio": ratio, "masked": results.get("masked"), "unmasked": results["unmasked"]}, proc.device


def main(argv=None) -> int:
    args = parse_args(argv)
    run_dir = Path(args.run_dir)
    launch = slurm_launch_env(os.environ) or os.environ  # torchrun's variables, or an srun task's
    rank, world_size = int(launch.get("RANK", "0")), int(launch.get("WORLD_SIZE", "1"))
    if args.world_size is not None:
        if not args.dry_run:
            print("unmask_tune: --world-size plans a run elsewhere and goes with --dry-run (a real run takes the "
                  "launcher's world size)", file=sys.stderr)
            return 2
        if args.world_size < 1:
            print(f"unmask_tune: --world-size must be >= 1, got {args.world_size}", file=sys.stderr)
            return 2
        world_size = args.world_size
    record_file, report_file = run_dir / RECORD_FILE, run_dir / REPORT_FILE
    try:
        existing = find_latest(run_dir) if run_dir.is_dir() else None
        if existing is not None and args.resume is None:
            raise CheckpointError(f"{run_dir} already holds tuning checkpoints (latest {existing.name}); pass "
                                  f"--resume auto to continue it, or choose another --run-dir")
        resuming = existing is not None
        if resuming and record_file.is_file():
            source = _source_from_record(json.loads(record_file.read_text()))
            if rank == 0:
                print(f"unmask_tune: resuming {run_dir} (tuning of {source.path}, recorded in {record_file})", flush=True)
        else:
            source = open_checkpoint(args.source)
        plan = plan_tuning(source, args.samples, args.warmup_samples, args.base_lr, args.memory, args.overrides,
                           world_size, args.overlay, mask_ratio=args.mask_ratio)
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as error:
        print(f"unmask_tune: {error}", file=sys.stderr)
        return 2
    if rank == 0:
        print(plan.describe(), flush=True)
    if args.dry_run:
        return 0
    # Before the evaluation of the source (its matrix products create the cuBLAS handle, which reads
    # the workspace setting once); plan_tuning refused a workspace value it would not take.
    configure_determinism(plan.cfg.train.deterministic, plan.cfg.train.device)
    if args.report:
        # A SIGUSR1 during the evaluation before tuning is a preemption request too (checked right
        # after it; flip_scale/train.run installs the handler afresh for the tuning).
        preemption.install()
    if rank == 0 and not resuming:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(record_file, _record(plan, args))

    cfg = plan.cfg
    report = None
    if args.report:
        if not (cfg.eval.zero_shot_shards or cfg.eval.retrieval_shards):
            print("unmask_tune: --report needs eval data: set eval.zero_shot_shards (and eval.classnames)", file=sys.stderr)
            return 2
        saved = json.loads(report_file.read_text()) if report_file.is_file() else {}
        if saved.get("source") == str(source.path.resolve()) and saved.get("before"):
            before = saved["before"]
        else:
            before, device = evaluate_source(plan)
            if rank == 0:  # kept at once: a requeued run does not evaluate the source again
                run_dir.mkdir(parents=True, exist_ok=True)
                write_json_atomic(report_file, {"source": str(source.path.resolve()), "before": before})
            if preemption.requested(device):  # during the evaluation: nothing trained, nothing lost
                if rank == 0:
                    print(f"unmask_tune: preempted during the evaluation before tuning (kept in {report_file}); "
                          f"continue with --resume auto (exit code {preemption.EXIT_CODE})", flush=True)
                return preemption.EXIT_CODE
        report = {"source": str(source.path.resolve()), "before": before}
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, at_end=True))

    # --init-from takes training checkpoints and consolidated directories alike, into any layout.
    result = run(cfg, run_dir, resume="auto" if resuming else None, init_from=None if resuming else str(source.path))

    if result.get("preempted"):
        # As flip-train: the checkpoint of the step it stopped at is complete; exit EXIT_CODE so that
        # the batch script requeues and `--resume auto` continues. A partial run has no "after".
        if rank == 0:
            note = (f"; --report: {report_file} holds the 'before' part, the 'after' part comes when the resumed "
                    f"run finishes") if report is not None else ""
            print(f"unmask_tune: preempted after step {result.get('step')} of {cfg.train.max_steps} with its checkpoint "
                  f"in {run_dir}; continue with --resume auto (exit code {preemption.EXIT_CODE}){note}", flush=True)
        return preemption.EXIT_CODE
    if report is not None and rank == 0:
        report["after"] = {key: result[key] for key in ("zero_shot", "retrieval") if key in result}
        report["tuning_steps"] = result.get("step")
        report["tuning_mask_ratio"] = cfg.model.mask_ratio
        write_json_atomic(report_file, report)
        print(format_report(report), flush=True)
    return 0
