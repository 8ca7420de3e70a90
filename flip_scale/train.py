"""`flip-train`: the training entry point.

    flip-train                                   # configs/tiny.yaml: tiny FLIP on synthetic data, CPU
    flip-train --config configs/flip_l16.yaml --run-dir runs/l16 --resume auto train.max_steps=1000
    torchrun --nproc_per_node 8 -m flip_scale.train --config configs/flip_g14.yaml parallel.tp=2

The loop reads as a list of steps: get batch -> forward/backward (exact global-batch contrast) ->
clip -> optimizer step -> clamp temperature -> log -> checkpoint -> evaluate.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from .checkpoint import (
    CheckpointError, abandon_pending_save, finalize_pending_save, load_checkpoint, resolve_resume, save_checkpoint,
)
from .config import Config, ConfigError, effective_lr, load_config
from .distributed import ProcessInfo, barrier, init_distributed, shutdown
from . import preemption
from .loss import build_loss
from .metrics import MetricsWriter, Progress, format_duration, peak_tflops
from .models import arch_from_config, build_model, count_parameters, masking_noise
from .models.flops import train_flops_per_sample
from .optim import OptimizerGroup, nvidia_apex_available
from .runtime import autocast_context, autocast_for, on_rank0_for_all, resolve_precision, setup_logging  # noqa: F401
from .parallel.pipeline import pipeline_forward_backward
from .parallel.utils import total_grad_norm
from .step import forward_backward

log = logging.getLogger("flip_scale")

EPILOG = """examples:
  flip-train                                      tiny FLIP on synthetic data (CPU, a few minutes)
  flip-train --config configs/flip_b16.yaml --run-dir runs/b16 data.train_shards='/data/{00000..01023}.tar'
  flip-train --resume auto --run-dir runs/tiny    continue from the last complete checkpoint
  torchrun --nproc_per_node 4 -m flip_scale.train parallel.dp_shard=4
  flip-train --config configs/flip_g14.yaml --dry-run --world-size 256 parallel.tp=2   check before sbatch
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


def check_layout_options(cfg: Config, dims) -> None:
    """Options the layout rules out (as the Trainer and `--dry-run` both check)."""
    if dims.pp_enabled and cfg.loss.microbatch_contrast != "exact":
        raise ConfigError("loss.microbatch_contrast=per_microbatch is not available with pipeline parallel "
                          "(parallel.pp > 1); use exact")


def check_tokenizer_size(cfg: Config, vocab_size: int, arch) -> None:
    if vocab_size > arch.vocab_size:
        raise ConfigError(
            f"the tokenizer {cfg.data.tokenizer} has {vocab_size} tokens but model.vocab_size is "
            f"{arch.vocab_size}; set model.vocab_size={vocab_size} or more"
        )


