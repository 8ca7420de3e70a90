"""Whole-parameter values in and out of the DeepSpeed engine's ZeRO shards: its checkpoint files
(save, resume, re-shard into another stage or data-parallel size; with the optimizer on NVMe, its
swapped sub-groups written into and read back from those files) and --init-from. A mixin of
`DeepSpeedEngine` (engine/deepspeed.py), which provides `engine`, `optimizer`, `module`, `stage`,
`dims`, `device`, `rank`, `cfg`, `steps_taken`, `_set_model_param` and `_base_optimizer`.
"""

from __future__ import annotations

from typing import Optional

import contextlib
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



class _OpenSubGroups:
    """ZeRO-3 loading: one optimizer sub-group open (in memory: swapped in where it lives on NVMe)
    at a time. Closing one copies its fp32 partition into the model's own partitions and swaps it
    out; opening one the first time with moments gives it zeroed Adam state and the step count."""

    def __init__(self, engine, adam_step: Optional[int]):
        self.engine, self.zero, self.adam_step = engine, engine.optimizer, adam_step
        self.current: Optional[int] = None
        self.done: set = set()  # sub-groups whose model partitions were updated
        self._with_moments: set = set()

    def open(self, group: int, with_moments: bool) -> None:
        zero = self.zero
        if group != self.current:
            self.close()
            if zero._swappable_optimizer_subgroup(group):
                zero._optimizer_states_and_gradient_swap_in(group)
            self.current = group
        if with_moments and group not in self._with_moments:
            self._with_moments.add(group)
            flat = zero.fp32_partitioned_groups_flat[group]
            state = zero.optimizer.state[flat]
            state["step"] = self.engine._adam_step_value(self.adam_step or 0, flat)
            for key in ("exp_avg", "exp_avg_sq"):
                # A moment swapped in with its partition is filled in place: the swapper writes
                # that tensor back at swap-out, not a new one in its place.
                if torch.is_tensor(state.get(key)) and state[key].numel() == flat.numel():
                    state[key].zero_()
                else:
                    state[key] = torch.zeros_like(flat)

    def close(self) -> None:
        group, self.current = self.current, None
        if group is None:
            return
        zero = self.zero
        zero._reassign_or_swap_out_partitioned_parameters(group)
        self.done.add(group)
        if zero._swappable_optimizer_subgroup(group):
            zero._optimizer_states_and_gradient_swap_out(group)


