"""The DeepSpeed engine: ZeRO-1/2/3 (+ CPU/NVMe offload, ZeRO++ through parallel.deepspeed_config),
data parallel only, behind the same seam as the native engine.

    parallel.engine: deepspeed, parallel.zero_stage: 1 | 2 | 3, parallel.offload_optimizer / offload_params

What it shares with the native engine: the model (built under `deepspeed.zero.Init` for ZeRO-3, so
no rank holds it whole, and given the one-process weights parameter by parameter), the param
groups, the loss, the exact two-pass feature cache, the lr schedule (ours, set on the optimizer's
groups each step), the temperature clamp, the run directory. What is DeepSpeed's: the sharding,
the gradient reduction, clipping (`gradient_clipping`) and the non-finite-step skip inside
`engine.step()`, and its checkpoint files (checkpoint_kind "files": step_XXXXXXXX/deepspeed/).

The feature cache goes through the engine: pass 2 back-propagates each micro-batch's slice of the
cached gradients with `engine.backward` (a surrogate scalar whose gradient is exactly that slice),
and `engine.step()` follows each micro-batch, so DeepSpeed counts micro-steps, reduces at its
accumulation boundary and clips there.

Loading never unpickles code: DeepSpeed's `torch.load(weights_only=False)` calls are served by
checkpoint.deepspeed_files.safe_torch_load (weights_only=True and an allow-list of DeepSpeed's few
classes) while a checkpoint loads. Resuming into another data-parallel size re-shards from the
files: each parameter's fp32 weights and Adam moments are assembled and set through DeepSpeed's
own `safe_set_full_*` APIs.

The checkpoint side (its files, re-sharding, --init-from) is engine/deepspeed_state.py.
`import deepspeed` happens there and here only, when this engine is chosen.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from ..loss import build_loss
from ..optim import lr_at, nvidia_apex_available, param_groups
from ..parallel.activation import apply_ac, apply_compile
from ..parallel.deepspeed_config import deepspeed_config
from ..runtime import resolve_precision
from ..step import split_outputs
from .base import Engine, StepResult
from .deepspeed_state import ZeroStateMixin, full_shape

log = logging.getLogger("flip_scale")

# The temperature's shape in the live model: DeepSpeed broadcasts parameters through uint8 views,
# which a 0-dim tensor cannot take. Everything read from or written for other engines has shape ().
TEMPERATURE_SHAPE = (1,)


def import_deepspeed():
    """deepspeed, or an ImportError that says how to get it."""
    try:
        import deepspeed
    except ImportError as error:
        raise ImportError(
            f"parallel.engine=deepspeed needs DeepSpeed ({error}); install it with `pip install deepspeed`, "
            f"or use parallel.engine: fsdp") from None
    return deepspeed


@contextlib.contextmanager
def _launcher_variables():
    """RANK / WORLD_SIZE for DeepSpeed's construction in one process started without a launcher:
    set while it builds and removed after (left behind they would tell later runs and child
    processes, an srun job's tasks say, that they are rank 0 of a world of 1)."""
    added = []
    if not dist.is_initialized():
        for name, value in (("RANK", "0"), ("WORLD_SIZE", "1")):
            if name not in os.environ:
                os.environ[name] = value
                added.append(name)
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def _ensure_process_group(device: torch.device) -> bool:
    """DeepSpeed wants a process group even for one process: make a one-rank one when there is none.
    Returns whether one was made here."""
    if dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


def _forget_process_groups() -> None:
    """DeepSpeed keeps the process groups it made in module globals (deepspeed.utils.groups); the
    trainer destroys the process group after the engine closes, so a later run in this process (a
    test, a notebook, the unmask tool after training) must not find the old ones."""
    from deepspeed.utils import groups

    for name, value in list(vars(groups).items()):
        if name.startswith("_") and name.endswith(("_GROUP", "_GROUP_RANKS")) and not name.startswith("__"):
            setattr(groups, name, {} if isinstance(value, dict) else None)
    for name in ("mesh_device", "mpu"):
        if hasattr(groups, name):
            setattr(groups, name, None)


def fused_adam_prebuilt() -> bool:
    """DeepSpeed's FusedAdam was compiled when DeepSpeed was installed (else its first use builds it)."""
    try:
        from deepspeed.git_version_info import installed_ops
    except ImportError:
        return False
    return bool(installed_ops.get("fused_adam", False))


class DeepSpeedEngine(ZeroStateMixin, Engine):
    name = "deepspeed"
    checkpoint_kind = "files"

    def __init__(self, cfg, plan, device):
        super().__init__(cfg, plan, device)
        # DeepSpeed reads LOCAL_RANK in every forward (and zero.Init): set for the engine's life
        # where no launcher did, removed by close().
        self._added_local_rank = "LOCAL_RANK" not in os.environ
        if self._added_local_rank:
            os.environ["LOCAL_RANK"] = str(self.device.index or 0)
        with _launcher_variables():
            self._construct(cfg)

    def _construct(self, cfg) -> None:
        ds = import_deepspeed()
        self._ds = ds
        self._own_group = _ensure_process_group(self.device)
        ds.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)  # wraps our group
        self.dims.build_mesh(self.device.type)
        self.precision = resolve_precision(cfg, self.device)
        self.stage = cfg.parallel.zero_stage
        self.ds_config = deepspeed_config(cfg, self.dims, self.precision, self.arch)
        self.rank = dist.get_rank()
        torch.manual_seed(cfg.train.seed)

        model = self._build_model()
        pcfg = cfg.parallel
        apply_ac(model, pcfg.activation_checkpointing, pcfg.activation_checkpointing_every,
                 pcfg.activation_checkpointing_towers)
        if pcfg.compile:
            apply_compile(model)
        optimizer = self._build_optimizer(model)
        self.engine, self.optimizer, _, _ = ds.initialize(model=model, optimizer=optimizer, config=self.ds_config,
                                                          dist_init_required=False)
        self.module = self.engine.module
        self.model_parts = [self.module]
        if self.ds_config.get("bf16", {}).get("enabled"):
            # DeepSpeed made its fp32 masters from the bf16 weights: give them the exact initial values,
            # as the native engine's fp32 parameters have them.
            self._set_full_state(self._initial_values(), None, "the initial weights")
        self.loss_fn = build_loss(cfg.loss, self.dims.dp_group)
        self.steps_taken = 0  # optimizer steps, skipped ones included: the lr schedule's position
        self._set_lr()

    # -- building ----------------------------------------------------------------------------
    def _build_model(self):
        from ..models import build_model
        from ..models.init import initial_value
        from ..models.transformer import Block

        cfg = self.cfg
        if self.stage != 3:
            # ZeRO-1/2 keep the whole model on every rank: the one-process weights, built in place.
            model = build_model(cfg.model, device=self.device, init=False, temperature_shape=TEMPERATURE_SHAPE,
                                mae_decoder=cfg.loss.mae_weight > 0)
            model.init_weights(cfg.train.seed)
            return model
        # ZeRO-3: each module is partitioned as it is constructed; then each parameter is gathered
        # alone, given its initial value (a function of seed and name) and re-partitioned.
        ds = self._ds
        with ds.zero.Init(config_dict_or_path=self.ds_config, remote_device=self._param_device()):
            model = build_model(cfg.model, device=self.device, init=False, temperature_shape=TEMPERATURE_SHAPE,
                                mae_decoder=cfg.loss.mae_weight > 0)
        model.visual.init_weights()  # the fixed sin-cos table (a buffer, never partitioned)
        if model.decoder is not None:
            model.decoder.init_weights()
        for name, param in model.named_parameters():
            value = initial_value(name, full_shape(param), cfg.train.seed, cfg.model.logit_scale_init,
                                  cfg.model.logit_bias_init)
            with ds.zero.GatheredParameters([param], modifier_rank=0):
                if self.rank == 0:
                    param.data.copy_(value.to(param.dtype))
        # Every transformer block is one ZeRO-3 fetch unit (one all-gather per block, DeepSpeed#5047).
        ds.utils.set_z3_leaf_modules(model, [Block])
        return model

    def _initial_values(self):
        from ..models.init import initial_value

        for name, param in self.module.named_parameters():
            yield name, {"fp32": initial_value(name, full_shape(param), self.cfg.train.seed, self.cfg.model.logit_scale_init,
                                                self.cfg.model.logit_bias_init)}

    def _param_device(self) -> Optional[str]:
        offload = self.cfg.parallel.offload_params
        return None if offload == "none" else offload

    def _build_optimizer(self, model):
        """AdamW over our decay / no-decay groups: DeepSpeed's CPU Adam with optimizer offload,
        DeepSpeed's FusedAdam on CUDA (PyTorch's fused AdamW where that cannot load), else PyTorch's."""
        cfg = self.cfg
        groups = param_groups(model, cfg.optim.weight_decay)
        kwargs = dict(lr=lr_at(0, cfg), betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
        if cfg.parallel.offload_optimizer != "none":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            try:
                optimizer = DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
            except Exception as error:  # the op is compiled on first use
                raise RuntimeError(
                    f"parallel.offload_optimizer={cfg.parallel.offload_optimizer} needs DeepSpeed's CPU Adam, which "
                    f"failed to build or load here: {error}; see `ds_report`, or set parallel.offload_optimizer=none"
                ) from error
            self.optimizer_kind = "DeepSpeed CPU Adam (AdamW mode, offloaded optimizer)"
            return optimizer
        if self.device.type == "cuda" and cfg.optim.fused != "false":
            # Not prebuilt, FusedAdam is built with nvcc on first use (minutes at the start of a job on
            # a new node) for a kernel no faster than PyTorch's fused AdamW: that one is taken then.
            why = "not prebuilt in this install (DS_BUILD_FUSED_ADAM=1)"
            if fused_adam_prebuilt():
                try:
                    from deepspeed.ops.adam import FusedAdam

                    optimizer = FusedAdam(groups, adam_w_mode=True, **kwargs)
                    self.optimizer_kind = "DeepSpeed FusedAdam (AdamW mode)"
                    return optimizer
                except Exception as error:
                    why = f"not available ({error})"
            log.warning("DeepSpeed's FusedAdam is %s: using PyTorch's fused AdamW", why)
            self.optimizer_kind = "PyTorch AdamW (fused)"
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        fused = self.device.type == "cuda" and cfg.optim.fused == "true"
        self.optimizer_kind = f"PyTorch AdamW ({'fused' if fused else 'foreach'})"
        return torch.optim.AdamW(groups, fused=fused or None, foreach=None if fused else True, **kwargs)

    # -- one step --------------------------------------------------------------------------
    def train(self) -> None:
        self.engine.train()

    def _set_lr(self) -> None:
        lr = lr_at(self.steps_taken, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def forward_backward(self, images, tokens, mask_noise: Optional[torch.Tensor]) -> torch.Tensor:
        micro = self.cfg.optim.grad_accum_steps
        exact = self.cfg.loss.microbatch_contrast == "exact"
        batch = images.shape[0]
        if batch % micro:
            raise ValueError(f"a local batch of {batch} samples cannot be split into {micro} equal micro-batches")
        image_chunks, token_chunks = images.chunk(micro), tokens.chunk(micro)
        noise_chunks = mask_noise.chunk(micro) if mask_noise is not None else [None] * micro
        engine = self.engine
        mae_weight = self.cfg.loss.mae_weight  # the MAE loss: per sample, added per micro-batch (step.py)
        mae_total = torch.zeros((), device=images.device)
        self.step_stats.clear()

        if micro == 1 or not exact:
            total = torch.zeros((), device=images.device)
            for index in range(micro):
                with self.autocast():
                    image_features, text_features, log_scale, mae = split_outputs(
                        engine(image_chunks[index], token_chunks[index], noise_chunks[index]))
                    loss = self.loss_fn(image_features, text_features, log_scale)
                    if mae is not None:
                        loss = loss + mae_weight * mae
                        mae_total += mae.detach() / micro
                    loss = loss / micro
                engine.backward(loss, scale_wrt_gas=False)
                if index < micro - 1:
                    engine.step()  # a micro-step: DeepSpeed counts it; the last one is clip_and_step's
                total += loss.detach()
            if mae_weight > 0:
                self.step_stats["mae_loss"] = mae_total
            return total

        # Pass 1: every micro-batch's embeddings, no autograd graph kept.
        with torch.no_grad():
            image_parts, text_parts = [], []
            for index in range(micro):
                with self.autocast():
                    image_features, text_features, log_scale = engine(
                        image_chunks[index], token_chunks[index], noise_chunks[index],
                        **({"reconstruct": False} if mae_weight > 0 else {}))
                image_parts.append(image_features)
                text_parts.append(text_features)
        image_all = torch.cat(image_parts).detach().requires_grad_(True)
        text_all = torch.cat(text_parts).detach().requires_grad_(True)
        log_scale = log_scale.detach().requires_grad_(True)
        with self.autocast():
            loss = self.loss_fn(image_all, text_all, log_scale)
        loss.backward()
        image_grads, text_grads = image_all.grad.chunk(micro), text_all.grad.chunk(micro)

        # Pass 2: each micro-batch again with autograd, back-propagating its slice of the cached
        # gradients through the engine (d surrogate / d output is exactly that slice).
        for index in range(micro):
            with self.autocast():
                image_features, text_features, scale_out, mae = split_outputs(
                    engine(image_chunks[index], token_chunks[index], noise_chunks[index]))
            surrogate = (image_features.float() * image_grads[index].float()).sum() \
                + (text_features.float() * text_grads[index].float()).sum()
            # The temperature's gradient is spread over the micro-batches (1/micro each: exact for
            # powers of two): DeepSpeed mishandles a parameter that has no gradient in some
            # micro-step (ZeRO-1 drops one missing from the last, ZeRO-3 one missing from the first).
            surrogate = surrogate + (scale_out.float() * (log_scale.grad.float() / micro)).sum()
            if mae is not None:
                surrogate = surrogate + mae.float() * (mae_weight / micro)
                mae_total += mae.detach() / micro
            engine.backward(surrogate, scale_wrt_gas=False)
            if index < micro - 1:
                engine.step()
        if mae_weight > 0:
            self.step_stats["mae_loss"] = mae_total
            return loss.detach() + mae_weight * mae_total
        return loss.detach()

    def clip_and_step(self) -> StepResult:
        lr = self.lr
        # The accumulation boundary: DeepSpeed reduces, takes the global norm, clips to
        # gradient_clipping and steps, or skips a step whose norm is not finite.
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        applied = self.engine.was_step_applied()
        if applied and not math.isfinite(norm):
            raise FloatingPointError(
                f"DeepSpeed applied an optimizer step whose gradient norm is {norm}: the weights are no longer "
                f"trustworthy (no checkpoint of them is written); resume from the last checkpoint")
        skipped = not applied
        self.steps_taken += 1
        self._set_lr()
        if not skipped:
            self._clamp_logit_scale()
        return StepResult(torch.tensor(norm), lr, skipped=skipped)

    @torch.no_grad()
    def _clamp_logit_scale(self) -> None:
        """Keep the temperature in [0, logit_scale_max]: the optimizer's fp32 master copy and the
        model's copy alike (collective; every rank computes the same value)."""
        from deepspeed.utils import safe_get_full_fp32_param

        param = self.module.logit_scale
        master = safe_get_full_fp32_param(param)
        clamped = master.clamp(0.0, self.module.logit_scale_max)
        if torch.equal(clamped, master):
            return
        self._set_full_hp(param, clamped)
        self._set_model_param(param, clamped)

    def _set_model_param(self, param, value: torch.Tensor) -> None:
        """The model's (low-precision) copy of `param` := value (collective under ZeRO-3)."""
        if self.stage == 3:
            with self._ds.zero.GatheredParameters([param], modifier_rank=0):
                if self.rank == 0:
                    param.data.copy_(value.to(param.dtype))
        else:
            param.data.copy_(value.to(param.device, param.dtype))

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        yield from self.module.parameters()

    @torch.no_grad()
    def full_parameters(self) -> dict:
        """name -> the whole fp32 (master) value of every parameter, on the CPU (collective)."""
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, param in self.module.named_parameters():
            if param.requires_grad:
                out[name] = safe_get_full_fp32_param(param).detach().float().cpu().clone()
                continue
            # A frozen parameter (a locked tower) has no fp32 master: the model's own copy.
            gather = self._ds.zero.GatheredParameters([param]) if self.stage == 3 else contextlib.nullcontext()
            with gather:
                out[name] = param.detach().float().cpu().clone()
        return out

    def optimizer_state_bytes(self) -> int:
        """Bytes of this rank's optimizer state: its fp32 master partition and the Adam moments."""
        base = self._base_optimizer()
        moments = sum(t.numel() * t.element_size() for state in base.state.values() for t in state.values()
                      if torch.is_tensor(t))
        flats = (getattr(self.optimizer, "fp32_partitioned_groups_flat", None)
                 or getattr(self.optimizer, "single_partition_of_fp32_groups", None) or [])
        return moments + sum(t.numel() * t.element_size() for t in flats)

    def local_parameter_count(self) -> int:
        if self.stage == 3:
            return sum(p.ds_tensor.numel() for p in self.module.parameters())
        return sum(p.numel() for p in self.module.parameters())

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def logit_scale(self) -> float:
        param = self.module.logit_scale
        gather = self._ds.zero.GatheredParameters([param]) if self.stage == 3 else contextlib.nullcontext()
        with gather:
            return float(param.detach().float().exp())

    # -- evaluation ------------------------------------------------------------------------
    def eval_model(self):
        # ZeRO-3's hooks live on the module: calling it gathers each block's parameters in turn.
        return self.module

    def _base_optimizer(self):
        return getattr(self.optimizer, "optimizer", self.optimizer)

    def schedule_state(self) -> dict:
        return {"steps_taken": self.steps_taken}

    def load_schedule_state(self, state: dict) -> None:
        self.steps_taken = int(state.get("steps_taken", 0))
        self._set_lr()

    def describe(self) -> list[str]:
        zero = self.ds_config["zero_optimization"]
        offload = [f"{what} -> {zero[key]['device']}" for key, what in (("offload_optimizer", "optimizer"),
                                                                         ("offload_param", "parameters"))
                   if zero.get(key, {}).get("device", "none") != "none"]
        bf16 = self.ds_config.get("bf16", {}).get("enabled", False)
        return [
            f"engine deepspeed {self._ds.__version__} (ZeRO-{self.stage}{'; offload ' + ', '.join(offload) if offload else ''}; "
            f"{'bf16 weights, fp32 master' if bf16 else 'fp32 weights'}); optimizer {self.optimizer_kind}; "
            f"LayerNorm: PyTorch's (NVIDIA apex {'importable' if nvidia_apex_available() else 'not importable'})",
            "deepspeed config: " + json.dumps(self.ds_config, sort_keys=True),
        ]

    def close(self) -> None:
        destroy = getattr(self.engine, "destroy", None)
        if destroy is not None:
            destroy()
        _forget_process_groups()
        if self._added_local_rank:
            os.environ.pop("LOCAL_RANK", None)
        if self._own_group and dist.is_initialized():
            dist.destroy_process_group()