def dry_run(cfg: Config, world_size: int) -> str:
    """What `flip-train` would run, checked as far as can be without building anything: the
    layout, the batch split, the data streams, the schedule and the model's size and cost.
    Raises ConfigError / LayoutError as the real start would."""
    from .data.loader import check_streams, default_streams
    from .models.flops import flops_for_config
    from .parallel import ParallelDims

    arch = arch_from_config(cfg.model)
    dims = ParallelDims.from_config(cfg.parallel, world_size, arch=arch, global_batch_size=cfg.train.global_batch_size,
                                    grad_accum_steps=cfg.optim.grad_accum_steps)
    check_layout_options(cfg, dims)
    local = cfg.train.global_batch_size // dims.dp_size
    streams = cfg.data.streams or default_streams(dims.dp_size, cfg.data.num_workers, local)
    try:
        check_streams(streams, dims.dp_size, cfg.train.global_batch_size)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if Path(cfg.data.tokenizer).is_file():
        from .data import Tokenizer

        check_tokenizer_size(cfg, Tokenizer(cfg.data.tokenizer, context_length=arch.context_length).vocab_size, arch)
        tokenizer_note = f"tokenizer {cfg.data.tokenizer} fits model.vocab_size={arch.vocab_size}"
    else:
        tokenizer_note = (f"tokenizer {cfg.data.tokenizer} not found here (not checked; with data.synthetic the "
                          f"run writes it)")
    counts = count_parameters(build_model(cfg.model, device="meta"))
    flops = flops_for_config(cfg.model, training=True)["total"]
    samples = cfg.train.max_steps * cfg.train.global_batch_size
    shards = str(cfg.data.train_shards) if cfg.data.train_shards else "data.train_shards is not set"
    state_bytes = 16 * counts["params_total"]  # fp32 weights + grads + AdamW's two moments
    shard_over = dims.dp_shard * dims.tp * dims.pp
    return "\n".join([
        f"flip-train --dry-run: {cfg.model.name}, {counts['params_total'] / 1e6:.1f}M parameters "
        f"(vision {counts['params_vision'] / 1e6:.1f}M, text {counts['params_text'] / 1e6:.1f}M), mask ratio "
        f"{cfg.model.mask_ratio:g} ({max(1, int(arch.num_patches * (1 - cfg.model.mask_ratio)))} of {arch.num_patches} "
        f"patches visible)",
        f"  layout: {dims.describe()}",
        f"  batch: {cfg.train.global_batch_size} = {dims.dp_size} data-parallel ranks x {local} "
        f"(grad accumulation {cfg.optim.grad_accum_steps}, pipeline micro-batches {cfg.parallel.microbatches})",
        f"  data: {shards}; {streams} sample streams ({streams // dims.dp_size} per data-parallel rank, "
        f"{local * dims.dp_size // streams} samples each per step)",
        f"  schedule: {cfg.train.max_steps} steps = {samples / 1e6:.2f}M samples, peak lr {effective_lr(cfg):.3e}, "
        f"warmup {cfg.schedule.warmup_steps}, {cfg.schedule.name}",
        f"  compute: {flops / 1e9:.1f} GFLOPs per training sample, {flops * samples / 1e18:.2f} EFLOP in all",
        f"  optimizer state: {state_bytes / 2**30:.1f} GiB in all (fp32 weights, grads, AdamW moments), "
        f"{state_bytes / shard_over / 2**20:.0f} MiB per rank sharded over {shard_over}"
        + (f" (x{dims.dp_replicate} replicas)" if dims.dp_replicate > 1 else ""),
        f"  {tokenizer_note}",
        f"  activation checkpointing: {cfg.parallel.activation_checkpointing} "
        f"({cfg.parallel.activation_checkpointing_towers}); compiled blocks: {cfg.parallel.compile}",
        "  config and layout OK",
    ])


def default_run_dir(config_path: Optional[str]) -> Path:
    name = Path(config_path).stem if config_path else "tiny"
    return Path("runs") / name


@dataclass
class TrainState:
    step: int = 0
    samples_seen: int = 0
    skipped_samples: int = 0
    nonfinite_steps: int = 0  # skipped optimizer steps (non-finite gradient norm), over the run
    nonfinite_in_a_row: int = 0


def _dp_sum(value: float, group, device, op=None) -> float:
    if group is None:
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op if op is not None else dist.ReduceOp.SUM, group=group)
    return float(tensor.item())


