"""The Trainer: builds the parts from one config and runs the loop (`flip-train`'s process
set-up, failure guard and exit codes are flip_scale/train.py's).

The loop reads as a list of steps: get batch -> forward/backward (exact global-batch contrast) ->
clip + step -> metrics -> maybe save -> maybe stop for preemption -> maybe evaluate. Everything that
depends on how the model is distributed is behind the engine (flip_scale/engine); the checkpoint
directory is the CheckpointManager's (flip_scale/checkpoint); the checks of the run are
`preflight.plan_run`'s. docs/design.md draws the map.
"""


from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from . import preemption
from .checkpoint import (
    CheckpointManager, CheckpointSaveError,
)
from .checkpoint.space import check_free_space
from .config import Config, ConfigError, collective_timeouts, effective_lr
from .distributed import ProcessInfo, barrier
from .engine import build_engine
from .metrics import MetricsWriter, StepMetrics, format_duration
from .models import build_model, count_parameters, sample_mask_noise
from .models.flops import train_flops_per_sample
from .nonfinite import NonfiniteSteps
from .preflight import check_tokenizer_size, plan_run
from .runtime import host_to_device, on_rank0_for_all
from .train_state import DataPosition, TrainerRecord, TrainState
from .spikes import SpikeDetector
from .watchdog import Watchdog

log = logging.getLogger("flip_scale")


