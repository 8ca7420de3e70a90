"""Reading a DeepSpeed step directory's full fp32 weights and Adam moments back, one parameter at a
time, with code of ours (the files, their completeness and safe loading: deepspeed_files.py).

    step_00000100/                 trainer_state.json ("engine": "deepspeed"), config.yaml, rng, data
      deepspeed/                   engine.save_checkpoint(step_tmp_dir, tag=DS_TAG, save_latest=False)
        mp_rank_00_model_states.pt                        ZeRO-1/2: rank 0's (module, param_shapes, ...)
        zero_pp_rank_{r}_mp_rank_00_model_states.pt       ZeRO-3: one per rank
        [bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt   one per rank (bf16_ when bf16 is on)

    files = DeepSpeedFiles(step_dir)          # reads the model states only (no deepspeed import)
    files.zero_stage, files.dp_world_size, files.shapes, files.buffers(), files.adam_step
    for name, states in files.parameters(("fp32", "exp_avg", "exp_avg_sq")): ...   # one at a time

Where the values are (what DeepSpeed's own zero_to_fp32.py relies on; this is our reader):
  ZeRO-1/2  per parameter group one flat fp32 vector, the group's parameters in `param_shapes`
            order, each followed by its `param_alignment_paddings` entry, split evenly over the
            ranks. Rank r's file holds its slice (`single_partition_of_fp32_groups`; DeepSpeed's
            ZeRO optimizer strips the alignment padding at the end, its BF16_Optimizer keeps it):
            the slices in rank order are the vector again.
  ZeRO-3    every parameter split alone: rank r holds elements [r*p, (r+1)*p) of it, p =
            ceil(numel / ranks), zero-padded; within each rank the pieces follow `param_shapes`
            order through its flat groups (`fp32_flat_groups`, one per sub-group).
The Adam moments of a flat group (the base optimizer's state of that group's one flat parameter)
have its layout, padding included; `step` is the same for all.
Frozen parameters (not optimized) are in the model states: ZeRO-2/3 `frozen_param_fragments`
(ZeRO-3: every rank its piece, as above), ZeRO-1 only in `module` (the model's dtype). Buffers are
in `module` (full under every stage).

Loading is safe and lean. Every file goes through `torch.load(weights_only=True)` (`safe_torch_load`):
the optimizer files need four DeepSpeed classes, admitted for that call only (so reading those
needs deepspeed installed; the model states, completeness and `inspect` do not). The rank files are
memory-mapped: a parameter's pieces are read when it is assembled, and the mappings are dropped
every `release_bytes` so that the pages read so far leave the process (its peak memory stays near
`release_bytes`, not the model plus optimizer).
"""

from __future__ import annotations

import bisect
import math
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch

from .deepspeed_files import (
    DEFAULT_RELEASE_BYTES, DS_TAG, MODEL_STATES, STATES, checked_optimizer_state, find_optim_files, safe_torch_load,
    tag_dir, zero3_model_states,
)
from .errors import CheckpointError

# ----------------------------------------------------------------------------- reading


