"""`flip-eval`: zero-shot classification and retrieval of any checkpoint, under any layout.

The model is built from the checkpoint's own config with the layout the `parallel.*` overrides give
(one process, or torchrun with FSDP / tensor parallel), the weights are loaded (a training
checkpoint re-shards to the layout; a consolidated one is split on load), and every rank evaluates
its share of the data.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from pathlib import Path

from ..checkpoint import CheckpointError
from ..config import Config, ConfigError, apply_overrides, config_from_dict
from .checkpoint_eval import build_eval_model, evaluate_checkpoint  # noqa: F401 - re-exported
from ..checkpoint import CheckpointSource, open_checkpoint
from .runner import describe, log_values

log = logging.getLogger("flip_scale.evaluation")

EPILOG = """examples:
  flip-eval --checkpoint runs/tiny                 the run's own eval data (its config's eval.* keys)
  flip-eval --checkpoint runs/tiny/step_00000300 --dataset 'data/synthetic/eval-{000000..000000}.tar' \\
      --classnames data/synthetic/classnames.txt --templates data/synthetic/templates.txt \\
      --retrieval 'data/synthetic/eval-{000000..000000}.tar'
  flip-eval --checkpoint exports/l16 --dataset /data/imagenet/val --classnames imagenet_names.txt --templates openai
  flip-eval --checkpoint runs/tiny_mask75 --masked  as in pre-training: the checkpoint's mask ratio on
                                                   the images (the model in its training-time view)
  flip-eval --checkpoint runs/tiny_mask75 --masked-views 4   also the ensemble of 4 complementary masked views
                                                   (FLIP Table 1d), reported beside the full-image numbers
  torchrun --nproc_per_node 4 -m flip_scale.evaluate --checkpoint runs/g14 --dataset /data/imagenet/val \\
      --classnames imagenet_names.txt parallel.dp_shard=2 parallel.tp=2
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="flip-eval",
        description="Zero-shot classification (top-1/top-5) and image-text retrieval (recall@1/5/10) of a checkpoint. "
                    "Options not given fall back to the checkpoint config's eval.* keys; key=value pairs after the "
                    "options override the checkpoint's config (e.g. parallel.tp=2, train.device=cpu).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True,
                        help="a step_XXXXXXXX directory, a run directory (its latest), or a consolidated directory")
    parser.add_argument("--dataset", default=None,
                        help="zero-shot data: an image folder root/<class>/*.jpg, or shards with a cls class "
                             "(a brace pattern or a comma-separated list)")
    parser.add_argument("--classnames", default=None, help="class names, one per line (shards: required; folder: optional)")
    parser.add_argument("--templates", default=None, help="flip_short (7), openai (80), or a file with one {} template per line")
    parser.add_argument("--retrieval", default=None, help="image-caption shards for retrieval recall@k")
    parser.add_argument("--batch-size", type=int, default=None, help="images per batch and rank")
    parser.add_argument("--max-samples", type=int, default=None, help="evaluate the first N samples (0: all)")
    parser.add_argument("--masked", action="store_true",
                        help="remove the checkpoint's model.mask_ratio of the patches, as in training")
    parser.add_argument("--mask-ratio", type=float, default=None, help="with --masked: this ratio instead")
    parser.add_argument("--masked-views", type=int, default=None, metavar="N",
                        help="also evaluate each image as the mean embedding of N masked views with complementary "
                             "masks (eval.masked_views; keys masked_views_N/...)")
    parser.add_argument("--masked-view-ratio", type=float, default=None,
                        help="with --masked-views: each view's mask ratio (default 1 - 1/N: the views tile the image)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. parallel.tp=2 data.num_workers=0")
    return parser.parse_args(argv)


# Evaluation runs the native build whatever engine trained the checkpoint (any engine's weights
# load into it), so the engine's own keys are reset with the layout.
LAYOUT_DEFAULTS = {"dp_replicate": 1, "dp_shard": -1, "tp": 1, "pp": 1, "microbatches": 1, "engine": "fsdp",
                   "offload_optimizer": "none", "offload_params": "none", "nvme_path": "", "deepspeed_config": ""}


def _shards(value: str):
    return [s for s in value.split(",") if s] if "," in value else value