class Trainer:
    """Builds the parts from one config and runs the loop (module docstring)."""

    def __init__(self, cfg: Config, run_dir: Path, proc: ProcessInfo, with_data: bool = True):
        from .data import TokenizerError, build_tokenizer, build_train_loader, ensure_synthetic_data
        from .data.loader import pin_memory_for
        from .data.mixture import parse_sources
        from .data.shards import expand_shards

        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.proc = proc
        self.device = proc.device
        # Every check that needs the world size first: an impossible run is refused before
        # anything is built or written.
        self.plan = plan_run(cfg, proc.world_size)
        self.arch, self.dims, self.local_batch = self.plan.arch, self.plan.dims, self.plan.local_batch

        if proc.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.run_dir / "config.yaml")
            if with_data:
                ensure_synthetic_data(cfg.data, image_size=self.arch.image_size, vocab_size=self.arch.vocab_size)
        barrier()
        # Without data (benchmarks feed synthetic tensors) there is no tokenizer either. Bad data
        # settings are refused here, before the engine is built (usage errors: exit 2).
        self.tokenizer = None
        if with_data:
            try:
                if cfg.data.sources:
                    parse_sources(cfg.data.sources, cfg.data.resampled)
                else:
                    expand_shards(cfg.data.train_shards, check_exists=False)
            except (ValueError, FileNotFoundError) as error:
                raise ConfigError(f"{'data.sources' if cfg.data.sources else 'data.train_shards'}: {error}") from None
            try:
                self.tokenizer = build_tokenizer(cfg.data.tokenizer, context_length=self.arch.context_length)
            except TokenizerError as error:  # its message names data.tokenizer
                raise ConfigError(str(error)) from None
            except (ValueError, FileNotFoundError) as error:
                key = "data.tokenizer" if isinstance(error, FileNotFoundError) else "data.train_shards"
                raise ConfigError(f"{key}: {error}") from None
        if self.tokenizer is not None:
            check_tokenizer_size(cfg, self.tokenizer.vocab_size, self.arch)

        self.counts = count_parameters(build_model(cfg.model, device="meta", mae_decoder=cfg.loss.mae_weight > 0))
        # Before anything heavy: a run directory that cannot hold one checkpoint is refused.
        on_rank0_for_all(lambda: check_free_space(self.run_dir, self.counts["params_total"], cfg.checkpoint,
                                                  cfg.train.max_steps))
        self.engine = build_engine(cfg, self.plan, self.device)
        self.precision = self.engine.precision
        self.train_flops_per_sample = train_flops_per_sample(cfg.model, cfg.loss.mae_weight > 0)
        self.state = TrainState()
        self.nonfinite = NonfiniteSteps(self.state, cfg.optim.max_nonfinite_steps)
        self.loader = (build_train_loader(cfg.data, self.arch.image_size, self.tokenizer, self.dims.dp_rank,
                                          self.dims.dp_size, self.local_batch, cfg.train.seed,
                                          pin_memory=pin_memory_for(self.device))
                       if with_data else None)
        self.data_position = DataPosition(self.loader, self.dims.dp_rank,
                                          writes=self.dims.tp_rank == 0 and self.dims.pp_rank == 0)
        self.checkpoints = CheckpointManager(
            self.run_dir, cfg.checkpoint, config_yaml=cfg.to_yaml(),
            states={"engine": self.engine, "trainer": TrainerRecord(self.state, self.engine, proc.world_size),
                    "data": self.data_position},
            model_arch=self.arch.to_dict(), model_config=asdict(cfg.model),
            writer_timeout_s=collective_timeouts(cfg)[0],  # the long one: the watchdog never shortens it
        )
        self.metrics = MetricsWriter(self.run_dir, enabled=proc.is_main, tensorboard=cfg.logging.tensorboard)
        self.spikes = SpikeDetector(cfg.train.spike_factor, cfg.train.spike_window, self.run_dir / "spikes.jsonl",
                                    writes=proc.is_main)
        first_limit, limit = collective_timeouts(cfg)
        self.watchdog = Watchdog(proc.rank, proc.world_size, first_limit_s=first_limit, limit_s=limit)
        self.eval_metrics = MetricsWriter(self.run_dir, enabled=proc.is_main, tensorboard=False, filename="eval.jsonl")

    # The engine's parts, for tools and tests that look inside.
    @property
    def model_parts(self):
        return self.engine.model_parts

    @property
    def optimizers(self):
        return getattr(self.engine, "optimizers", None)  # the native engine's OptimizerGroup

    def parameters(self):
        return self.engine.parameters()

    def describe(self) -> None:
        local = self.engine.local_parameter_count()
        c = self.counts
        log.info("model %s: %.2fM params (vision %.2fM, text %.2fM); mask ratio %.2f -> %d of %d patches visible",
                 self.cfg.model.name, c["params_total"] / 1e6, c["params_vision"] / 1e6, c["params_text"] / 1e6,
                 self.cfg.model.mask_ratio, self.plan.visible_patches, self.arch.num_patches)
        log.info("layout: %s | world %d | device %s | precision %s", self.dims.describe(), self.proc.world_size,
                 self.device, self.precision)
        log.info("global batch %d = %d data-parallel ranks x %d (grad accumulation %d, %s contrast)",
                 self.cfg.train.global_batch_size, self.dims.dp_size, self.local_batch, self.cfg.optim.grad_accum_steps,
                 self.cfg.loss.microbatch_contrast)
        if getattr(self.cfg.parallel, "microbatches_from_default", False):
            log.info("parallel.microbatches not set: %d (2 x parallel.pp=%d)", self.cfg.parallel.microbatches,
                     self.cfg.parallel.pp)
        log.info("peak lr %.3e, warmup %d, %s schedule, %d steps", effective_lr(self.cfg), self.cfg.schedule.warmup_steps,
                 self.cfg.schedule.name, self.cfg.train.max_steps)
        for line in self.engine.describe():
            log.info("%s", line)
        if self.proc.world_size > 1:
            # Every rank reports its own share (warning level: other ranks log only warnings).
            log.warning("rank %d holds %.2fM parameters locally", self.proc.rank, local / 1e6)

    # ------------------------------------------------------------------ checkpoints
    def resume(self, path: Path) -> None:
        """Model, optimizer, lr schedule, step, RNG and data position from `path` (any layout of the
        same architecture; another architecture is refused before anything is loaded)."""
        self._check_engine_of(path)
        self.checkpoints.load(path)
        if not self.data_position.found and self.state.samples_seen > 0 and self.tokenizer is not None:
            log.warning("%s holds no data stream position: the stream starts from its beginning and the first "
                        "%d samples are seen again", path, self.state.samples_seen)
        log.info("resumed from %s at step %d (%d samples seen)", path, self.state.step, self.state.samples_seen)

    def _check_engine_of(self, path) -> None:
        """A checkpoint resumes under the engine that wrote it; another engine starts from its
        weights (--init-from). Checkpoints from before the engine was recorded are the native one's."""
        import json

        from .checkpoint import CheckpointError

        state_file = Path(path) / "trainer_state.json"
        if not state_file.is_file():
            return  # the manager names what is missing
        written_by = json.loads(state_file.read_text()).get("engine", "fsdp")
        if written_by != self.engine.name:
            raise CheckpointError(
                f"{path} was written by parallel.engine={written_by}, and this run uses parallel.engine="
                f"{self.engine.name}: resume it with parallel.engine={written_by}, or start this engine from its "
                f"weights with --init-from {path} (a fresh optimizer and step)")

    def init_from(self, path) -> None:
        """Weights only (fresh optimizer, step 0) from a training checkpoint (a step directory or a run
        directory's latest) or a consolidated directory (model.safetensors + flip_config.yaml, as
        `tools/convert_ckpt.py consolidate` / `from-openclip` write), into any layout. Another
        architecture is refused before anything is loaded; other pooling / text mask / norm eps options
        are logged, not refused (a fine-tune may intend them)."""
        from .checkpoint import CheckpointSource, check_source_architecture, resolve_init_from

        source = path if isinstance(path, CheckpointSource) else resolve_init_from(path)
        check_source_architecture(source, self.cfg.model, functional="warn")
        self.engine.load_weights(source)
        if self.cfg.train.init_from_parts:  # LiT: the other towers back to their initial weights
            from .models.lock import reinitialize_other_towers

            for part in self.engine.model_parts:
                reinitialize_other_towers(part, self.cfg.model, self.cfg.train.seed, self.cfg.train.init_from_parts)
            log.info("--init-from: kept %s of %s; the rest has its initial weights",
                     ", ".join(self.cfg.train.init_from_parts), source.path)
        what = {"dcp": "training checkpoint", "deepspeed": "DeepSpeed training checkpoint"}.get(source.kind,
                                                                                             "consolidated directory")
        log.info("initialised weights from %s (fresh optimizer, step 0): a %s", source.path, what)

    def save(self) -> Optional[Path]:
        """Checkpoint at the current step (collective). With checkpoint.async_save the shards are
        written in the background and committed at the next save or at the end of `fit`."""
        self.settle_nonfinite()  # the counters it stores
        self.flush_skipped()  # the checkpoint holds every sample skipped up to its step
        with self.watchdog.long_phase("checkpoint save"):
            return self.checkpoints.save(self.state.step)

    def flush_skipped(self) -> None:
        """Every data-parallel rank's skipped samples since the last flush into the counters (collective)."""
        from .data.fields import SKIP_KINDS

        sources = tuple(str(source.get("name", f"source{i}")) for i, source in enumerate(self.cfg.data.sources or []))
        self.state.flush_skipped(SKIP_KINDS, self.dims.dp_group, self.device, sources)

    # ------------------------------------------------------------------ one step
    def autocast(self):
        return self.engine.autocast()

    def mask_noise(self, step: int, sample_index: torch.Tensor) -> Optional[torch.Tensor]:
        """Each sample's mask noise, from (seed, step, its row in the global batch): the same mask in
        both passes of the feature cache and under every layout. With text masking the text tokens'
        noise (another stream) follows the image patches' in each row (`models.sample_mask_noise`)."""
        text_tokens = self.arch.context_length if self.cfg.model.text_mask_ratio > 0 else 0
        if self.cfg.model.mask_ratio <= 0 and not text_tokens:
            return None
        return host_to_device(sample_mask_noise(self.cfg.train.seed, step, sample_index, self.arch.num_patches,
                                                text_tokens), self.device)

    def train_step(self, batch: dict) -> dict:
        images = host_to_device(batch["images"], self.device)  # the loader's are pinned already
        tokens = host_to_device(batch["tokens"], self.device)
        index = batch.get("sample_index")
        if index is None:  # a batch made by hand (benchmarks, tests): this rank's rows in order
            first = self.dims.dp_rank * images.shape[0]
            index = torch.arange(first, first + images.shape[0])
        noise = self.mask_noise(self.state.step, index)
        self.engine.train()
        loss = self.engine.forward_backward(images, tokens, noise)
        result = self.engine.clip_and_step()
        self.nonfinite.count(result, loss)
        return {"loss": loss, "grad_norm": result.grad_norm, "lr": result.lr, "skipped_step": result.skipped,
                **self.engine.step_stats}  # mae_loss where loss.mae_weight > 0

    def settle_nonfinite(self) -> None:
        """The skips counted on the device into the state (flip_scale/nonfinite.py)."""
        self.nonfinite.settle()

    def logit_scale(self) -> float:
        return self.engine.logit_scale()

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        """The loop, under the watchdog (flip_scale/watchdog.py): a step that makes no progress within
        train.collective_timeout_* stops this rank with a message naming the step."""
        self.watchdog.start(self.state.step)
        try:
            return self._loop()
        finally:
            self.watchdog.stop()

    def _loop(self) -> dict:
        cfg, state = self.cfg, self.state
        batches = iter(self.loader)
        metrics = StepMetrics(cfg, self.dims, self.device, self.proc.world_size, self.train_flops_per_sample,
                              self.precision, state.step)
        last = {}
        while state.step < cfg.train.max_steps:
            waited = time.perf_counter()
            batch = next(batches)
            wait = time.perf_counter() - waited
            out = self.train_step(batch)
            state.step += 1
            state.samples_seen += cfg.train.global_batch_size
            self.watchdog.progress(state.step)
            self.spikes.check(state.step, out["loss"], batch, self.dims.dp_group, self.device)
            metrics.add(out["loss"], out.get("skipped_step", False), batch.get("skipped", 0), wait, out.get("mae_loss"))
            state.note_skipped(batch.get("skipped_kinds", {}))
            state.note_sources(batch.get("source_samples", {}), batch.get("source_skipped", {}))
            step = state.step
            if metrics.due(step):
                last = self.log_step(metrics, out)
            periodic = cfg.checkpoint.every_steps > 0 and step % cfg.checkpoint.every_steps == 0
            if periodic or step == cfg.train.max_steps:
                self.save()
            # Preemption (flip_scale/preemption.py): all ranks agree, save this step, stop.
            if step < cfg.train.max_steps and preemption.requested(self.device):
                if not periodic:
                    self.save()
                log.info("preemption requested: stopped after step %d with its checkpoint; exit code %d",
                         step, preemption.EXIT_CODE)
                return {"step": step, "preempted": True, **last}
            if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step != cfg.train.max_steps:
                self.evaluate()
        # An asynchronous checkpoint still being written is committed before anything else can fail.
        with self.watchdog.long_phase("checkpoint commit"):
            self.checkpoints.finalize()
        if self.checkpoints.failed_in_a_row:
            raise CheckpointSaveError(f"the final checkpoint of step {state.step} was not written (the error is logged "
                                      f"above): the run ends without it; resume from the last one written")
        result = {"step": state.step, **last}
        if cfg.eval.at_end:
            evaluation = self.evaluate()
            if evaluation is not None:
                result.update(evaluation)  # "zero_shot" and/or "retrieval"
        return result

    def log_step(self, metrics: StepMetrics, out: dict) -> dict:
        """Reduce the interval's metrics over the data-parallel ranks, write them (rank 0), log a line."""
        step, state = self.state.step, self.state
        from .data.fields import SKIP_KINDS

        self.settle_nonfinite()
        timing, _ = metrics.collect(step)  # the skipped samples are counted per kind (flush_skipped)
        self.flush_skipped()
        values = {"loss": timing.pop("loss"), **({"mae_loss": timing.pop("mae_loss")} if "mae_loss" in timing else {}),
                  "lr": out["lr"], "logit_scale": self.logit_scale(),
                  "grad_norm": float(out["grad_norm"]), **timing, "samples_seen": state.samples_seen,
                  "mask_ratio": self.cfg.model.mask_ratio, "skipped_samples": state.skipped_samples,
                  **{f"skipped_{kind}": state.skipped_by_kind.get(kind, 0) for kind in SKIP_KINDS},
                  **state.source_counts,  # a mixture's source_<name>_samples, source_<name>_skipped
                  "nonfinite_steps": state.nonfinite_steps}
        if "mfu" in values:  # after the counters, as before
            values["mfu"] = values.pop("mfu")
        self.metrics.write(step, values)
        log.info(metrics.line(step, values))
        return values

    def evaluate(self) -> Optional[dict]:
        """Zero-shot classification and retrieval as configured (eval.*), unmasked; collective.
        Returns {"zero_shot": ..., "retrieval": ...} (the configured ones), or None."""
        from .evaluation import EvalGroup, describe, log_values, run_evaluation

        # Each data-parallel rank embeds its share of the data (the tp and pp ranks of a replica the
        # same share) in lockstep, so every rank takes part in every forward; the counts are
        # all-reduced.
        model = self.engine.eval_model()
        started = time.perf_counter()
        with self.autocast(), self.watchdog.long_phase("evaluation"):
            results = run_evaluation(model, self.tokenizer, self.cfg, self.device, EvalGroup.from_dims(self.dims))
        del model
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
        self.watchdog.close()
        self.checkpoints.close()
        self.metrics.close()
        self.eval_metrics.close()
        self.engine.close()