class _Concat:
    """Flat tensors read as one vector: `read(start, length)` -> the pieces covering that range."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self.tensors = list(tensors)
        self.starts = [0]
        for tensor in self.tensors:
            self.starts.append(self.starts[-1] + tensor.numel())

    @property
    def numel(self) -> int:
        return self.starts[-1]

    def read(self, start: int, length: int) -> list:
        if start < 0 or start + length > self.numel:
            raise IndexError(f"elements [{start}, {start + length}) of a vector of {self.numel}")
        pieces = []
        index = bisect.bisect_right(self.starts, start) - 1
        while length > 0:
            tensor, begin = self.tensors[index], start - self.starts[index]
            take = min(length, tensor.numel() - begin)
            if take > 0:
                pieces.append(tensor.narrow(0, begin, take))
            start, length, index = start + take, length - take, index + 1
        return pieces


def _as_shape(shape) -> torch.Size:
    return torch.Size(int(dim) for dim in shape)


# Parameters the DeepSpeed engine holds in another shape than the model's: its temperature is (1,)
# (DeepSpeed broadcasts through uint8 views, which a 0-dim tensor cannot take); read as ().
CANONICAL_SHAPES = {"logit_scale": (), "logit_bias": ()}


class DeepSpeedFiles:
    """The DeepSpeed files of a flip_scale step directory (or the `deepspeed/` folder itself).

    Constructed from the model states alone (names, shapes, stage, ranks); the optimizer files are
    opened, memory-mapped, when values are asked for. Anything inconsistent (a rank's file missing,
    partition counts or sizes that do not add up to the parameters) is a CheckpointError."""

    def __init__(self, path: Union[str, Path], release_bytes: int = DEFAULT_RELEASE_BYTES):
        self.directory = tag_dir(path)
        self.release_bytes = int(release_bytes)
        if not self.directory.is_dir():
            raise CheckpointError(f"{path}: no DeepSpeed checkpoint folder ({DS_TAG}/)")
        model_file = self.directory / MODEL_STATES
        if not model_file.is_file():
            model_file = self.directory / zero3_model_states(0)
        if not model_file.is_file():
            raise CheckpointError(f"{self.directory}: no DeepSpeed model states ({MODEL_STATES} for ZeRO-1/2, "
                                  f"{zero3_model_states(0)} for ZeRO-3)")
        self._model_file = model_file
        model = self._load(model_file)
        if not isinstance(model, dict):
            raise CheckpointError(f"{model_file} is not a DeepSpeed model states file (it holds a {type(model).__name__})")
        missing = [key for key in ("module", "param_shapes", "buffer_names", "dp_world_size") if key not in model]
        if missing:
            raise CheckpointError(f"{model_file} is not a DeepSpeed model states file (no {', '.join(missing)})")
        if model["param_shapes"] is None:
            raise CheckpointError(f"{model_file}: written without a ZeRO optimizer (ZeRO stage 0 or no optimizer); "
                                  f"flip_scale reads ZeRO-1, 2 and 3 checkpoints")
        self.ds_version = model.get("ds_version")
        self.ds_config = model.get("ds_config") or {}
        self.dp_world_size = int(model["dp_world_size"])
        offload = ((self.ds_config.get("zero_optimization") or {}).get("offload_optimizer") or {})
        # ZeRO-Infinity keeps the optimizer state in swap files; flip_scale's save writes the swapped
        # partitions into the optimizer files as any others (engine/deepspeed_state.py), read here
        # the same way. One written by DeepSpeed alone holds empty partitions there (_layout says so).
        self.nvme_optimizer = (isinstance(offload, dict) and offload.get("device") == "nvme") \
            or (self.directory / "offloaded_tensors").is_dir()
        # ZeRO-3 writes model states per rank, ZeRO-1/2 one file; the config says which of 1 and 2.
        per_rank = model_file.name != MODEL_STATES
        self.zero_stage = int((self.ds_config.get("zero_optimization") or {}).get("stage", 3 if per_rank else 0))
        if self.zero_stage not in ((3,) if per_rank else (1, 2)):
            raise CheckpointError(f"{model_file}: ZeRO stage {self.zero_stage} in its config, with "
                                  f"{'per-rank' if per_rank else 'one'} model states; flip_scale reads ZeRO-1 and 2 "
                                  f"({MODEL_STATES}) and ZeRO-3 ({zero3_model_states(0)}, ...) checkpoints")
        self._optim_files = find_optim_files(self.directory, self.dp_world_size, self._model_file.name)
        self.bf16 = self._optim_files[0].name.startswith("bf16_")

        self._group_shapes = [OrderedDict((name, _as_shape(shape)) for name, shape in group.items())
                              for group in model["param_shapes"]]
        self.trainable = OrderedDict((name, shape) for group in self._group_shapes for name, shape in group.items())
        self.shared = dict(model.get("shared_params") or {})  # alias -> the parameter it is
        self.buffer_names = list(model["buffer_names"] or [])
        module = model["module"]
        frozen_shapes = model.get("frozen_param_shapes") or {}
        self._frozen_fragments = model.get("frozen_param_fragments") or {}
        self.frozen = OrderedDict((name, _as_shape(shape)) for name, shape in frozen_shapes.items())
        # ZeRO-1 saves no frozen shapes: a parameter it did not optimize is only in `module`.
        known = set(self.trainable) | set(self.frozen) | set(self.shared) | set(self.buffer_names)
        self._frozen_in_module = [name for name in module if name not in known]
        if self._frozen_in_module and self.zero_stage == 3:
            raise CheckpointError(f"{model_file}: {', '.join(self._frozen_in_module[:4])} are in the module but "
                                  f"neither optimized nor saved as frozen fragments: their values are not in the files")
        for name in self._frozen_in_module:
            self.frozen[name] = module[name].shape
        self._buffers = {name: module[name] for name in self.buffer_names if name in module}
        self.shapes = OrderedDict()  # every parameter, in the order `parameters()` yields them
        for name, shape in self.trainable.items():
            self.shapes[name] = shape
            for alias, source in self.shared.items():
                if source == name:
                    self.shapes[alias] = shape
        self.shapes.update(self.frozen)
        for name, shape in self.shapes.items():  # the temperature as every other checkpoint holds it
            if name in CANONICAL_SHAPES and shape.numel() == 1:
                self.shapes[name] = torch.Size(CANONICAL_SHAPES[name])
        self._module = module
        self._views: dict = {}  # rank -> its optimizer file's flat vectors (memory-mapped)
        self._vectors: dict = {}  # ZeRO-1/2 (state, group) -> every rank's slices as one vector
        self._rank_fragments: dict = {}  # ZeRO-3 rank -> its frozen_param_fragments
        self._touched = 0
        self._plan = None

    # ------------------------------------------------------------------ files

    @staticmethod
    def _load(file: Path):
        return safe_torch_load(file, mmap=True)

    @property
    def files(self) -> list[str]:
        """The checkpoint's file names in the DeepSpeed folder."""
        return sorted(file.name for file in self.directory.iterdir() if file.is_file())

    def _optimizer_state(self, rank: int) -> dict:
        file = self._optim_files[rank]
        return checked_optimizer_state(file, self._load(file), self.zero_stage, self.dp_world_size)

    def _view(self, rank: int) -> dict:
        """state name -> this rank's flat vectors of it, memory-mapped: ZeRO-1/2 a list (one per
        parameter group), ZeRO-3 one `_Concat` of its flat groups; None where the state is absent."""
        if rank in self._views:
            return self._views[rank]
        osd = self._optimizer_state(rank)
        file = self._optim_files[rank]
        key = "fp32_flat_groups" if self.zero_stage == 3 else "single_partition_of_fp32_groups"
        flats = osd.get(key)
        if not isinstance(flats, (list, tuple)):
            raise CheckpointError(f"{file} has no {key} (the fp32 master weights)")
        group_states = self._group_states(osd, file, len(flats))
        states = {"fp32": list(flats)}
        for name in STATES[1:]:
            moments = []
            for index, (flat, state) in enumerate(zip(flats, group_states)):
                moment = state.get(name)
                if moment is None:
                    moments = None  # no optimizer step yet: asked for, it is an error (`_read`)
                    break
                if moment.numel() < flat.numel():
                    raise CheckpointError(f"{file}: {name} of flat group {index} has {moment.numel()} elements, its "
                                          f"fp32 weights {flat.numel()}")
                moments.append(moment.reshape(-1).narrow(0, 0, flat.numel()))  # its padding cut as the weights'
            states[name] = moments
        view = {name: (_Concat(tensors) if self.zero_stage == 3 and tensors is not None else tensors)
                for name, tensors in states.items()}
        view["step"] = next((state["step"] for state in group_states if "step" in state), None)
        view["paddings"] = osd.get("param_alignment_paddings")  # ZeRO-1/2, after each parameter of each group
        self._views[rank] = view
        return view

    def _group_states(self, osd: dict, file: Path, groups: int) -> list[dict]:
        """The base optimizer's state of each flat group (its one flat parameter), in group order."""
        base = osd.get("optimizer_state_dict" if self.zero_stage == 3 else "base_optimizer_state")
        if isinstance(base, (list, tuple)):  # ZeRO-1/2 with elastic_checkpoint: one dict per group
            states = list(base)
        elif isinstance(base, dict) and "state" in base:  # the base optimizer's state_dict()
            ids = [pid for group in base.get("param_groups", []) for pid in group["params"]]
            states = [base["state"].get(pid, {}) for pid in ids]
        else:
            raise CheckpointError(f"{file} has no base optimizer state")
        if len(states) != groups:
            raise CheckpointError(f"{file}: {len(states)} optimizer parameter states for {groups} flat groups")
        return states

    def _group_vector(self, state: str, group: int) -> Optional[_Concat]:
        """ZeRO-1/2: parameter group `group`'s whole flat vector of `state`, every rank's slice in order."""
        key = (state, group)
        if key not in self._vectors:
            views = [self._view(rank) for rank in range(self.dp_world_size)]
            if any(view[state] is None for view in views):
                return None
            self._vectors[key] = _Concat([view[state][group] for view in views])
        return self._vectors[key]

    def _release(self) -> None:
        """Drop the memory maps (reopened when next needed): the pages read so far leave the process."""
        self._views.clear()
        self._vectors.clear()
        self._touched = 0

    # ------------------------------------------------------------------ layout

    def _layout(self) -> dict:
        """name -> where its values are: ZeRO-1/2 (group, offset, numel) in the group's flat vector,
        ZeRO-3 (offset, partition numel, numel) in every rank's flat vector. Checked against the files."""
        if self._plan is not None:
            return self._plan
        plan = {}
        views = [self._view(rank) for rank in range(self.dp_world_size)]
        if self.zero_stage == 3:
            offset = 0
            for name, shape in self.trainable.items():
                numel = shape.numel()
                part = math.ceil(numel / self.dp_world_size)
                plan[name] = (offset, part, numel)
                offset += part
            for rank, view in enumerate(views):
                if view["fp32"].numel != offset:
                    nvme = (" (the optimizer was offloaded to NVMe and its swapped partitions are not in the files: "
                            "written by DeepSpeed's own save, whose swap-folder copy flip_scale does not read)"
                            if self.nvme_optimizer and view["fp32"].numel < offset else "")
                    raise CheckpointError(
                        f"{self._optim_files[rank]}: {view['fp32'].numel} fp32 elements, the parameter shapes need "
                        f"{offset} per rank (sum of ceil(numel / {self.dp_world_size})){nvme}")
        else:
            paddings = views[0]["paddings"]
            for rank, view in enumerate(views):
                if len(view["fp32"]) != len(self._group_shapes):
                    raise CheckpointError(f"{self._optim_files[rank]}: {len(view['fp32'])} flat groups, the model "
                                          f"states have {len(self._group_shapes)} parameter groups")
            for group, shapes in enumerate(self._group_shapes):
                group_padding = paddings[group] if paddings else [0] * len(shapes)
                if len(group_padding) != len(shapes):
                    raise CheckpointError(f"{self._optim_files[0]}: {len(group_padding)} alignment paddings for the "
                                          f"{len(shapes)} parameters of group {group}")
                offset = 0
                for (name, shape), padding in zip(shapes.items(), group_padding):
                    plan[name] = (group, offset, shape.numel())
                    offset += shape.numel() + int(padding)
                have = self._group_vector("fp32", group).numel
                if offset > have:
                    raise CheckpointError(f"{self.directory}: parameter group {group} needs {offset} fp32 elements, "
                                          f"the {self.dp_world_size} rank files hold {have}")
        self._plan = plan
        return plan

    def _read(self, name: str, state: str) -> torch.Tensor:
        """The full tensor of trainable parameter `name`'s `state`, assembled from every rank (a copy)."""
        location = self._layout()[name]
        absent = CheckpointError(f"{self.directory}: no {state} in the optimizer files (saved before the first "
                                 f"optimizer step?)")
        if self.zero_stage == 3:
            offset, part, numel = location
            views = [self._view(rank) for rank in range(self.dp_world_size)]
            if any(view[state] is None for view in views):
                raise absent
            pieces = [piece for view in views for piece in view[state].read(offset, part)]
        else:
            group, offset, numel = location
            vector = self._group_vector(state, group)
            if vector is None:
                raise absent
            pieces = vector.read(offset, numel)
        full = torch.cat(pieces).narrow(0, 0, numel).view(self.trainable[name])
        self._touched += full.numel() * full.element_size()
        return full

    def _frozen(self, name: str) -> torch.Tensor:
        shape = self.frozen[name]
        if name in self._frozen_in_module:
            return self._module[name].clone()
        if self.zero_stage == 3:  # every rank's model states hold its piece
            pieces = []
            for rank in range(self.dp_world_size):
                if rank not in self._rank_fragments:
                    model = self._load(self.directory / zero3_model_states(rank)) if rank else None
                    self._rank_fragments[rank] = (self._frozen_fragments if rank == 0 else
                                                  model.get("frozen_param_fragments") or {})
                fragments = self._rank_fragments[rank]
                if name not in fragments:
                    raise CheckpointError(f"{self.directory / zero3_model_states(rank)} has no frozen fragment of {name}")
                pieces.append(fragments[name].reshape(-1))
            full = torch.cat(pieces)
        elif name in self._frozen_fragments:
            full = self._frozen_fragments[name].reshape(-1).clone()
        else:
            raise CheckpointError(f"{self._model_file} has no frozen_param_fragments entry for {name}")
        if full.numel() < shape.numel():
            raise CheckpointError(f"{self.directory}: the frozen fragments of {name} hold {full.numel()} elements, "
                                  f"its shape {tuple(shape)} needs {shape.numel()}")
        return full.narrow(0, 0, shape.numel()).view(shape)

    # ------------------------------------------------------------------ what callers read

    def validate(self) -> "DeepSpeedFiles":
        """Open every rank's optimizer file now and check its partitions against the parameter
        shapes (a CheckpointError names what does not add up); returns self."""
        self._layout()
        return self

    @property
    def adam_step(self) -> Optional[int]:
        """The optimizer's step count (Adam's bias correction), from rank 0's file; None before any step."""
        step = self._view(0)["step"]
        return int(step.item() if torch.is_tensor(step) else step) if step is not None else None

    @property
    def optimizer_param_groups(self) -> list[dict]:
        """The base optimizer's hyper-parameters per group (lr, betas, eps, weight_decay), from rank 0
        ([] for a ZeRO-1/2 elastic checkpoint, which stores the groups' states alone)."""
        osd = self._optimizer_state(0)
        base = osd.get("optimizer_state_dict" if self.zero_stage == 3 else "base_optimizer_state")
        groups = base.get("param_groups", []) if isinstance(base, dict) else []
        return [{key: value for key, value in group.items() if key != "params"} for group in groups]

    def buffers(self) -> dict:
        """name -> the full buffer (floating buffers as float32, as DeepSpeed's bf16 module holds them lower)."""
        return {name: (tensor.float() if tensor.is_floating_point() else tensor.clone())
                for name, tensor in self._buffers.items()}

    @property
    def buffer_shapes(self) -> dict:
        return {name: tensor.shape for name, tensor in self._buffers.items()}

    def parameters(self, states: Sequence[str] = ("fp32",), names: Optional[set] = None) -> Iterator[tuple[str, dict]]:
        """(name, {state: full tensor}) for every parameter (or those in `names`), one at a time, in
        `shapes` order.

        `states`: any of "fp32" (the fp32 master weights), "exp_avg", "exp_avg_sq" (Adam's moments).
        A shared parameter's alias follows it with the same tensors. A frozen parameter has no
        optimizer state: its dict holds "fp32" alone (its saved value widened to float32; under
        ZeRO-1 and bf16 that value is bf16)."""
        unknown = [state for state in states if state not in STATES]
        if unknown:
            raise ValueError(f"states {unknown}: valid are {', '.join(STATES)}")
        for name in self.trainable:
            aliases = [alias for alias, source in self.shared.items() if source == name]
            if names is not None and name not in names and not names.intersection(aliases):
                continue
            values = {state: self._read(name, state).reshape(self.shapes[name]) for state in states}
            for wanted in [name, *aliases]:
                if names is None or wanted in names:
                    yield wanted, values
            if self._touched >= self.release_bytes:
                self._release()
        for name in self.frozen:
            if names is not None and name not in names:
                continue
            if "fp32" in states:
                tensor = self._frozen(name)
                yield name, {"fp32": tensor.float() if tensor.is_floating_point() else tensor}
            else:
                yield name, {}

    def weight_entries(self) -> dict:
        """name -> (shape, dtype) of what `weights()` yields, in its order: parameters, then buffers."""
        entries = OrderedDict((name, (tuple(shape), torch.float32)) for name, shape in self.shapes.items())
        for name, tensor in self._buffers.items():
            entries[name] = (tuple(tensor.shape), torch.float32 if tensor.is_floating_point() else tensor.dtype)
        return entries

    def weights(self, names: Optional[set] = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full fp32 tensor) of every parameter, one at a time, then every buffer (or of those
        in `names`)."""
        for name, values in self.parameters(("fp32",), names):
            yield name, values["fp32"]
        yield from ((name, tensor) for name, tensor in self.buffers().items() if names is None or name in names)

    @contextmanager
    def opened_weights(self, names: Optional[set] = None):
        """(names, get(name)) of the full model state (or of `names`), for
        `consolidated.load_full_state`: assembled here (in fp32, as a consolidated file's loader
        holds the tensors it loads)."""
        state = dict(self.weights(names))
        try:
            yield set(state), state.__getitem__
        finally:
            state.clear()
            self._release()