class Trainer:
    """Builds the parts from one config and runs the loop. Parallel layout: `flip_scale.parallel`."""

    def __init__(self, cfg: Config, run_dir: Path, proc: ProcessInfo, with_data: bool = True):
        from .data import Tokenizer, build_train_loader, ensure_synthetic_data
        from .parallel import ParallelDims, clip_grad_norm_, parallelize_model, parallelize_pipeline

        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.proc = proc
        self.device = proc.device
        self.arch = arch_from_config(cfg.model)
        self.clip_grad_norm_ = clip_grad_norm_

        # Layout first: an impossible one is refused before anything is built.
        self.dims = ParallelDims.from_config(
            cfg.parallel, proc.world_size, arch=self.arch,
            global_batch_size=cfg.train.global_batch_size, grad_accum_steps=cfg.optim.grad_accum_steps,
        )
        check_layout_options(cfg, self.dims)
        if cfg.data.streams:  # data.streams: 0 picks a count that fits; a given one must fit too
            from .data.loader import check_streams

            try:
                check_streams(cfg.data.streams, self.dims.dp_size, cfg.train.global_batch_size)
            except ValueError as error:
                raise ConfigError(str(error)) from None
        self.mesh = self.dims.build_mesh(self.device.type)
        self.local_batch = cfg.train.global_batch_size // self.dims.dp_size
        self.precision = resolve_precision(cfg, self.device)

        if proc.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.run_dir / "config.yaml")
            if with_data:
                ensure_synthetic_data(cfg.data, image_size=self.arch.image_size, vocab_size=self.arch.vocab_size)
        barrier()
        # Without data (benchmarks feed synthetic tensors) there is no tokenizer either.
        self.tokenizer = Tokenizer(cfg.data.tokenizer, context_length=self.arch.context_length) if with_data else None
        if self.tokenizer is not None:
            check_tokenizer_size(cfg, self.tokenizer.vocab_size, self.arch)

        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model, device="meta")
        self.counts = count_parameters(model)
        self.train_flops_per_sample = train_flops_per_sample(cfg.model)
        if self.dims.pp_enabled:
            self.model_parts, self.pipe = parallelize_pipeline(model, self.dims, self.mesh, cfg, self.device)
        else:
            self.model_parts, self.pipe = [parallelize_model(model, self.dims, self.mesh, cfg, self.device)], None
        # The whole model on this rank (None when it is split into pipeline stages).
        self.model = None if self.pipe is not None else self.model_parts[0]
        self.loss_fn = build_loss(cfg.loss, self.dims.dp_group)
        self.optimizers = OptimizerGroup(self.model_parts, cfg, self.device)
        self.state = TrainState()
        self.data_state = None
        self._build_loader = lambda: build_train_loader(
            cfg.data, self.arch.image_size, self.tokenizer, self.dims.dp_rank, self.dims.dp_size,
            self.local_batch, cfg.train.seed,
        )
        self.metrics = MetricsWriter(self.run_dir, enabled=proc.is_main, tensorboard=cfg.logging.tensorboard)
        self.eval_metrics = MetricsWriter(self.run_dir, enabled=proc.is_main, tensorboard=False, filename="eval.jsonl")

    # ------------------------------------------------------------------ setup reporting
    def describe(self) -> None:
        local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in self.parameters())
        c = self.counts
        log.info(
            "model %s: %.2fM params (vision %.2fM, text %.2fM); mask ratio %.2f -> %d of %d patches visible",
            self.cfg.model.name, c["params_total"] / 1e6, c["params_vision"] / 1e6, c["params_text"] / 1e6,
            self.cfg.model.mask_ratio, max(1, int(self.arch.num_patches * (1 - self.cfg.model.mask_ratio))),
            self.arch.num_patches,
        )
        log.info("layout: %s | world %d | device %s | precision %s", self.dims.describe(), self.proc.world_size,
                 self.device, self.precision)
        log.info("global batch %d = %d data-parallel ranks x %d (grad accumulation %d, %s contrast)",
                 self.cfg.train.global_batch_size, self.dims.dp_size, self.local_batch, self.cfg.optim.grad_accum_steps,
                 self.cfg.loss.microbatch_contrast)
        kinds = sorted({getattr(opt, "flip_kind", type(opt).__name__) for opt in self.optimizers.optimizers})
        log.info("peak lr %.3e, warmup %d, %s schedule, %d steps; optimizer %s; LayerNorm: PyTorch's "
                 "(NVIDIA apex %s)",
                 effective_lr(self.cfg), self.cfg.schedule.warmup_steps, self.cfg.schedule.name, self.cfg.train.max_steps,
                 ", ".join(kinds), "importable" if nvidia_apex_available() else "not importable")
        if self.proc.world_size > 1:
            # Every rank reports its own share (warning level: other ranks log only warnings).
            log.warning("rank %d holds %.2fM parameters locally", self.proc.rank, local / 1e6)

    # ------------------------------------------------------------------ checkpoints
    def resume(self, path: Path) -> None:
        """Model, optimizer, lr schedule, step, RNG and data position from `path` (any layout of the
        same architecture; another architecture is refused before anything is loaded)."""
        from dataclasses import asdict

        from .checkpoint import data_state_for_resume, data_states

        trainer_state = load_checkpoint(
            path, self.model_parts, self.optimizers.optimizers, self.optimizers,
            model_arch=self.arch.to_dict(), model_config=asdict(self.cfg.model),
        )
        self.state = TrainState(
            step=trainer_state["step"], samples_seen=trainer_state.get("samples_seen", 0),
            skipped_samples=trainer_state.get("skipped_samples", 0),
            nonfinite_steps=trainer_state.get("nonfinite_steps", 0),
            nonfinite_in_a_row=trainer_state.get("nonfinite_in_a_row", 0),
        )
        if trainer_state.get("layout") not in (None, self.dims.describe()):
            log.info("checkpoint layout %s re-sharded into %s", trainer_state["layout"], self.dims.describe())
        # Per-stream positions of every rank, merged: they continue under any layout whose
        # data-parallel size divides the stream count (flip_scale/data/loader.py).
        self.data_state = None
        if data_states(path):
            fresh = self._build_loader()
            if hasattr(fresh, "state_dict"):
                self.data_state, reason = data_state_for_resume(Path(path), fresh.state_dict())
                if reason is not None:
                    log.warning("data stream: %s", reason)
        elif self.state.samples_seen > 0 and self.tokenizer is not None:
            log.warning("%s holds no data stream position: the stream starts from its beginning and the first "
                        "%d samples are seen again", path, self.state.samples_seen)
        log.info("resumed from %s at step %d (%d samples seen)", path, self.state.step, self.state.samples_seen)

    def init_from(self, path) -> None:
        """Weights only (fresh optimizer, step 0) from a training checkpoint (a step directory or a run
        directory's latest) or a consolidated directory (model.safetensors + flip_config.yaml, as
        `tools/convert_ckpt.py consolidate` / `from-openclip` write), into any layout. Another
        architecture is refused before anything is loaded; other pooling / text mask / norm eps options
        are logged, not refused (a fine-tune may intend them)."""
        from .evaluation.checkpoints import CheckpointSource, check_source_architecture, load_weights, resolve_init_from

        source = path if isinstance(path, CheckpointSource) else resolve_init_from(path)
        check_source_architecture(source, self.cfg.model, functional="warn")
        # Without pipeline stages every rank holds every tensor name: rank 0 alone reads a
        # consolidated file and the tensors are broadcast (each rank keeps its shard).
        whole = self.pipe is None
        load_weights(source, self.model_parts, broadcast_from_rank0=whole, whole_model=whole)
        log.info("initialised weights from %s (fresh optimizer, step 0): a %s", source.path,
                 "training checkpoint" if source.kind == "dcp" else "consolidated directory")

    def save(self, loader) -> Path:
        """Checkpoint at the current step (collective). With checkpoint.async_save the shards are
        written in the background and committed at the next save or at the end of `fit`."""
        # Tensor- and pipeline-parallel ranks of one replica read the same stream: one writes it.
        writes_data = self.dims.tp_rank == 0 and self.dims.pp_rank == 0
        data_state = loader.state_dict() if writes_data and hasattr(loader, "state_dict") else None
        return save_checkpoint(
            self.run_dir, self.state.step, self.model_parts, self.optimizers.optimizers, self.optimizers,
            trainer_state={
                "samples_seen": self.state.samples_seen, "skipped_samples": self.state.skipped_samples,
                "nonfinite_steps": self.state.nonfinite_steps, "nonfinite_in_a_row": self.state.nonfinite_in_a_row,
                "layout": self.dims.describe(), "world_size": self.proc.world_size,
                "dp_size": self.dims.dp_size, "model_arch": self.arch.to_dict(),
            },
            config_yaml=self.cfg.to_yaml(), data_state=data_state, dp_rank=self.dims.dp_rank,
            keep_last=self.cfg.checkpoint.keep_last, keep_every=self.cfg.checkpoint.keep_every,
            async_save=self.cfg.checkpoint.async_save,
        )

    # ------------------------------------------------------------------ one step
    def autocast(self):
        return autocast_context(self.precision, self.device)

    def mask_noise(self, step: int, batch_size: int) -> Optional[torch.Tensor]:
        if self.cfg.model.mask_ratio <= 0:
            return None
        first = self.dims.dp_rank * batch_size
        index = torch.arange(first, first + batch_size)
        return masking_noise(self.cfg.train.seed, step, index, self.arch.num_patches).to(self.device)

    def train_step(self, batch: dict) -> dict:
        images = batch["images"].to(self.device, non_blocking=True)
        tokens = batch["tokens"].to(self.device, non_blocking=True)
        noise = self.mask_noise(self.state.step, images.shape[0])
        for part in self.model_parts:
            part.train()
        if self.pipe is not None:
            loss = pipeline_forward_backward(self.pipe, self.loss_fn, images, tokens, noise, autocast=self.autocast)
        else:
            loss = forward_backward(
                self.model, self.loss_fn, images, tokens, noise,
                microbatches=self.cfg.optim.grad_accum_steps,
                exact=self.cfg.loss.microbatch_contrast == "exact",
                autocast=self.autocast,
            )
        if self.cfg.optim.grad_clip > 0:
            grad_norm = self.clip_grad_norm_(list(self.parameters()), self.cfg.optim.grad_clip, self.dims)
        else:
            grad_norm = total_grad_norm(list(self.parameters()), self.dims)
        lr = self.optimizers.lr
        # The norm is global (every rank holds the same value), so every rank decides alike.
        if not math.isfinite(float(grad_norm)):
            self.optimizers.skip()
            self.optimizers.zero_grad()
            self.state.nonfinite_steps += 1
            self.state.nonfinite_in_a_row += 1
            step = self.state.step + 1
            if self.state.nonfinite_in_a_row > self.cfg.optim.max_nonfinite_steps:
                raise FloatingPointError(
                    f"step {step}: gradient norm {float(grad_norm)} (loss {float(loss)}), non-finite for "
                    f"{self.state.nonfinite_in_a_row} steps in a row, more than optim.max_nonfinite_steps="
                    f"{self.cfg.optim.max_nonfinite_steps}: stopping with the weights of the last finite step (no "
                    f"checkpoint of them is written); lower optim.lr, check the data, or resume from an earlier checkpoint")
            log.warning("step %d: gradient norm %s (loss %s): the step is skipped, the weights are kept (%d in a row, "
                        "at most optim.max_nonfinite_steps=%d)", step, float(grad_norm), float(loss),
                        self.state.nonfinite_in_a_row, self.cfg.optim.max_nonfinite_steps)
            return {"loss": loss, "grad_norm": grad_norm, "lr": lr, "skipped_step": True}
        self.state.nonfinite_in_a_row = 0
        self.optimizers.step()
        self.optimizers.zero_grad()
        for part in self.model_parts:
            clamp_logit_scale(part)
        return {"loss": loss, "grad_norm": grad_norm, "lr": lr}

    def parameters(self):
        for part in self.model_parts:
            yield from part.parameters()

    def logit_scale(self) -> float:
        """exp(temperature parameter); under pipelining only the last stage holds it."""
        value = 0.0
        for part in self.model_parts:
            if getattr(part, "logit_scale", None) is not None:
                value = logit_scale_value(part)
        if self.pipe is not None:
            tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.dims.pp_group)
            value = float(tensor.item())
        return value

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        cfg = self.cfg
        loader = self._build_loader()
        if self.data_state is not None and hasattr(loader, "load_state_dict"):
            loader.load_state_dict(self.data_state)
        batches = iter(loader)
        progress = Progress(self.state.step, cfg.train.max_steps)
        dp_group = self.dims.dp_group
        last = {}
        window_loss, window_skipped, window_steps = 0.0, 0, 0
        peak = peak_tflops(self.device, cfg.logging.peak_tflops)
        window_wait = 0.0
        while self.state.step < cfg.train.max_steps:
            waited = time.perf_counter()
            batch = next(batches)
            window_wait += time.perf_counter() - waited
            out = self.train_step(batch)
            self.state.step += 1
            self.state.samples_seen += cfg.train.global_batch_size
            if not out.get("skipped_step"):  # a skipped step's loss is not finite: kept out of the mean
                window_loss += float(out["loss"])
                window_steps += 1
            window_skipped += int(batch.get("skipped", 0))
            step = self.state.step
            if step % cfg.train.log_every_steps == 0 or step == cfg.train.max_steps or step == 1:
                # Metrics are reduced once, over the data-parallel ranks, and written by rank 0.
                # (Every rank skips the same steps, so window_steps agrees.)
                loss = (_dp_sum(window_loss / window_steps, dp_group, self.device) / self.dims.dp_size
                        if window_steps else float("nan"))
                skipped = int(_dp_sum(window_skipped, dp_group, self.device))
                # The slowest rank's loader holds every rank back: its wait is the one that counts.
                wait = _dp_sum(window_wait, dp_group, self.device, dist.ReduceOp.MAX if dp_group is not None else None)
                self.state.skipped_samples += skipped
                elapsed, steps = progress.interval(step)
                tflops = (self.train_flops_per_sample * cfg.train.global_batch_size * steps
                          / max(elapsed, 1e-9) / self.proc.world_size / 1e12)
                values = {
                    "loss": loss,
                    "lr": out["lr"],
                    "logit_scale": self.logit_scale(),
                    "grad_norm": float(out["grad_norm"]),
                    "images_per_s": cfg.train.global_batch_size * steps / max(elapsed, 1e-9),
                    # Model FLOPs (forward + backward, masked tokens only) per second per rank.
                    "tflops_per_s_per_rank": tflops,
                    # Share of the interval spent waiting for the next batch (data-bound when high).
                    "data_wait_fraction": min(1.0, wait / max(elapsed, 1e-9)),
                    "samples_seen": self.state.samples_seen,
                    "mask_ratio": cfg.model.mask_ratio,
                    "skipped_samples": self.state.skipped_samples,
                    "nonfinite_steps": self.state.nonfinite_steps,
                }
                if peak and (self.precision == "bf16" or cfg.logging.peak_tflops > 0):
                    # Model FLOPs utilisation against the bf16 peak (fp32 runs have another peak:
                    # give it as logging.peak_tflops to get an MFU for them).
                    values["mfu"] = tflops / peak
                if window_steps and not math.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss} at step {step}: stopping (lower optim.lr or check the data)")
                self.metrics.write(step, values)
                log.info(progress.line(step, values))
                last = values
                window_loss, window_skipped, window_steps, window_wait = 0.0, 0, 0, 0.0
            if step % cfg.checkpoint.every_steps == 0 or step == cfg.train.max_steps:
                self.save(loader)
            # Preemption (flip_scale/preemption.py): all ranks agree, save this step, stop.
            if step < cfg.train.max_steps and preemption.requested(self.device):
                if step % cfg.checkpoint.every_steps != 0:
                    self.save(loader)
                log.info("preemption requested: stopped after step %d with its checkpoint; exit code %d",
                         step, preemption.EXIT_CODE)
                return {"step": step, "preempted": True, **last}
            if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step != cfg.train.max_steps:
                self.evaluate()
        # An asynchronous checkpoint still being written is committed before anything else can fail.
        finalize_pending_save()
        result = {"step": self.state.step, **last}
        if cfg.eval.at_end:
            evaluation = self.evaluate()
            if evaluation is not None:
                result.update(evaluation)  # "zero_shot" and/or "retrieval"
        return result

    def evaluate(self) -> Optional[dict]:
        """Zero-shot classification and retrieval as configured (eval.*), unmasked; collective.
        Returns {"zero_shot": ..., "retrieval": ...} (the configured ones), or None."""
        from .evaluate import EvalGroup, describe, log_values, run_evaluation

        # Each data-parallel rank embeds its share of the data (the tp and pp ranks of a replica the
        # same share) in lockstep, so every rank takes part in every forward; the counts are
        # all-reduced. Under pipeline parallel the stages run forward-only schedules of their own.
        model = self.model
        if model is None:  # its schedules' buffers live for this evaluation only
            from .parallel.pipeline import PipelineEvalModel

            model = PipelineEvalModel(self.pipe, self.arch)
        started = time.perf_counter()
        with self.autocast():
            results = run_evaluation(model, self.tokenizer, self.cfg, self.device, EvalGroup.from_dims(self.dims))
        if not results:
            return None
        values = log_values(results)
        self.eval_metrics.write(self.state.step, values)
        if self.metrics.tb is not None:
            for key, value in values.items():
                self.metrics.tb.add_scalar(f"eval/{key}", value, self.state.step)
            self.metrics.tb.flush()
        log.info("evaluation at step %d: %s [%s]", self.state.step, describe(results),
                 format_duration(time.perf_counter() - started))
        return results

    def close(self) -> None:
        self.metrics.close()
        self.eval_metrics.close()


