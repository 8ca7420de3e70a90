"""`flip-train`: the training entry point.

    flip-train                                   # configs/tiny.yaml: tiny FLIP on synthetic data, CPU
    flip-train --config configs/flip_l16.yaml --run-dir runs/l16 --resume auto train.max_steps=1000
    torchrun --nproc_per_node 8 -m flip_scale.train --config configs/flip_g14.yaml parallel.tp=2

This module is the process around the loop: determinism and the process group before anything
else, the checkpoint to resume chosen once for every rank, the watchdog's failure guard, the dry
run, and the exit codes the Slurm templates read. The loop itself is the Trainer's
(flip_scale/trainer.py, imported here under the same name).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Optional


from . import preemption
from .checkpoint import (
    CheckpointSaveError, IncompatibleCheckpoint, check_compatible, remove_unfinished_saves,
    resolve_resume,
)
from .checkpoint.space import NotEnoughSpace
from .config import Config, ConfigError, collective_timeouts, load_config
from .distributed import init_distributed, needs_cpu_collectives, shutdown
from .models import arch_from_config
from .preflight import check_determinism, describe_plan, plan_run, tokenizer_vocab_if_present
from .runtime import configure_determinism, on_rank0_for_all, setup_logging
from .train_args import default_run_dir, parse_args
from .trainer import Trainer

log = logging.getLogger("flip_scale")

def _resolve_and_check(cfg: Config, resume: Optional[str], run_dir: Path) -> Optional[Path]:
    if resume == "auto":
        remove_unfinished_saves(run_dir)  # the .tmp of a save the last job was stopped in
    checkpoint = resolve_resume(resume, run_dir)
    if checkpoint is not None:
        check_compatible(checkpoint, arch_from_config(cfg.model).to_dict(), asdict(cfg.model))
    return checkpoint


def run(cfg: Config, run_dir: Path, resume: Optional[str] = None, init_from: Optional[str] = None) -> dict:
    # Before the process group and the first CUDA call (cuBLAS reads its workspace setting once).
    check_determinism(cfg)
    configure_determinism(cfg.train.deterministic, cfg.train.device)
    # The long timeout until the first step has finished; the watchdog shortens it then.
    proc = init_distributed(cfg.train.device, collective_timeouts(cfg)[0] / 60, needs_cpu_collectives(cfg.parallel))
    setup_logging(proc.rank)
    preemption.install()  # SIGUSR1: save at the next step boundary and exit preemption.EXIT_CODE
    trainer = None
    try:
        # Rank 0 picks the checkpoint and every rank takes its choice (ranks looking at a shared
        # file system on their own could see different `latest` files); one this run can never
        # load (a newer format, another architecture) is refused before the engine is built.
        checkpoint = on_rank0_for_all(lambda: _resolve_and_check(cfg, resume, Path(run_dir)))
        trainer = Trainer(cfg, run_dir, proc)
        trainer.describe()
        if checkpoint is not None:
            trainer.resume(checkpoint)
        elif resume == "auto":
            log.info("--resume auto: no checkpoint in %s, starting at step 0", run_dir)
        if init_from and checkpoint is None:
            trainer.init_from(init_from)  # a step dir, a run dir or a consolidated dir
        try:
            result = trainer.fit()
        except Exception as error:
            trainer.watchdog.on_failure(error, expected=(ConfigError, FloatingPointError, CheckpointSaveError))
            raise
        trainer.close()  # commits an asynchronous save still pending (fit may return before its end)
        return result
    finally:
        # After a failure a background checkpoint write is let finish but not committed.
        if trainer is not None:
            trainer.checkpoints.abandon()
        shutdown()


def dry_run(cfg: Config, world_size: int) -> str:
    """What `flip-train` would run, checked as the real start would check it (preflight.plan_run)
    without building anything. Raises ConfigError / LayoutError as the real start would."""
    return describe_plan(plan_run(cfg, world_size, tokenizer_vocab_if_present(cfg)))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as error:
        print(f"flip-train: config error: {error}", file=sys.stderr)
        return 2
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(args.config)
    from .parallel.dims import LayoutError

    if args.world_size is not None and not args.dry_run:
        print("flip-train: --world-size goes with --dry-run (a run takes the launcher's world size)", file=sys.stderr)
        return 2
    if args.dry_run:
        from .distributed import slurm_launch_env

        launch = slurm_launch_env(os.environ) or os.environ
        world = args.world_size if args.world_size is not None else int(launch.get("WORLD_SIZE", "1"))
        if world < 1:
            print(f"flip-train: --world-size must be >= 1, got {world}", file=sys.stderr)
            return 2
        try:
            print(dry_run(cfg, world))
        except (ConfigError, LayoutError) as error:
            print(f"flip-train: config error: {error}", file=sys.stderr)
            return 2
        return 0

    # Exit 2 for what fails the same on every try (the Slurm templates never requeue it): an
    # incompatible checkpoint, too little space, a config or layout error found with the world size
    # or the data in hand (data.streams, the tokenizer's size). Exit 1 for a save that failed.
    exits = (((CheckpointSaveError,), "checkpoint error", 1), ((IncompatibleCheckpoint,), "checkpoint error", 2),
             ((NotEnoughSpace,), "run directory error", 2), ((ConfigError, LayoutError), "config error", 2))
    try:
        result = run(cfg, run_dir, resume=args.resume, init_from=args.init_from)
    except tuple(kind for kinds, _, _ in exits for kind in kinds) as error:
        what, code = next((what, code) for kinds, what, code in exits if isinstance(error, kinds))
        print(f"flip-train: {what}: {error}", file=sys.stderr)
        return code
    return preemption.EXIT_CODE if result.get("preempted") else 0


if __name__ == "__main__":
    sys.exit(main())
