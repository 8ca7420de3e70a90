"""Unmasked tuning (FLIP paper section 4.1 / A.1): the plan. Continue a masked pre-training briefly
with mask ratio 0, so that the model meets whole images once before it is used on them.

The tuning run is an ordinary training run (`flip_scale.train.run`, started by
`flip_scale.unmask.cli`) with the checkpoint's weights, a fresh optimizer and step 0, and the
config `plan_tuning` makes: the checkpoint's own config, `configs/unmask_tune.yaml` on top (mask
ratio 0, cosine schedule), the values below, and the key=value overrides over all.
  - length  --samples, default the paper's 128M samples (0.32 epoch of LAION-400M), clamped to 10%
            of the samples the checkpoint was trained on where that is known (a toy run of 38k
            samples is not tuned for 128M); warmup --warmup-samples, default the paper's 25.6M, at
            most 20% of the length (the paper's proportion); both in steps of the global batch B.
  - lr      --base-lr per 256 samples (lr = base x B / 256), default 1% of the pre-training peak
            lr at batch B: the paper's ratio (4e-8 vs 4e-6 per 256), which is the paper's 4e-8 for
            the paper's recipes and stays meaningful for recipes with another pre-training lr.
  - memory  an unmasked image has f = (1 + L) / (1 + visible) times the tokens of a masked one
            (f = 3.9 for L/16 at 75%, 2.0 at 50%), and activation memory grows about as much.
            `--memory auto`: if activation checkpointing is not `full`, switch it to `full` (a
            block then keeps only its input for the backward instead of a dozen activations of
            that size, which covers f <= 4; beyond that also raise optim.grad_accum_steps by
            ceil(f / 4)); if it already is, raise optim.grad_accum_steps by ceil(f), to a value
            that divides the per-rank batch, so each micro-batch holds as many tokens as before.
            The two-pass feature cache keeps the global-batch loss exact. `accum` always raises
            the accumulation, `checkpointing` only switches checkpointing on, `keep` changes
            nothing; the plan's lines say what was chosen and why.

Importing this module needs neither torch nor a GPU (a login node can plan a job). Planning itself
reads the model registry and checks the run with `preflight.plan_run`; flip_scale.models
and flip_scale.parallel import torch, so `plan_tuning`, `memory_plan` and `token_growth` import
them (and with them torch) when called.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence

from ..config import (
    CONFIG_DIR, Config, ConfigError, apply_overrides, config_from_dict, effective_lr, flatten_tree, load_yaml_tree,
    merge_trees,
)

if TYPE_CHECKING:
    from ..checkpoint import CheckpointSource

PAPER_SAMPLES = 128_000_000  # 0.32 epoch of LAION-400M
PAPER_WARMUP_SAMPLES = 25_600_000
PAPER_LR_RATIO = 4e-8 / 4e-6  # tuning base lr / pre-training base lr
MAX_FRACTION_OF_PRETRAINING = 0.1  # default length at most this fraction of the samples seen
MAX_WARMUP_FRACTION = PAPER_WARMUP_SAMPLES / PAPER_SAMPLES  # 0.2
DEFAULT_OVERLAY = CONFIG_DIR / "unmask_tune.yaml"
MEMORY_MODES = ("auto", "accum", "checkpointing", "keep")


@dataclass
class TuningPlan:
    cfg: Config
    source: CheckpointSource
    lines: list = field(default_factory=list)  # what was chosen, and why
    source_mask_ratio: Optional[float] = None  # the mask ratio the source was pre-trained with

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
    from ..models import visible_count

    return (1 + arch.num_patches) / (1 + visible_count(arch.num_patches, mask_ratio))


def _accum_choice(cfg: Config, world_size: int, wanted: int) -> tuple[int, str]:
    """The smallest grad_accum_steps >= wanted that the layout and batch allow."""
    from ..preflight import plan_run  # the layout rules (and torch)

    dims = plan_run(cfg, world_size, training=False).dims
    per_rank = cfg.train.global_batch_size // dims.dp_size
    limit = max(1, per_rank // cfg.parallel.microbatches)
    for accum in range(wanted, limit + 1):
        if per_rank % (cfg.parallel.microbatches * accum) == 0:
            return accum, ""
    return limit, (f" (capped at {limit}: one sample per micro-batch of the {per_rank}-sample per-rank batch; "
                   f"memory per micro-batch cannot shrink further)")


def _unsharded_gradients(cfg: Config, world_size: int, accum: int) -> tuple[dict, str]:
    """Raising the accumulation to `accum` under ZeRO-3 (dp_shard > 1) would hold the unsharded fp32
    gradients, 4 P / (tp pp) bytes per rank, between micro-batches: where the layout can avoid them
    (the native engine without pipeline parallel) and parallel.reduce_every_microbatch=auto, the rule
    sets it to true (reduce-scatter each micro-batch, so the extra micro-batches add no memory); an
    explicit false, or a pipeline layout (whose schedule holds them, the option does not apply), is
    kept and its cost said."""
    from ..models import build_model, count_parameters
    from ..parallel.memory import GIB, can_reduce_every_microbatch, keeps_unsharded_grads, unsharded_grad_bytes
    from ..preflight import plan_run

    probe = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, grad_accum_steps=accum))
    dims = plan_run(probe, world_size, training=False).dims
    params = count_parameters(build_model(cfg.model, device="meta"))["params_total"]
    if not keeps_unsharded_grads(probe, dims, params):
        return {}, ""
    held = unsharded_grad_bytes(params, dims) / GIB
    if not can_reduce_every_microbatch(probe, dims):
        return {}, (f"; NOTE the pipeline schedule holds {held:.2f} GiB of unsharded fp32 gradients per rank across "
                    f"the micro-batches (parallel.reduce_every_microbatch does not apply under pipeline parallel)")
    if cfg.parallel.reduce_every_microbatch == "auto":
        return ({"parallel.reduce_every_microbatch": "true"},
                f"; parallel.reduce_every_microbatch -> true (accumulating without a reduce-scatter each would hold "
                f"{held:.2f} GiB of unsharded fp32 gradients per rank)")
    return {}, (f"; NOTE parallel.reduce_every_microbatch=false holds {held:.2f} GiB of unsharded fp32 gradients per "
                f"rank across the micro-batches")


# Full activation checkpointing keeps one input per block instead of about a dozen activations of
# its size: it pays for up to about this many times the tokens (module docstring).
FULL_AC_COVERS = 4.0


def memory_plan(cfg: Config, source_mask_ratio: float, mode: str, world_size: int) -> tuple[dict, list]:
    """(dotted key -> value, explanation lines) of the memory rule (module docstring)."""
    if mode not in MEMORY_MODES:
        raise ConfigError(f"--memory {mode}: choose one of {', '.join(MEMORY_MODES)}")
    from ..models import arch_from_config, visible_count

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
        grads, grads_note = _unsharded_gradients(cfg, world_size, chosen)
        note += grads_note
        return ({"parallel.activation_checkpointing": "full", "optim.grad_accum_steps": chosen, **grads},
                [f"{head}: activation checkpointing {ac} -> full (covers about x{FULL_AC_COVERS:g}) and "
                 f"optim.grad_accum_steps {accum} -> {chosen} (x ceil({growth:.2f} / {FULL_AC_COVERS:g})) for the "
                 f"rest{note}; global batch kept, the feature cache keeps the loss exact"])
    wanted = accum * math.ceil(growth)
    chosen, note = _accum_choice(cfg, world_size, wanted)
    grads, grads_note = _unsharded_gradients(cfg, world_size, chosen)
    note += grads_note
    exact = ("the feature cache keeps the global-batch loss exact" if cfg.loss.microbatch_contrast == "exact"
             else "NOTE loss.microbatch_contrast=per_microbatch: more micro-batches change the loss")
    return ({"optim.grad_accum_steps": chosen, **grads},
            [f"{head}: optim.grad_accum_steps {accum} -> {chosen} (x ceil({growth:.2f}) so each micro-batch holds "
             f"no more tokens than in pre-training){note}; global batch kept, {exact}"])


def source_mask_ratio(source: CheckpointSource, pretraining: Config, given: Optional[float] = None) -> tuple[float, str]:
    """(the mask ratio the source's weights were trained with, why): `given` (--mask-ratio), else what
    the checkpoint records of its origin (weights converted from OpenCLIP: trained on whole images
    unless patch_dropout), else its config's model.mask_ratio."""
    if given is not None:
        if not 0.0 <= given < 1.0:
            raise ConfigError(f"--mask-ratio {given}: the pre-training mask ratio must be in [0, 1)")
        return float(given), "--mask-ratio"
    if source.pretraining_mask_ratio is not None:
        return source.pretraining_mask_ratio, f"recorded by the conversion: {source.provenance or 'unknown'} weights"
    return pretraining.model.mask_ratio, "the checkpoint's model.mask_ratio"


def plan_tuning(source: CheckpointSource, samples: Optional[int] = None, warmup_samples: Optional[int] = None,
                base_lr: Optional[float] = None, memory: str = "auto", overrides: Sequence[str] = (),
                world_size: int = 1, overlay=DEFAULT_OVERLAY, mask_ratio: Optional[float] = None) -> TuningPlan:
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
    pre_ratio, ratio_why = source_mask_ratio(source, pretraining, mask_ratio)
    lines = [f"pre-training mask ratio: {pre_ratio:g} ({ratio_why})"]
    if pre_ratio == 0.0:
        lines.append("NOTE the source was pre-trained on whole images: this run fine-tunes it unmasked; it closes no "
                     "masked/unmasked gap")

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

    # Text masking (if the pre-training used it) is removed too: evaluation sees whole captions.
    # Attentive masking's EMA tower scores patches to remove: with none removed it is left behind.
    for key, value in (("model.mask_ratio", 0.0), ("model.text_mask_ratio", 0.0), ("model.masking", "random"),
                       ("train.max_steps", steps), ("schedule.warmup_steps", warmup_steps),
                       ("optim.lr", None), ("optim.base_lr", base_lr)):
        _set(tree, key, value)

    memory_changes, memory_lines = memory_plan(probe, pre_ratio, memory, world_size)
    for key, value in memory_changes.items():
        _set(tree, key, value)
    lines += memory_lines
    lines.append("optimizer: fresh AdamW state, step 0 (the checkpoint's weights only)")
    overridden = sorted(given & {"train.max_steps", "schedule.warmup_steps", "optim.lr", "optim.base_lr",
                                 "model.mask_ratio", *memory_changes})
    if overridden:
        lines.append(f"overridden on the command line (these win): {', '.join(overridden)}")

    cfg = config_from_dict(apply_overrides(tree, overrides))
    from ..preflight import plan_run  # the checks the tuning run will make at its start (and torch)

    plan_run(cfg, world_size)
    if cfg.model.mask_ratio != 0.0:
        lines.append(f"NOTE model.mask_ratio={cfg.model.mask_ratio} from the command line: this is not unmasked tuning")
    lines.append(f"peak lr {effective_lr(cfg):.3g}, {cfg.schedule.warmup_steps} warmup steps, {cfg.train.max_steps} steps")
    return TuningPlan(cfg, source, lines, pre_ratio)


def format_report(report: dict) -> str:
    """The zero-shot table of a report (RUN_DIR/unmask_report.json): before tuning masked and
    unmasked, after tuning unmasked; "n/a" where a part is missing."""
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
