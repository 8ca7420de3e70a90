"""The parallel layout: one object that says how the ranks are arranged, and the mesh it builds.

    world = pp x dp_replicate x dp_shard x tp        (outermost ... innermost)

`tp` is innermost so that a tensor-parallel group is a set of neighbouring ranks (one node's
fast links); `dp_shard` next (ZeRO-3 within a node or a few), then `dp_replicate` (HSDP across
nodes), `pp` outermost. The data-parallel ranks are the flattened (dp_replicate, dp_shard) axis
"dp": the loss gathers features over it and the data loader splits the batch over it. Ranks of
one tp group or one pipeline replica see the same samples.

`ParallelDims.from_config` refuses a layout that cannot work before any model is built, with a
message naming the numbers and what would be valid. The mesh keeps all four axes, size 1 or not,
so that `mesh["tp"]` etc. always exist; there are no module-level process-group globals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch.distributed as dist

MESH_DIM_NAMES = ("pp", "dp_replicate", "dp_shard", "tp")


class LayoutError(ValueError):
    """A parallel layout that cannot work; the message names the numbers and what is valid."""


def check_deepspeed_layout(cfg) -> None:
    """The layouts `parallel.engine: deepspeed` runs: data parallel only (every rank one replica's
    ZeRO shard), refused before anything is built with the reason and the fix."""
    if cfg.tp > 1 or cfg.pp > 1:
        raise LayoutError(
            f"parallel.engine=deepspeed is data parallel only, got parallel.tp={cfg.tp}, parallel.pp={cfg.pp}: "
            f"DeepSpeed's pipeline engine supports ZeRO stage <= 1 and neither composes with DTensor tensor "
            f"parallelism; use parallel.engine: fsdp for tensor or pipeline parallelism (FSDP2 is ZeRO-3 too)"
        )
    if cfg.dp_replicate > 1:
        raise LayoutError(
            f"parallel.dp_replicate={cfg.dp_replicate} is the native engine's HSDP; under parallel.engine=deepspeed "
            f"every rank is one data-parallel rank (parallel.dp_replicate=1, parallel.dp_shard=-1); for ZeRO++ "
            f"hierarchical partitioning set zero_optimization.zero_hpz_partition_size in parallel.deepspeed_config"
        )
    if getattr(cfg, "cpu_offload", False):
        raise LayoutError(
            "parallel.cpu_offload is FSDP2's offload (parallel.engine: fsdp); under parallel.engine=deepspeed use "
            "parallel.offload_optimizer: cpu and/or parallel.offload_params: cpu"
        )
    if cfg.offload_params != "none" and cfg.zero_stage != 3:
        raise LayoutError(
            f"parallel.offload_params={cfg.offload_params} needs parallel.zero_stage=3 (got {cfg.zero_stage}): only "
            f"ZeRO-3 partitions the parameters it would offload"
        )
    if cfg.offload_optimizer == "nvme" and cfg.zero_stage != 3:
        raise LayoutError(
            f"parallel.offload_optimizer=nvme needs parallel.zero_stage=3 (got {cfg.zero_stage}): DeepSpeed's "
            f"ZeRO-1/2 offload the optimizer to host memory only; use parallel.offload_optimizer=cpu"
        )
    if "nvme" in (cfg.offload_params, cfg.offload_optimizer) and not cfg.nvme_path:
        raise LayoutError(
            "parallel.offload_optimizer / offload_params = nvme needs parallel.nvme_path (a directory on a local "
            "NVMe drive of every node)"
        )


def check_native_layout(cfg) -> None:
    """The DeepSpeed-only keys are refused under the native engine, where they would change nothing."""
    for key, default in (("offload_optimizer", "none"), ("offload_params", "none"), ("nvme_path", ""),
                         ("deepspeed_config", "")):
        value = getattr(cfg, key, default)
        if value != default:
            raise LayoutError(
                f"parallel.{key}={value!r} applies to parallel.engine=deepspeed only (the engine here is "
                f"{getattr(cfg, 'engine', 'fsdp')}); set parallel.engine=deepspeed, or leave it out "
                f"(the native engine's offload is parallel.cpu_offload)"
            )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class ParallelDims:
    pp: int
    dp_replicate: int
    dp_shard: int
    tp: int
    world_size: int
    # Who shards the data-parallel ranks, for describe() (None: the native engine's FSDP2).
    engine_label: Optional[str] = field(default=None, repr=False, compare=False)
    _mesh: Optional[object] = field(default=None, init=False, repr=False, compare=False)
    _dp_flat: Optional[object] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        for name in ("pp", "dp_replicate", "dp_shard", "tp"):
            if getattr(self, name) < 1:
                raise LayoutError(f"parallel.{name}={getattr(self, name)}: must be >= 1")
        product = self.pp * self.dp_replicate * self.dp_shard * self.tp
        if product != self.world_size:
            raise LayoutError(
                f"pp={self.pp} x dp_replicate={self.dp_replicate} x dp_shard={self.dp_shard} x tp={self.tp} = {product} "
                f"ranks, but the world size is {self.world_size}; the product must equal the world size "
                f"(or set parallel.dp_shard=-1 to fill it)"
            )

    # ------------------------------------------------------------------ construction + checks

    @classmethod
    def from_config(
        cls,
        parallel_cfg,
        world_size: int,
        arch=None,
        global_batch_size: Optional[int] = None,
        grad_accum_steps: int = 1,
    ) -> "ParallelDims":
        """Resolve `dp_shard=-1` and check the layout against the world, the model and the batch.

        `arch` is a `flip_scale.models.FlipArch` (heads, MLP width and depth of both towers).
        """
        cfg = parallel_cfg
        engine = getattr(cfg, "engine", "fsdp")
        if engine == "deepspeed":
            check_deepspeed_layout(cfg)
        else:
            check_native_layout(cfg)
        for name in ("pp", "dp_replicate", "tp"):
            if getattr(cfg, name) < 1:
                raise LayoutError(f"parallel.{name}={getattr(cfg, name)}: must be >= 1")
        fixed = cfg.pp * cfg.dp_replicate * cfg.tp
        dp_shard = cfg.dp_shard
        if dp_shard == -1:
            if world_size % fixed:
                raise LayoutError(
                    f"parallel.pp={cfg.pp} x dp_replicate={cfg.dp_replicate} x tp={cfg.tp} = {fixed} does not divide "
                    f"the world size {world_size}, so parallel.dp_shard=-1 cannot fill it; choose a product among "
                    f"the divisors of {world_size}: {_divisors(world_size)}"
                )
            dp_shard = world_size // fixed
        elif dp_shard < 1:
            raise LayoutError(f"parallel.dp_shard={dp_shard}: must be -1 (fill the world) or >= 1")
        dims = cls(pp=cfg.pp, dp_replicate=cfg.dp_replicate, dp_shard=dp_shard, tp=cfg.tp, world_size=world_size)
        if engine == "deepspeed":
            dims.engine_label = f"DeepSpeed ZeRO-{getattr(cfg, 'zero_stage', 2)}"

        if arch is not None:
            for tower, tower_arch in (("vision", arch.vision), ("text", arch.text)):
                for key, value in (("heads", tower_arch.heads), ("mlp_dim", tower_arch.mlp_dim)):
                    if value % dims.tp:
                        raise LayoutError(
                            f"model.{tower}_{key}={value} not divisible by parallel.tp={dims.tp}; tensor parallelism "
                            f"splits the {tower} tower's {'attention heads' if key == 'heads' else 'MLP width'} "
                            f"evenly: valid tp values are {_divisors(value)} (and must divide every split dimension)"
                        )
            # The pipeline split (parallel/pipeline_split.py) gives every stage at least one block,
            # of either tower; interleaved 1F1B holds two stages per pipeline rank.
            stages = dims.pp * (2 if getattr(cfg, "pp_schedule", "1f1b") == "interleaved_1f1b" else 1)
            blocks = arch.vision.layers + arch.text.layers
            if dims.pp > 1 and blocks < stages:
                raise LayoutError(
                    f"model.vision_layers={arch.vision.layers} + model.text_layers={arch.text.layers} = {blocks} blocks "
                    f"cannot be split over {stages} pipeline stages (parallel.pp={dims.pp}, pp_schedule="
                    f"{getattr(cfg, 'pp_schedule', '1f1b')}): every stage holds at least one block; use at most "
                    f"{blocks} stages"
                )

        # 0: not set (config validation resolves it; a config built in code may not have met it).
        microbatches = getattr(cfg, "microbatches", 1) or (2 * dims.pp if dims.pp > 1 else 1)
        if dims.pp > 1:
            from .pipeline import check_microbatches  # the schedules' own rules (>= pp, interleaving rounds)

            try:
                check_microbatches(microbatches, dims.pp, getattr(cfg, "pp_schedule", "1f1b"))
            except ValueError as error:
                raise LayoutError(str(error)) from None
        elif microbatches > 1:
            # Without stages there is no pipeline to fill: the setting would be silently ignored.
            raise LayoutError(
                f"parallel.microbatches={microbatches} applies to pipeline parallel only (parallel.pp=1 here); "
                f"to split a rank's batch into micro-batches without pp use optim.grad_accum_steps={microbatches} "
                f"(exact contrast as well), or set parallel.microbatches=1"
            )
        if global_batch_size is not None:
            if global_batch_size % dims.dp_size:
                raise LayoutError(
                    f"train.global_batch_size={global_batch_size} is not divisible by the data-parallel size "
                    f"{dims.dp_size} (dp_replicate={dims.dp_replicate} x dp_shard={dims.dp_shard})"
                )
            chunks = dims.dp_size * microbatches * grad_accum_steps
            if global_batch_size % chunks:
                raise LayoutError(
                    f"train.global_batch_size={global_batch_size} is not divisible by data-parallel size "
                    f"{dims.dp_size} x parallel.microbatches={microbatches} x optim.grad_accum_steps="
                    f"{grad_accum_steps} = {chunks}; use a multiple of {chunks}"
                )
        return dims

    # ------------------------------------------------------------------ mesh

    def build_mesh(self, device_type: str = "cpu"):
        """The named mesh (pp, dp_replicate, dp_shard, tp) with the flattened "dp" axis.

        Needs an initialised default process group, except with one rank, where it returns None
        (nothing is parallel; every accessor then answers for a single process).
        """
        if not dist.is_initialized():
            if self.world_size == 1:
                self._mesh = None
                return None
            raise RuntimeError(
                f"ParallelDims.build_mesh: {self.world_size} ranks but torch.distributed is not initialised; "
                f"call torch.distributed.init_process_group first"
            )
        if dist.get_world_size() != self.world_size:
            raise LayoutError(
                f"ParallelDims was made for {self.world_size} ranks but the process group has {dist.get_world_size()}"
            )
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(
            device_type, (self.pp, self.dp_replicate, self.dp_shard, self.tp), mesh_dim_names=MESH_DIM_NAMES
        )
        return self.attach_mesh(mesh)

    def attach_mesh(self, mesh):
        """Use `mesh` (named MESH_DIM_NAMES, shaped like these dims) for the accessors; returns it."""
        shape = (self.pp, self.dp_replicate, self.dp_shard, self.tp)
        if tuple(mesh.mesh_dim_names or ()) != MESH_DIM_NAMES or tuple(mesh.shape) != shape:
            raise LayoutError(
                f"mesh {mesh.mesh_dim_names} of shape {tuple(mesh.shape)} does not match {MESH_DIM_NAMES} = {shape}"
            )
        # Kept here: slicing a flattened axis from the root mesh is deprecated.
        self._dp_flat = mesh["dp_replicate", "dp_shard"]._flatten("dp")
        self._mesh = mesh
        return mesh

    @property
    def mesh(self):
        return self._mesh

    def _sub(self, name: str):
        return None if self._mesh is None else self._mesh[name]

    # ------------------------------------------------------------------ sizes

    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def fsdp_enabled(self) -> bool:
        """Whether FSDP2 wraps the model: with more than one data-parallel rank (HSDP when
        dp_replicate > 1), and also with tp > 1 on a single data-parallel rank (a size-1 dp mesh).

        In the second case FSDP2 shards nothing, but every parameter becomes a DTensor: the
        foreach/fused AdamW refuses a mix of plain tensors and DTensors, sequence-parallel norm
        gradients are reduced to their placement, and the mixed-precision policy applies. The
        cost is a local copy per unit where there would be an all-gather.
        """
        return self.dp_size > 1 or self.tp > 1

    # ------------------------------------------------------------------ sub-meshes, groups, ranks

    @property
    def tp_mesh(self):
        return self._sub("tp")

    @property
    def pp_mesh(self):
        return self._sub("pp")

    @property
    def dp_mesh(self):
        """The mesh FSDP shards over: 1-D (dp_shard), or 2-D (dp_replicate, dp_shard) for HSDP."""
        if self._mesh is None:
            return None
        if self.dp_replicate > 1:
            return self._mesh["dp_replicate", "dp_shard"]
        return self._mesh["dp_shard"]

    @property
    def dp_flat_mesh(self):
        """All data-parallel ranks as one axis (the loss gather, data splitting)."""
        return self._dp_flat

    @property
    def dp_group(self) -> Optional[dist.ProcessGroup]:
        """The process group of the data-parallel ranks, or None with one of them."""
        if self.dp_size == 1 or self._dp_flat is None:
            return None
        return self._dp_flat.get_group()

    @property
    def tp_group(self) -> Optional[dist.ProcessGroup]:
        if self.tp == 1 or self._mesh is None:
            return None
        return self._mesh["tp"].get_group()

    @property
    def pp_group(self) -> Optional[dist.ProcessGroup]:
        if self.pp == 1 or self._mesh is None:
            return None
        return self._mesh["pp"].get_group()

    def _local_rank(self, name: str) -> int:
        if self._mesh is None:
            return 0
        return (self._dp_flat if name == "dp" else self._mesh[name]).get_local_rank()

    @property
    def dp_rank(self) -> int:
        """This rank's index among the data-parallel ranks (its slice of the global batch)."""
        return self._local_rank("dp")

    @property
    def tp_rank(self) -> int:
        return self._local_rank("tp")

    @property
    def pp_rank(self) -> int:
        return self._local_rank("pp")

    @property
    def rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    @property
    def is_logging_rank(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        text = (
            f"{self.world_size} ranks = pp {self.pp} x dp_replicate {self.dp_replicate} x dp_shard {self.dp_shard} "
            f"x tp {self.tp} (data-parallel size {self.dp_size}"
        )
        parts = []
        if self.dp_size > 1:
            if self.dp_replicate > 1 and self.dp_shard > 1:
                parts.append("HSDP (ZeRO-3 within dp_shard, replicated across dp_replicate)")
            elif self.dp_replicate > 1:
                parts.append("replicated data parallel (FSDP2 with dp_shard=1)")
            else:
                parts.append(self.engine_label or "FSDP2/ZeRO-3")
        if self.tp_enabled:
            parts.append("tensor parallel")
        if self.pp_enabled:
            parts.append("pipeline parallel")
        return text + (": " + ", ".join(parts) if parts else "") + ")"