def eval_config(source: CheckpointSource, args: argparse.Namespace) -> Config:
    """The checkpoint's config with the command line's eval options and overrides applied. The
    layout is not the one the checkpoint was trained with but the one `parallel.*` overrides give
    (default: data parallel over the world)."""
    tree = copy.deepcopy(source.config_tree)
    tree["parallel"] = {**tree.get("parallel", {}), **LAYOUT_DEFAULTS}
    tree = apply_overrides(tree, args.overrides)
    eval_tree = tree.setdefault("eval", {})
    if args.dataset is not None:
        eval_tree["zero_shot_shards"] = _shards(args.dataset)
        eval_tree["classnames"] = args.classnames or ""
        if args.retrieval is None:
            eval_tree["retrieval_shards"] = ""
    elif args.classnames is not None:
        eval_tree["classnames"] = args.classnames
    if args.retrieval is not None:
        eval_tree["retrieval_shards"] = _shards(args.retrieval)
        if args.dataset is None:
            eval_tree["zero_shot_shards"] = ""
    for key, value in (("templates", args.templates), ("batch_size", args.batch_size), ("max_samples", args.max_samples),
                       ("masked_views", args.masked_views), ("masked_view_ratio", args.masked_view_ratio)):
        if value is not None:
            eval_tree[key] = value
    # Evaluation keeps no activations for a backward: checkpointing would only cost time.
    tree.setdefault("parallel", {})["activation_checkpointing"] = "none"
    tree["parallel"]["compile"] = False  # one pass over the data: compiling would cost more than it saves
    return config_from_dict(tree)


def check_layout(cfg: Config, world_size: int):
    """The evaluation layout of `cfg.parallel` over `world_size` ranks, or an error saying what is valid."""
    from ..preflight import plan_run

    return plan_run(cfg, world_size, training=False).dims


def main(argv=None) -> int:
    from ..distributed import init_distributed, needs_cpu_collectives, shutdown, slurm_launch_env
    from ..preflight import check_determinism
    from ..runtime import configure_determinism, setup_logging

    args = parse_args(argv)
    try:
        source = open_checkpoint(args.checkpoint)
        cfg = eval_config(source, args)
        launch = slurm_launch_env(os.environ) or os.environ  # torchrun's variables, or an srun task's
        check_layout(cfg, int(launch.get("WORLD_SIZE", "1")))
        check_determinism(cfg)
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as error:
        print(f"flip-eval: {error}", file=sys.stderr)
        return 2
    if not (cfg.eval.zero_shot_shards or cfg.eval.retrieval_shards):
        print("flip-eval: nothing to evaluate: give --dataset and/or --retrieval (the checkpoint's config has no "
              "eval.zero_shot_shards or eval.retrieval_shards)", file=sys.stderr)
        return 2
    mask_ratio = None
    if args.masked and cfg.eval.masked_views:
        print("flip-eval: --masked and --masked-views exclude each other (each view sets its own mask)", file=sys.stderr)
        return 2
    if args.masked:
        mask_ratio = args.mask_ratio if args.mask_ratio is not None else cfg.model.mask_ratio
        if not 0.0 < mask_ratio < 1.0:
            print(f"flip-eval: --masked needs a mask ratio in (0, 1), got {mask_ratio} (the checkpoint was trained "
                  f"unmasked: pass --mask-ratio)", file=sys.stderr)
            return 2
    configure_determinism(cfg.train.deterministic, cfg.train.device)  # before the first CUDA matrix product
    proc = init_distributed(cfg.train.device, cfg.train.collective_timeout_minutes, needs_cpu_collectives(cfg.parallel))
    setup_logging(proc.rank)
    try:
        started = time.perf_counter()
        results = evaluate_checkpoint(source, cfg, proc, mask_ratio)
        if proc.is_main:
            view = f"masked {mask_ratio:.2f}" if mask_ratio else "unmasked"
            print(f"{source.describe()} [{view}, {time.perf_counter() - started:.1f}s]: {describe(results)}", flush=True)
            if args.json:
                record = {"checkpoint": str(source.path), "step": source.step, "mask_ratio": mask_ratio or 0.0,
                          **log_values(results)}
                Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    finally:
        shutdown()
    return 0
