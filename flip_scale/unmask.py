"""Unmasked tuning (FLIP paper section 4.1 / A.1): continue a masked pre-training briefly with mask
ratio 0, so that the model meets whole images once before it is used on them.

    python tools/unmask_tune.py --from runs/tiny --run-dir runs/tiny_unmask [key=value ...]

The tuning run is an ordinary training run (`flip_scale.train.run`) with:
  - the weights of the checkpoint (a step_XXXXXXXX directory, a run directory's latest, or a
    consolidated / OpenCLIP-converted directory), a fresh optimizer and step 0;
  - the checkpoint's own config (its config.yaml), with `configs/unmask_tune.yaml` on top
    (mask ratio 0, cosine schedule) and the values below; key=value overrides win over all;
  - the tuning schedule, given in samples and turned into steps of the global batch B:
      length  --samples, default the paper's 128M samples (0.32 epoch of LAION-400M), clamped to
              10% of the samples the checkpoint was trained on where that is known (a toy run
              of 38k samples is not tuned for 128M);
      warmup  --warmup-samples, default the paper's 25.6M, at most 20% of the length (the
              paper's proportion);
      lr      --base-lr per 256 samples (lr = base x B / 256), default 1% of the pre-training
              peak lr at batch B: the paper's ratio (4e-8 vs 4e-6 per 256), which is exactly
              the paper's 4e-8 per 256 for the paper's recipes and stays meaningful for recipes
              with another pre-training lr;
  - memory: an unmasked image has f = (1 + L) / (1 + visible) times the tokens of a masked one
    (f = 3.9 for L/16 at 75%, 2.0 at 50%), and activation memory grows about as much. Rule
    (`--memory auto`): if activation checkpointing is not already `full`, switch it to `full`
    (a block then keeps only its input for the backward instead of a dozen activations of that
    size, which covers f <= 4; beyond that it also raises optim.grad_accum_steps by ceil(f / 4));
    if it already is, raise optim.grad_accum_steps by ceil(f) (to a
    value that divides the per-rank batch) so each micro-batch holds as many tokens as before;
    the two-pass feature cache keeps the global-batch loss exact. `--memory accum` always raises
    the accumulation, `--memory checkpointing` only switches checkpointing on, `--memory keep`
    changes nothing. The tool prints what it chose and why.

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
import copy
import dataclasses
import gc
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from . import preemption
from .checkpoint import CheckpointError, find_latest
from .config import (
    CONFIG_DIR, Config, ConfigError, apply_overrides, config_from_dict, effective_lr, flatten_tree,
    load_yaml_tree, merge_trees,
)
from .evaluation.checkpoints import CheckpointSource, load_weights, open_checkpoint
from .models import arch_from_config
from .models.masking import visible_count

log = logging.getLogger("flip_scale.unmask")

PAPER_SAMPLES = 128_000_000  # 0.32 epoch of LAION-400M
PAPER_WARMUP_SAMPLES = 25_600_000
PAPER_LR_RATIO = 4e-8 / 4e-6  # tuning base lr / pre-training base lr
MAX_FRACTION_OF_PRETRAINING = 0.1  # default length at most this fraction of the samples seen
MAX_WARMUP_FRACTION = PAPER_WARMUP_SAMPLES / PAPER_SAMPLES  # 0.2
DEFAULT_OVERLAY = CONFIG_DIR / "unmask_tune.yaml"
RECORD_FILE = "unmask_tune.json"
REPORT_FILE = "unmask_report.json"
MEMORY_MODES = ("auto", "accum", "checkpointing", "keep")

EPILOG = """examples:
  python tools/unmask_tune.py --from runs/tiny_mask75 --run-dir runs/tiny_mask75_unmask --report
  python tools/unmask_tune.py --from runs/l16/step_00190000 --run-dir runs/l16_unmask --dry-run --world-size 256
  python tools/unmask_tune.py --from exports/l16 --run-dir runs/l16_unmask --samples 64e6 train.global_batch_size=32768
  torchrun --nproc_per_node 8 tools/unmask_tune.py --from runs/g14 --run-dir runs/g14_unmask --resume auto parallel.tp=2