def _logit_scale_param(model) -> torch.Tensor:
    module = getattr(model, "module", model)
    return module.logit_scale


def logit_scale_value(model) -> float:
    param = _logit_scale_param(model)
    value = param.full_tensor() if hasattr(param, "full_tensor") else param
    return float(value.detach().exp())


@torch.no_grad()
def clamp_logit_scale(model) -> None:
    """Keep the temperature in [0, log 100] after every optimizer step (a no-op for a pipeline
    stage that does not hold it)."""
    module = getattr(model, "module", model)
    param = getattr(module, "logit_scale", None)
    if param is None:
        return
    local = param.to_local() if hasattr(param, "to_local") else param
    local.clamp_(0.0, module.logit_scale_max)


def run(cfg: Config, run_dir: Path, resume: Optional[str] = None, init_from: Optional[str] = None) -> dict:
    proc = init_distributed(cfg.train.device, cfg.train.collective_timeout_minutes)
    setup_logging(proc.rank)
    preemption.install()  # SIGUSR1: save at the next step boundary and exit preemption.EXIT_CODE
    try:
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True)
        trainer = Trainer(cfg, run_dir, proc)
        trainer.describe()
        # Rank 0 picks the checkpoint and every rank takes its choice (ranks looking at a shared
        # file system on their own could see different `latest` files).
        checkpoint = on_rank0_for_all(lambda: resolve_resume(resume, Path(run_dir)))
        if checkpoint is not None:
            trainer.resume(checkpoint)
        elif resume == "auto":
            log.info("--resume auto: no checkpoint in %s, starting at step 0", run_dir)
        if init_from and checkpoint is None:
            trainer.init_from(init_from)  # a step dir, a run dir or a consolidated dir
        result = trainer.fit()
        finalize_pending_save()  # in case fit returned before its end
        trainer.close()
        return result
    finally:
        # After a failure a background checkpoint write is let finish but not committed.
        abandon_pending_save()
        shutdown()


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

    try:
        result = run(cfg, run_dir, resume=args.resume, init_from=args.init_from)
    except (ConfigError, LayoutError) as error:
        # Found with the world size or the data in hand (layout, data.streams, tokenizer size):
        # as deterministic as a config error, so the same exit status (the Slurm templates never
        # requeue it).
        print(f"flip-train: config error: {error}", file=sys.stderr)
        return 2
    return preemption.EXIT_CODE if result.get("preempted") else 0


if __name__ == "__main__":
    sys.exit(main())
