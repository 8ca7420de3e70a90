"""Whole-parameter values in and out of the DeepSpeed engine's ZeRO shards: its checkpoint files
(save, resume, re-shard into another stage or data-parallel size) and --init-from. A mixin of
`DeepSpeedEngine` (engine/deepspeed.py), which provides `engine`, `optimizer`, `module`, `stage`,
`dims`, `device`, `rank`, `cfg`, `steps_taken`, `_set_model_param` and `_base_optimizer`.
"""

from __future__ import annotations

from typing import Optional

import logging

import torch
import torch.distributed as dist

log = logging.getLogger("flip_scale")

# Scripts DeepSpeed copies into every save directory; we consolidate with tools/convert_ckpt.py
# (which never unpickles code) and do not ship executable files inside checkpoints.
_RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")


def full_shape(param) -> torch.Size:
    """The whole shape of a parameter (a ZeRO-3 partitioned one holds a flat slice)."""
    return getattr(param, "ds_shape", param.shape)



class ZeroStateMixin:
    def save_files(self, step_dir) -> None:
        """DeepSpeed's files into step_dir/deepspeed/ (collective)."""
        from pathlib import Path

        from ..checkpoint.deepspeed_files import DS_TAG

        step_dir = Path(step_dir)
        self.engine.save_checkpoint(str(step_dir), tag=DS_TAG, client_state={"flip_scale_steps_taken": self.steps_taken},
                                    save_latest=False)
        if self.rank == 0:
            for name in _RECOVERY_SCRIPTS:
                (step_dir / name).unlink(missing_ok=True)
        dist.barrier()

    def load_files(self, step_dir) -> None:
        """The weights, the optimizer state and DeepSpeed's counters from step_dir/deepspeed/
        (collective): DeepSpeed's own loader where stage and data-parallel size are the ones saved,
        else re-sharded parameter by parameter from the files."""
        from pathlib import Path

        from ..checkpoint import CheckpointError
        from ..checkpoint.deepspeed_files import DS_TAG, refusing_unsafe_loads
        from ..checkpoint.deepspeed_reader import DeepSpeedFiles

        step_dir = Path(step_dir)
        files = DeepSpeedFiles(step_dir)
        if files.nvme_optimizer:
            # DeepSpeed 0.19's loader restores the swap files but not the model's own partitions from
            # them (the resumed weights were the initial ones in our test): refused rather than wrong.
            raise CheckpointError(
                f"{step_dir}: its optimizer state was offloaded to NVMe (parallel.offload_optimizer=nvme), and "
                f"resuming such a checkpoint is not supported yet (DeepSpeed's loader would resume with wrong "
                f"weights); use parallel.offload_optimizer=cpu for runs that must resume")
        if files.zero_stage == self.stage and files.dp_world_size == self.dims.dp_size:
            with refusing_unsafe_loads():
                path, _ = self.engine.load_checkpoint(str(step_dir), tag=DS_TAG, load_module_strict=True,
                                                      load_optimizer_states=True, load_lr_scheduler_states=False)
            if path is None:
                raise CheckpointError(f"{step_dir / DS_TAG}: DeepSpeed found no checkpoint to load there")
            return
        log.info("re-sharding %s: ZeRO-%d over %d ranks -> ZeRO-%d over %d ranks", step_dir / DS_TAG,
                 files.zero_stage, files.dp_world_size, self.stage, self.dims.dp_size)
        self._set_full_state(files.parameters(("fp32", "exp_avg", "exp_avg_sq")), files.adam_step, str(step_dir))

    def _set_full_hp(self, param, value: torch.Tensor, state: Optional[str] = None) -> None:
        """This rank's part of `param`'s fp32 master weights (or of its Adam state `state`) := its
        part of the whole `value`. ZeRO-1/2: DeepSpeed's safe_set_full_* (fragment mapped). ZeRO-3:
        the same slice DeepSpeed's own setter takes, with the last rank's short (padded) partition
        allowed, which DeepSpeed 0.19's setter refuses for a parameter that does not divide evenly."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        value = value.to(self.device)
        if self.stage != 3:
            if state is None:
                safe_set_full_fp32_param(param, value)
            else:
                safe_set_full_optimizer_state(param, value, state)
            return
        zero = self.optimizer
        partition, group = zero._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=state)
        size = partition.numel()
        start = size * zero._get_param_partition_rank(param)
        piece = value.flatten()[start:start + size]
        partition.data.zero_()
        partition.data[:piece.numel()].copy_(piece)
        if zero._swappable_optimizer_subgroup(group):  # NVMe offload: written back, as DeepSpeed's setter does
            zero._optimizer_states_and_gradient_swap_out(group)

    def _adam_step_value(self, step: int, flat: torch.Tensor):
        """Adam's step count as the base optimizer keeps it: PyTorch's AdamW a float tensor (on the
        parameter's device when fused), DeepSpeed's FusedAdam / CPU Adam an int."""
        base = self._base_optimizer()
        if isinstance(base, torch.optim.AdamW):
            fused = bool(base.defaults.get("fused")) or bool(base.defaults.get("capturable"))
            return torch.tensor(float(step), device=flat.device if fused else "cpu")
        return int(step)

    def _flat_partitions(self) -> list:
        """This rank's fp32 master partitions, one per (sub-)group: what the base optimizer steps."""
        if self.stage == 3:
            return list(self.optimizer.fp32_partitioned_groups_flat)
        return list(self.optimizer.single_partition_of_fp32_groups)

    @torch.no_grad()
    def _set_full_state(self, named_values, adam_step: Optional[int], where: str) -> None:
        """Every parameter's whole fp32 value (and, where given, its Adam moments) into this engine's
        shards through DeepSpeed's tensor-fragment API (`safe_set_full_*`), then the model's own
        weights from the fp32 ones (collective). `named_values`: (name, {"fp32", ["exp_avg",
        "exp_avg_sq"]}) for every parameter; with moments, `adam_step` is Adam's step count."""
        from ..checkpoint import CheckpointError

        zero = self.optimizer
        params = dict(self.module.named_parameters())
        seen, with_moments = set(), False
        if self.stage == 3:
            # Every parameter partitioned first (as DeepSpeed's loader does): no gathered copy, and
            # no ZeRO++ secondary partition, outlives the new values.
            zero.checkpoint_event_prologue()
        for name, values in named_values:
            if name not in params:
                raise CheckpointError(f"{where}: holds parameter {name!r}, which this model does not have")
            param = params[name]
            if "exp_avg" in values and not with_moments:
                # Adam's state exists after a first step only: made on each flat partition (the
                # files' step count), and ZeRO-1/2's parameters linked to it again.
                with_moments = True
                for flat in self._flat_partitions():
                    zero.optimizer.state[flat] = {"step": self._adam_step_value(adam_step or 0, flat),
                                                  "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
                if self.stage < 3:
                    zero._hp_optimizer_states_linked = False
                    zero._lazy_init_hp_params_optimizer_state()
            seen.add(name)
            shape = full_shape(param)  # the temperature: () in the files, (1,) here
            self._set_full_hp(param, values["fp32"].float().reshape(shape))
            for key in ("exp_avg", "exp_avg_sq"):
                if key in values:
                    self._set_full_hp(param, values[key].float().reshape(shape), key)
        missing = sorted(set(params) - seen)
        if missing:
            raise CheckpointError(f"{where}: lacks {len(missing)} parameters of this model: {', '.join(missing[:8])}")
        # The model's own weights follow the fp32 ones only at the next step: copied now.
        if self.stage == 3:
            for sub_group in range(len(zero.fp16_groups)):
                zero._reassign_or_swap_out_partitioned_parameters(sub_group)
            zero.checkpoint_event_epilogue()
        else:
            zero.update_lp_params()

    def load_weights(self, source) -> None:
        """Weights only (the optimizer stays fresh) from any checkpoint source: a consolidated
        directory, a native (DCP) step directory, or a DeepSpeed one (collective)."""
        from ..checkpoint import load_weights
        from ..checkpoint.deepspeed_reader import DeepSpeedFiles
        from ..models import build_model

        if source.kind == "deepspeed":
            files = DeepSpeedFiles(source.path)
            self._set_full_state(files.parameters(("fp32",)), None, str(source.path))
            return
        # Every rank reads the whole model into a plain CPU copy (rank 0 reads a consolidated file
        # and broadcasts it), then hands each parameter to DeepSpeed.
        plain = build_model(self.cfg.model, device="cpu", init=False)
        load_weights(source, [plain], broadcast_from_rank0=source.kind == "consolidated", whole_model=True)
        self._set_full_state(((name, {"fp32": value.detach()}) for name, value in plain.named_parameters()),
                             None, str(source.path))
        del plain