"""


# ----------------------------------------------------------------------------- the plan


@dataclass
class TuningPlan:
    cfg: Config
    source: CheckpointSource
    lines: list = field(default_factory=list)  # what was chosen, and why

    def changes(self) -> dict:
        """dotted key -> (checkpoint's value, tuning value) for every key that differs."""
        before, after = flatten_tree(config_from_dict(self.source.config_tree).to_dict()), flatten_tree(self.cfg.to_dict())
        return {k: (before.get(k), after[k]) for k in sorted(after) if before.get(k) != after[k]}

    def describe(self) -> str:
        out = [f"unmasked tuning of {self.source.describe()}"]
        out += [f"  {line}" for line in self.lines]
        out.append("  config changes (everything else is the checkpoint's config):")
        out += [f"    {key}: {old!r} -> {new!r}" for key, (old, new) in self.changes().items()]
        return "\n".join(out)


def _set(tree: dict, dotted: str, value) -> None:
    node = tree
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def _samples(value: str) -> int:
    """A sample count: 128000000, 128e6 or 128M / 25.6M / 512k."""
    text = str(value).strip().lower().replace("_", "").replace(",", "")
    scale = {"k": 1_000, "m": 1_000_000, "b": 1_000_000_000}.get(text[-1:], 1)
    try:
        number = float(text[:-1] if scale > 1 else text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not a sample count (e.g. 128000000, 128e6, 128M, 25.6M)") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"a sample count must be >= 0, got {value}")
    return int(round(number * scale))


def token_growth(arch, mask_ratio: float) -> float:
    """Image tokens per unmasked image / per masked image (CLS included)."""
    return (1 + arch.num_patches) / (1 + visible_count(arch.num_patches, mask_ratio))


def _accum_choice(cfg: Config, world_size: int, wanted: int) -> tuple[int, str]:
    """The smallest grad_accum_steps >= wanted that the layout and batch allow."""
    from .parallel import ParallelDims

    dims = ParallelDims.from_config(cfg.parallel, world_size, arch_from_config(cfg.model))
    per_rank = cfg.train.global_batch_size // dims.dp_size
    limit = max(1, per_rank // cfg.parallel.microbatches)
    for accum in range(wanted, limit + 1):
        if per_rank % (cfg.parallel.microbatches * accum) == 0:
            return accum, ""
    return limit, (f" (capped at {limit}: one sample per micro-batch of the {per_rank}-sample per-rank batch; "
                   f"memory per micro-batch cannot shrink further)")


# Full activation checkpointing keeps one input per block instead of about a dozen activations of
# its size: it pays for up to about this many times the tokens (module docstring).
FULL_AC_COVERS = 4.0


def memory_plan(cfg: Config, source_mask_ratio: float, mode: str, world_size: int) -> tuple[dict, list]:
    """(dotted key -> value, explanation lines) of the memory rule (module docstring)."""
    if mode not in MEMORY_MODES:
        raise ConfigError(f"--memory {mode}: choose one of {', '.join(MEMORY_MODES)}")
    arch = arch_from_config(cfg.model)
    growth = token_growth(arch, source_mask_ratio)
    masked_tokens = 1 + visible_count(arch.num_patches, source_mask_ratio)
    head = (f"memory: {masked_tokens} -> {1 + arch.num_patches} image tokens per image when unmasked "
            f"(x{growth:.2f}, mask ratio {source_mask_ratio:g} -> 0)")
    ac = cfg.parallel.activation_checkpointing
    accum = cfg.optim.grad_accum_steps
    if growth <= 1.0 or mode == "keep":
        why = "the checkpoint was trained unmasked" if growth <= 1.0 else "--memory keep"
        return {}, [f"{head}: layout and accumulation kept ({why})"]
    mode_given = mode
    if mode == "auto":
        mode = "checkpointing" if ac != "full" else "accum"
    if mode == "checkpointing":
        if ac == "full":
            return {}, [f"{head}: activation checkpointing is already full; nothing more to switch on "
                        f"(--memory accum would raise optim.grad_accum_steps by {math.ceil(growth)})"]
        if growth <= FULL_AC_COVERS or mode_given == "checkpointing":
            return ({"parallel.activation_checkpointing": "full"},
                    [f"{head}: activation checkpointing {ac} -> full (each block keeps only its input for the backward, "
                     f"which saves more than the x{growth:.2f} the extra tokens cost); grad_accum_steps kept at {accum}"])
        # Beyond what full checkpointing covers: the rest by accumulation.
        chosen, note = _accum_choice(cfg, world_size, accum * math.ceil(growth / FULL_AC_COVERS))
        return ({"parallel.activation_checkpointing": "full", "optim.grad_accum_steps": chosen},
                [f"{head}: activation checkpointing {ac} -> full (covers about x{FULL_AC_COVERS:g}) and "
                 f"optim.grad_accum_steps {accum} -> {chosen} (x ceil({growth:.2f} / {FULL_AC_COVERS:g})) for the "
                 f"rest{note}; global batch kept, the feature cache keeps the loss exact"])
    wanted = accum * math.ceil(growth)
    chosen, note = _accum_choice(cfg, world_size, wanted)
    exact = ("the feature cache keeps the global-batch loss exact" if cfg.loss.microbatch_contrast == "exact"
             else "NOTE loss.microbatch_contrast=per_microbatch: more micro-batches change the loss")
    return ({"optim.grad_accum_steps": chosen},
            [f"{head}: optim.grad_accum_steps {accum} -> {chosen} (x ceil({growth:.2f}) so each micro-batch holds "
             f"no more tokens than in pre-training){note}; global batch kept, {exact}"])


def plan_tuning(source: CheckpointSource, samples: Optional[int] = None, warmup_samples: Optional[int] = None,
                base_lr: Optional[float] = None, memory: str = "auto", overrides: Sequence[str] = (),
                world_size: int = 1, overlay=DEFAULT_OVERLAY) -> TuningPlan:
    """The tuning run's config, from the checkpoint's config, the overlay, the schedule in samples,
    the memory rule and the overrides (module docstring). Nothing is built or read but configs."""
    try:
        pretraining = config_from_dict(source.config_tree)
    except ConfigError as error:
        raise ConfigError(f"the config of {source.path} is not valid today: {error}") from None
    tree = merge_trees(copy.deepcopy(source.config_tree), load_yaml_tree(overlay))
    given = set(flatten_tree(apply_overrides({}, overrides)))  # keys the command line sets itself
    probe = config_from_dict(apply_overrides(tree, overrides))  # the batch and layout the run will have
    batch = probe.train.global_batch_size
    lines = []

    # Length.
    if samples is None:
        samples = PAPER_SAMPLES
        why = "the paper's 128M samples (0.32 epoch of LAION-400M)"
        if source.samples_seen and MAX_FRACTION_OF_PRETRAINING * source.samples_seen < samples:
            samples = int(MAX_FRACTION_OF_PRETRAINING * source.samples_seen)
            why = (f"clamped from the paper's 128M to {MAX_FRACTION_OF_PRETRAINING:.0%} of the {source.samples_seen:,} "
                   f"samples the checkpoint was trained on")
        elif not source.samples_seen:
            why += " (the checkpoint does not say how many samples it was trained on; --samples sets the length)"
    else:
        why = "--samples"
    steps = max(1, math.ceil(samples / batch))
    lines.append(f"length: {samples:,} samples = {steps} steps of {batch} ({why})")

    # Warmup.
    if warmup_samples is None:
        warmup_samples = min(PAPER_WARMUP_SAMPLES, int(MAX_WARMUP_FRACTION * samples))
        why = ("the paper's 25.6M samples" if warmup_samples == PAPER_WARMUP_SAMPLES
               else f"{MAX_WARMUP_FRACTION:.0%} of the length, the paper's proportion (25.6M of 128M)")
    else:
        why = "--warmup-samples"
    warmup_steps = min(round(warmup_samples / batch), steps - 1)
    lines.append(f"warmup: {warmup_samples:,} samples = {warmup_steps} step(s) ({why}), then cosine to "
                 f"{probe.schedule.min_lr:g}")

    # Learning rate, written as base lr per 256 samples (optim.lr null).
    if base_lr is None:
        src = pretraining
        pre_peak = (src.optim.base_lr * batch / 256 if src.optim.lr is None
                    else src.optim.lr * batch / src.train.global_batch_size)
        lr = PAPER_LR_RATIO * pre_peak
        base_lr = lr * 256 / batch
        recipe = (f"base_lr {src.optim.base_lr:g} per 256" if src.optim.lr is None
                  else f"lr {src.optim.lr:g} at batch {src.train.global_batch_size}")
        why = (f"1% of the pre-training peak lr {pre_peak:.3g} at batch {batch}, the paper's ratio 4e-8 / 4e-6; "
               f"pre-training: {recipe}")
    else:
        lr = base_lr * batch / 256
        why = "--base-lr"
    lines.append(f"lr: {lr:.3g} = base {base_lr:.3g} x {batch} / 256 ({why})")

    for key, value in (("model.mask_ratio", 0.0), ("train.max_steps", steps), ("schedule.warmup_steps", warmup_steps),
                       ("optim.lr", None), ("optim.base_lr", base_lr)):
        _set(tree, key, value)

    memory_changes, memory_lines = memory_plan(probe, pretraining.model.mask_ratio, memory, world_size)
    for key, value in memory_changes.items():
        _set(tree, key, value)
    lines += memory_lines
    lines.append("optimizer: fresh AdamW state, step 0 (the checkpoint's weights only)")
    overridden = sorted(given & {"train.max_steps", "schedule.warmup_steps", "optim.lr", "optim.base_lr",
                                 "model.mask_ratio", *memory_changes})
    if overridden:
        lines.append(f"overridden on the command line (these win): {', '.join(overridden)}")

    cfg = config_from_dict(apply_overrides(tree, overrides))
    from .parallel import ParallelDims

    ParallelDims.from_config(cfg.parallel, world_size, arch_from_config(cfg.model), cfg.train.global_batch_size,
                             cfg.optim.grad_accum_steps)
    if cfg.model.mask_ratio != 0.0:
        lines.append(f"NOTE model.mask_ratio={cfg.model.mask_ratio} from the command line: this is not unmasked tuning")
    lines.append(f"peak lr {effective_lr(cfg):.3g}, {cfg.schedule.warmup_steps} warmup steps, {cfg.train.max_steps} steps")
    return TuningPlan(cfg, source, lines)


# ----------------------------------------------------------------------------- the run


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="unmask_tune",
        description="Unmasked tuning of a FLIP checkpoint: mask ratio 0, fresh optimizer, the tuning schedule in "
                    "samples, the checkpoint's config otherwise (key=value pairs after the options override it). "
                    "See flip_scale/unmask.py for the rules.",
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
    parser.add_argument("--memory", choices=MEMORY_MODES, default="auto",
                        help="how to pay for the unmasked images' extra activations (default auto; see the module doc)")
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
    return CheckpointSource(src["kind"], Path(src["path"]), src["config"], src.get("step"), src.get("samples_seen"))


def _record(plan: TuningPlan, args: argparse.Namespace) -> dict:
    s = plan.source
    return {
        "source": {"kind": s.kind, "path": str(s.path.resolve()), "step": s.step, "samples_seen": s.samples_seen,
                   "config": s.config_tree},
        "arguments": {"samples": args.samples, "warmup_samples": args.warmup_samples, "base_lr": args.base_lr,
                      "memory": args.memory, "overrides": list(args.overrides)},
        "plan": plan.lines,
        "changes": {k: [old, new] for k, (old, new) in plan.changes().items()},
    }


def evaluate_source(plan: TuningPlan) -> tuple:
    """Zero-shot/retrieval of the source weights, masked as in pre-training and unmasked, on the
    tuning run's layout and eval data -> (results, the device). Leaves the process group up for the
    tuning run."""
    import torch

    from .data import Tokenizer
    from .distributed import init_distributed
    from .evaluation import EvalGroup, run_evaluation
    from .evaluation.cli import build_eval_model
    from .runtime import autocast_for, setup_logging

    cfg = dataclasses.replace(plan.cfg, parallel=dataclasses.replace(plan.cfg.parallel, activation_checkpointing="none",
                                                                     compile=False))
    proc = init_distributed(cfg.train.device, cfg.train.collective_timeout_minutes)
    setup_logging(proc.rank)
    model, parts, dims = build_eval_model(cfg, proc)
    load_weights(plan.source, parts, broadcast_from_rank0=proc.world_size > 1 and not dims.pp_enabled,
                 whole_model=not dims.pp_enabled)
    tokenizer = Tokenizer(cfg.data.tokenizer, context_length=arch_from_config(cfg.model).context_length)
    ratio = config_from_dict(plan.source.config_tree).model.mask_ratio
    group = EvalGroup.from_dims(dims)
    with autocast_for(cfg, proc.device):  # the precision the tuning run evaluates its "after" in
        out = {"mask_ratio": ratio,
               "masked": run_evaluation(model, tokenizer, cfg, proc.device, group, ratio or None, cfg.train.seed)
               if ratio else None,
               "unmasked": run_evaluation(model, tokenizer, cfg, proc.device, group)}
    del model, parts
    gc.collect()  # FSDP-wrapped modules sit in reference cycles: free them before the tuning model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out, proc.device


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


def format_report(report: dict) -> str:
    def cell(results: Optional[dict]) -> str:
        if not results or "zero_shot" not in results:
            return "n/a"
        zs = results["zero_shot"]
        return f"top-1 {100 * zs['top1']:5.1f}%  top-5 {100 * zs['top5']:5.1f}%"

    before, after = report["before"], report.get("after")
    zs = (after or before["unmasked"] or {}).get("zero_shot")
    where = f" on {zs['samples']} images, {zs['classes']} classes (chance {100 * zs['chance']:.1f}%)" if zs else ""
    ratio, tuned = before["mask_ratio"], report.get("tuning_mask_ratio", 0.0)
    tuning = "unmasked tuning" if not tuned else f"tuning at mask {tuned:.0%} (a control, not unmasked tuning)"
    rows = [(f"before tuning, evaluated masked {ratio:.0%} (as in pre-training)", before["masked"]),
            ("before tuning, evaluated unmasked", before["unmasked"]),
            (f"after {tuning}, evaluated unmasked", after)]
    width = max(len(label) for label, _ in rows)
    return "\n".join([f"zero-shot accuracy{where}:"] + [f"  {label:<{width}}  {cell(r)}" for label, r in rows])


def main(argv=None) -> int:
    args = parse_args(argv)
    run_dir = Path(args.run_dir)
    from .distributed import slurm_launch_env

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
                           world_size, args.overlay)
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as error:
        print(f"unmask_tune: {error}", file=sys.stderr)
        return 2
    if rank == 0:
        print(plan.describe(), flush=True)
    if args.dry_run:
        return 0
    if args.report:
        # A SIGUSR1 during the evaluation before tuning is a preemption request too (checked right
        # after it; flip_scale/train.run installs the handler afresh for the tuning).
        preemption.install()
    if rank == 0 and not resuming:
        run_dir.mkdir(parents=True, exist_ok=True)
        record_file.write_text(json.dumps(_record(plan, args), indent=1) + "\n")

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
                _write_json(report_file, {"source": str(source.path.resolve()), "before": before})
            if preemption.requested(device):  # during the evaluation: nothing trained, nothing lost
                if rank == 0:
                    print(f"unmask_tune: preempted during the evaluation before tuning (kept in {report_file}); "
                          f"continue with --resume auto (exit code {preemption.EXIT_CODE})", flush=True)
                return preemption.EXIT_CODE
        report = {"source": str(source.path.resolve()), "before": before}
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, at_end=True))

    from .train import run

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
        _write_json(report_file, report)
        print(format_report(report), flush=True)
    return 0
