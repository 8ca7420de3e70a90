"""`flip-train`'s command line: its options, examples and default run directory (flip_scale/train.py
runs what they ask for)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

EPILOG = """examples:
  flip-train                                      tiny FLIP on synthetic data (CPU, a few minutes)
  flip-train --config configs/flip_b16.yaml --run-dir runs/b16 data.train_shards='/data/{00000..01023}.tar'
  flip-train --resume auto --run-dir runs/tiny    continue from the last complete checkpoint
  torchrun --nproc_per_node 4 -m flip_scale.train parallel.dp_shard=4
  flip-train --config configs/flip_g14.yaml --dry-run --world-size 256 parallel.tp=2   check before sbatch
  flip-train checkpoint.every_steps=0             no periodic checkpoints: only the final one and preemption saves
  flip-train parallel.pp=2                        pipeline micro-batches default to 2 x parallel.pp (logged)
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="flip-train",
        description="Train a FLIP model. Overrides are key.sub=value pairs after the options.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default=None, help="YAML recipe (default: configs/tiny.yaml)")
    parser.add_argument("--run-dir", default=None, help="run directory (default: runs/<recipe name>)")
    parser.add_argument("--resume", default=None, help="'auto' (latest complete checkpoint of the run directory, if any) or a checkpoint path")
    parser.add_argument("--init-from", default=None, help="start from the weights of this checkpoint (fresh optimizer and step)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the config and the layout for --world-size ranks, print the plan, and exit "
                             "(nothing is built or written; the model is counted on the meta device)")
    parser.add_argument("--world-size", type=int, default=None,
                        help="with --dry-run: the number of ranks of the job (default: the launcher's, else 1)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.max_steps=100 model.mask_ratio=0.75")
    return parser.parse_args(argv)


def default_run_dir(config_path: Optional[str]) -> Path:
    name = Path(config_path).stem if config_path else "tiny"
    return Path("runs") / name