class ZeroStateMixin:
    def save_files(self, step_dir) -> None:
        """DeepSpeed's files into step_dir/deepspeed/ (collective). A write that fails on this
        rank alone (its disk full) is held until every rank has reached the trailing barrier, then
        raised: the checkpoint manager's agreement that follows is then the same collective on
        every rank, and no rank is left waiting in a barrier the failing one skipped."""
        from pathlib import Path

        from ..checkpoint.deepspeed_files import DS_TAG

        step_dir = Path(step_dir)
        error = None
        try:
            with self._swapped_state_in_the_files():
                self.engine.save_checkpoint(str(step_dir), tag=DS_TAG, save_latest=False,
                                            client_state={"flip_scale_steps_taken": self.steps_taken})
            if self.rank == 0:
                for name in _RECOVERY_SCRIPTS:
                    (step_dir / name).unlink(missing_ok=True)
        except Exception as caught:  # noqa: BLE001 - raised below, after the barrier every rank reaches
            error = caught
        dist.barrier()
        if error is not None:
            raise error

    def load_files(self, step_dir) -> None:
        """The weights, the optimizer state and DeepSpeed's counters from step_dir/deepspeed/
        (collective): DeepSpeed's own loader where stage and data-parallel size are the ones saved
        and no optimizer state lives on NVMe, else parameter by parameter from the files (a re-shard;
        with NVMe one optimizer sub-group swapped in at a time). A checkpoint saved before any
        optimizer step (every step so far skipped) has no Adam state: its weights alone are set."""
        from pathlib import Path

        from ..checkpoint import CheckpointError
        from ..checkpoint.deepspeed_files import DS_TAG, refusing_unsafe_loads
        from ..checkpoint.deepspeed_reader import DeepSpeedFiles

        step_dir = Path(step_dir)
        files = DeepSpeedFiles(step_dir)
        # With the optimizer on NVMe (in the files or in this engine), DeepSpeed's loader does not read
        # the optimizer files: it copies its swap-folder snapshot back and refreshes the model from
        # it, which restores neither a sub-group kept in memory (under 1 MiB) nor the Adam moments
        # and step of a swapped one. Those checkpoints load through the files, as a re-shard does.
        nvme = files.nvme_optimizer or self._swaps_optimizer()
        if files.zero_stage == self.stage and files.dp_world_size == self.dims.dp_size and not nvme:
            with refusing_unsafe_loads():
                path, _ = self.engine.load_checkpoint(str(step_dir), tag=DS_TAG, load_module_strict=True,
                                                      load_optimizer_states=True, load_lr_scheduler_states=False)
            if path is None:
                raise CheckpointError(f"{step_dir / DS_TAG}: DeepSpeed found no checkpoint to load there")
            return
        log.info("%s %s: ZeRO-%d over %d ranks -> ZeRO-%d over %d ranks", "loading (NVMe optimizer offload)" if nvme
                 else "re-sharding", step_dir / DS_TAG, files.zero_stage, files.dp_world_size, self.stage,
                 self.dims.dp_size)
        states = ("fp32",) if files.adam_step is None else ("fp32", "exp_avg", "exp_avg_sq")
        self._set_full_state(files.parameters(states), files.adam_step, str(step_dir))

    def _set_full_hp(self, param, value: torch.Tensor, state: Optional[str] = None) -> None:
        """This rank's part of `param`'s fp32 master weights (or of its Adam state `state`) := its
        part of the whole `value`. ZeRO-1/2: DeepSpeed's safe_set_full_* (fragment mapped). ZeRO-3:
        `_set_partition`, its sub-group swapped in and out around it where it lives on NVMe."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        if self.stage != 3:
            value = value.to(self.device)
            if state is None:
                safe_set_full_fp32_param(param, value)
            else:
                safe_set_full_optimizer_state(param, value, state)
            return
        zero = self.optimizer
        group = self._sub_group(param)
        swapped = zero._swappable_optimizer_subgroup(group)
        if swapped:
            zero._optimizer_states_and_gradient_swap_in(group)
        self._set_partition(param, value, state)
        if swapped:
            zero._optimizer_states_and_gradient_swap_out(group)

    def _sub_group(self, param) -> int:
        """ZeRO-3: the optimizer sub-group (one flat fp32 partition) that holds `param`'s part."""
        return self.optimizer.grad_position[self.optimizer.get_param_id(param)][0]

    def _set_partition(self, param, value: torch.Tensor, state: Optional[str] = None) -> None:
        """ZeRO-3, `param`'s sub-group in memory (swapped in where it lives on NVMe): this rank's
        slice of the whole `value` into its fp32 partition (or Adam state `state`), the slice
        DeepSpeed's own setter takes, with the last rank's short (padded) partition allowed, which
        DeepSpeed 0.19's setter refuses for a parameter that does not divide evenly."""
        zero = self.optimizer
        group, offset, numel = zero.grad_position[zero.get_param_id(param)]
        flat = zero.fp32_partitioned_groups_flat[group]
        partition = (flat if state is None else zero.optimizer.state[flat][state]).narrow(0, offset, numel)
        start = numel * zero._get_param_partition_rank(param)
        piece = value.to(partition.device).flatten()[start:start + numel]
        partition.data.zero_()
        partition.data[:piece.numel()].copy_(piece)

    def _swaps_optimizer(self) -> bool:
        """Whether this engine keeps (some of) its optimizer state in NVMe swap files."""
        return self.stage == 3 and bool(getattr(self.optimizer, "swap_optimizer", False))

    @contextlib.contextmanager
    def _swapped_state_in_the_files(self):
        """While DeepSpeed saves: the fp32 partition and Adam moments of every sub-group that lives
        in NVMe swap files held in host memory, so its optimizer files hold them as they hold any
        other sub-group's (DeepSpeed would write empty tensors there, and copy its whole swap folder
        beside them instead, which its loader does not restore from: see load_files). Costs this
        rank's swapped partitions in host memory (12 bytes per parameter / data-parallel size, fp32
        Adam) for the length of the save; DeepSpeed's swap-folder copy is not made."""
        if not self._swaps_optimizer():
            yield
            return
        zero = self.optimizer
        held = []  # (tensor, its released storage) for each swapped tensor given a copy
        try:
            for group in range(len(zero.fp16_groups)):
                if not zero._swappable_optimizer_subgroup(group):
                    continue
                zero._optimizer_states_and_gradient_swap_in(group)
                try:
                    flat = zero.fp32_partitioned_groups_flat[group]
                    tensors = [flat] + [value for value in zero.optimizer.state.get(flat, {}).values()
                                        if torch.is_tensor(value) and value.numel() == flat.numel()]
                    copies = [tensor.detach().clone() for tensor in tensors]
                finally:
                    zero._release_swap_buffers(group)  # nothing written: the swap files are unchanged
                for tensor, copy in zip(tensors, copies):
                    held.append((tensor, tensor.data))
                    tensor.data = copy
            # DeepSpeed's copy of the swap folder into the checkpoint: the optimizer files hold it all.
            self.engine.zero_nvme_offload_optimizer = lambda: False
            yield
        finally:
            self.engine.__dict__.pop("zero_nvme_offload_optimizer", None)
            for tensor, released in held:
                tensor.data = released

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
        shards (ZeRO-1/2: DeepSpeed's tensor-fragment setters `safe_set_full_*`; ZeRO-3: our slice
        of each sub-group's flat partition, `_set_partition`), then the model's own
        weights from the fp32 ones (collective). `named_values`: (name, {"fp32", ["exp_avg",
        "exp_avg_sq"]}) for every parameter; with moments, `adam_step` is Adam's step count."""
        from ..checkpoint import CheckpointError

        zero = self.optimizer
        params = dict(self.module.named_parameters())
        seen: set = set()
        if self.stage == 3:
            # Every parameter partitioned first (as DeepSpeed's loader does): no gathered copy, and
            # no ZeRO++ secondary partition, outlives the new values.
            zero.checkpoint_event_prologue()
        groups = _OpenSubGroups(self, adam_step) if self.stage == 3 else None
        try:
            self._set_each(named_values, params, groups, adam_step, seen, where)
        except BaseException:
            if groups is not None and groups.current is not None and zero._swappable_optimizer_subgroup(groups.current):
                zero._release_swap_buffers(groups.current)  # no half-set sub-group written back
            raise
        if groups is not None:
            groups.close()  # the last one: its model partitions updated, swapped out
        missing = sorted(set(params) - seen)
        if missing:
            raise CheckpointError(f"{where}: lacks {len(missing)} parameters of this model: {', '.join(missing[:8])}")
        # The model's own weights follow the fp32 ones only at the next step: copied now.
        if self.stage == 3:
            for sub_group in range(len(zero.fp16_groups)):
                if sub_group not in groups.done:
                    zero._reassign_or_swap_out_partitioned_parameters(sub_group)
            zero.checkpoint_event_epilogue()
        else:
            zero.update_lp_params()

    def _set_each(self, named_values, params: dict, groups, adam_step, seen: set, where: str) -> None:
        """_set_full_state's loop: each (name, values) set into its shards; `seen` gets the names."""
        from ..checkpoint import CheckpointError

        zero = self.optimizer
        with_moments = False
        for name, values in named_values:
            if name not in params:
                raise CheckpointError(f"{where}: holds parameter {name!r}, which this model does not have")
            param = params[name]
            if "exp_avg" in values and not with_moments:
                # Adam's state exists after a first step only: made on each flat partition (the
                # files' step count; ZeRO-3: as each sub-group is opened), and ZeRO-1/2's
                # parameters linked to it again.
                with_moments = True
                if self.stage < 3:
                    for flat in self._flat_partitions():
                        zero.optimizer.state[flat] = {"step": self._adam_step_value(adam_step or 0, flat),
                                                      "exp_avg": torch.zeros_like(flat),
                                                      "exp_avg_sq": torch.zeros_like(flat)}
                    zero._hp_optimizer_states_linked = False
                    zero._lazy_init_hp_params_optimizer_state()
            seen.add(name)
            shape = full_shape(param)  # the temperature: () in the files, (1,) here
            if not param.requires_grad:  # a locked tower's (LiT): no fp32 master, no moments
                self._set_model_param(param, values["fp32"].float().reshape(shape))
                continue
            if groups is not None:
                groups.open(self._sub_group(param), with_moments)
            setter = self._set_partition if groups is not None else self._set_full_hp
            setter(param, values["fp32"].float().reshape(shape))
            for key in ("exp_avg", "exp_avg_sq"):
                if key in values:
                    setter(param, values[key].float().reshape(shape), key)

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
        plain = build_model(self.cfg.model, device="cpu", init=False, mae_decoder=self.cfg.loss.mae_weight > 0)
        load_weights(source, [plain], broadcast_from_rank0=source.kind == "consolidated", whole_model=True)
        self._set_full_state(((name, {"fp32": value.detach()}) for name, value in plain.named_parameters()),
                             None, str(source.path))
        del plain

