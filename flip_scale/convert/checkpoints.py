"""Training checkpoints (DCP) -> one consolidated file, loading a consolidated file, inspection.

A consolidated checkpoint is a directory with
  model.safetensors   every model tensor, full (unsharded), names as in `FLIPModel.state_dict()`;
                      `__metadata__` records the step, source and layout it came from
  flip_config.yaml    the resolved config, with every architecture field of `model` written out
                      explicitly, so the model rebuilds even if the registry of sizes changes
"""

from __future__ import annotations

import dataclasses
import json
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
import yaml

from ..checkpoint import STEP_DIR, SafeLoadPlanner, find_latest
from ..config import Config, ConfigError, config_from_dict
from ..models import arch_from_config, build_model
from .safetensors_io import TensorSpec, read_safetensors_header, write_safetensors
from ..checkpoint.safety import ConvertError, UnsupportedCheckpoint, read_dcp_metadata

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "flip_config.yaml"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_GROUP_BYTES = 64 * 1024 * 1024  # tensors read per DCP load call (a larger tensor is read alone)


PROGRESS_EVERY_S = 30.0


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB.

    Linux: VmHWM of /proc/self/status, the peak of this program alone; getrusage's ru_maxrss also
    counts the parent's memory at fork time (it survives fork + exec), so a converter started
    from a large process would report that process's size. Elsewhere: getrusage.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


# ----------------------------------------------------------------------------- what a path is


def deepspeed_evidence(path: Path) -> Optional[str]:
    """A file or folder that marks a DeepSpeed checkpoint under `path`, or None."""
    path = Path(path)
    if not path.is_dir():
        return None
    for pattern in ("*model_states.pt", "*optim_states.pt", "zero_to_fp32.py", "global_step*"):
        found = sorted(path.glob(pattern))
        if found:
            return found[0].name
    latest = path / "latest"
    if latest.is_file():
        text = latest.read_text(errors="replace").strip()
        if text.startswith("global_step"):
            return f"latest -> {text}"
    return None


def refuse_deepspeed(path: Path) -> None:
    raise UnsupportedCheckpoint(
        f"{path} is a DeepSpeed checkpoint (found {deepspeed_evidence(path)}); converting DeepSpeed checkpoints is "
        f"not supported yet. Supported inputs: a flip_scale DCP checkpoint (step_XXXXXXXX/ with .metadata), "
        f"a run directory with a 'latest' file, or a consolidated directory ({MODEL_FILE} + {CONFIG_FILE})"
    )


def consolidate_deepspeed(path: Path, out_dir: Path, dtype: str) -> dict:
    """The DeepSpeed engine's half of `consolidate` (parallel.engine: deepspeed).

    The hook for when that engine lands: merge its ZeRO partitions into full tensors (DeepSpeed's
    own `get_fp32_state_dict_from_zero_checkpoint`) and write them with `write_safetensors` in the
    same consolidated format (model.safetensors + flip_config.yaml). Until then: refused.
    """
    refuse_deepspeed(path)


def checkpoint_kind(path: Union[str, Path]) -> tuple[str, Path]:
    """('dcp' | 'consolidated' | 'deepspeed', the directory) for a step directory, a run directory
    (its latest complete checkpoint), a consolidated directory, or a DeepSpeed checkpoint; anything
    else is refused."""
    path = Path(path)
    if not path.exists():
        raise ConvertError(f"{path} does not exist")
    if path.is_file() and path.name == MODEL_FILE:
        path = path.parent
    if not path.is_dir():
        raise ConvertError(
            f"{path} is a file; expected a checkpoint directory (step_XXXXXXXX/, a run directory, "
            f"or a consolidated directory with {MODEL_FILE} + {CONFIG_FILE})"
        )
    if deepspeed_evidence(path) is not None:
        return "deepspeed", path
    if (path / ".metadata").is_file():
        missing = [name for name in ("trainer_state.json", "config.yaml") if not (path / name).is_file()]
        if missing:
            raise ConvertError(f"{path} is an incomplete training checkpoint: missing {', '.join(missing)}")
        if path.name.endswith(".tmp"):
            raise ConvertError(f"{path} is a checkpoint still being written (or left by a crash mid-save)")
        return "dcp", path
    if (path / MODEL_FILE).is_file():
        if not (path / CONFIG_FILE).is_file():
            raise ConvertError(f"{path} has {MODEL_FILE} but no {CONFIG_FILE}; a consolidated directory needs both")
        return "consolidated", path
    latest_file = path / "latest"
    if latest_file.is_file():  # a run directory whose latest step holds DeepSpeed's files
        named = path / latest_file.read_text(errors="replace").strip()
        if named.is_dir() and deepspeed_evidence(named) is not None:
            return "deepspeed", named
    latest = find_latest(path)
    if latest is not None:
        return checkpoint_kind(latest)
    steps = [p.name for p in path.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    hint = f" (it has {', '.join(sorted(steps))}, none complete)" if steps else ""
    raise ConvertError(
        f"{path} is not a checkpoint{hint}: expected a step_XXXXXXXX/ DCP directory (.metadata, trainer_state.json, "
        f"config.yaml), a run directory with complete checkpoints, or a consolidated directory ({MODEL_FILE} + {CONFIG_FILE})"
    )


# ----------------------------------------------------------------------------- configs


def resolved_config(cfg: Config) -> Config:
    """`cfg` with the model's architecture written out field by field (registry values filled in)."""
    arch = arch_from_config(cfg.model)
    model = dataclasses.replace(
        cfg.model,
        image_size=arch.image_size, patch_size=arch.patch_size, embed_dim=arch.embed_dim,
        vocab_size=arch.vocab_size, context_length=arch.context_length,
        vision_width=arch.vision.width, vision_layers=arch.vision.layers,
        vision_heads=arch.vision.heads, vision_mlp_dim=arch.vision.mlp_dim,
        text_width=arch.text.width, text_layers=arch.text.layers,
        text_heads=arch.text.heads, text_mlp_dim=arch.text.mlp_dim,
    )
    return dataclasses.replace(cfg, model=model)


def pin_architecture(cfg: Config, model_arch: Optional[dict]) -> Config:
    """`cfg` with the architecture a trainer recorded (`trainer_state.json` "model_arch") written
    into the model section: the checkpoint's own shapes win over today's registry entry."""
    if not model_arch:
        return cfg
    try:
        vision, text = model_arch["vision"], model_arch["text"]
        model = dataclasses.replace(
            cfg.model,
            image_size=model_arch["image_size"], patch_size=model_arch["patch_size"],
            embed_dim=model_arch["embed_dim"], vocab_size=model_arch["vocab_size"],
            context_length=model_arch["context_length"],
            vision_width=vision["width"], vision_layers=vision["layers"],
            vision_heads=vision["heads"], vision_mlp_dim=vision["mlp_dim"],
            text_width=text["width"], text_layers=text["layers"],
            text_heads=text["heads"], text_mlp_dim=text["mlp_dim"],
        )
    except (KeyError, TypeError) as error:
        raise ConvertError(f"trainer_state.json model_arch is malformed (missing {error})") from None
    return dataclasses.replace(cfg, model=model)


def _config_from_yaml_file(file: Path) -> Config:
    try:
        tree = yaml.safe_load(file.read_text()) or {}
        return config_from_dict(tree)
    except (ConfigError, ValueError, yaml.YAMLError) as error:
        raise ConvertError(f"{file}: not a valid flip_scale config: {error}") from None


def write_config(cfg: Config, out_dir: Path, header: str) -> Path:
    file = Path(out_dir) / CONFIG_FILE
    text = "".join(f"# {line}\n" for line in header.splitlines()) + resolved_config(cfg).to_yaml()
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(file)
    return file


def read_consolidated_config(path: Union[str, Path]) -> Config:
    """The `Config` of a consolidated directory (its flip_config.yaml)."""
    kind, directory = checkpoint_kind(path)
    if kind == "deepspeed":
        refuse_deepspeed(directory)
    if kind != "consolidated":
        raise ConvertError(f"{path} is a training checkpoint, not a consolidated directory; run `consolidate` first")
    return _config_from_yaml_file(directory / CONFIG_FILE)


def expected_state(cfg: Config) -> dict:
    """name -> shape of the model a config builds (on the meta device: nothing allocated)."""
    model = build_model(cfg.model, device="meta")
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def check_names(found: dict, expected: dict, what: str, config_hint: str) -> None:
    """Refuse a tensor set that does not match the model the config builds, naming the differences."""
    missing = [n for n in expected if n not in found]
    extra = [n for n in found if n not in expected]
    wrong = [f"{n} {tuple(found[n])} (model: {expected[n]})" for n in expected if n in found and tuple(found[n]) != expected[n]]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if extra:
        problems.append(f"unexpected {len(extra)}: {', '.join(extra[:8])}{' ...' if len(extra) > 8 else ''}")
    if wrong:
        problems.append(f"wrong shape: {', '.join(wrong[:8])}{' ...' if len(wrong) > 8 else ''}")
    if problems:
        raise ConvertError(f"{what} does not match the model of {config_hint}: " + "; ".join(problems))


# ----------------------------------------------------------------------------- DCP reading


def _dcp_reader(path: Path):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class _Reader(FileSystemReader):
        """Reads the metadata once, with the restricted unpickler (torch's own uses pickle.load)."""

        _cached = None

        def read_metadata(self, *args, **kwargs):
            if kwargs.get("rank") is not None:
                raise ConvertError(f"{path}: per-rank DCP metadata files are not supported")
            if self._cached is None:
                self._cached = read_dcp_metadata(path)
                if getattr(self._cached, "storage_meta", None) is None:
                    self._cached.storage_meta = StorageMeta()
            self._cached.storage_meta.load_id = self.load_id
            return self._cached

    return _Reader(str(path))


def _dcp_model_entries(path: Path, metadata) -> dict:
    """name (without the 'model.' prefix) -> TensorStorageMetadata of the model's tensors."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    entries = {}
    for key, item in metadata.state_dict_metadata.items():
        if not key.startswith("model."):
            continue
        if not isinstance(item, TensorStorageMetadata):
            raise ConvertError(
                f"{path}: '{key}' is stored as pickled bytes, not a tensor; model state must be tensors only"
            )
        entries[key[len("model."):]] = item
    if not entries:
        raise ConvertError(f"{path}: no model tensors (no 'model.*' keys) in the DCP metadata")
    return entries


class _GroupedDCPLoader:
    """Loads model tensors from a DCP checkpoint a small group at a time, in the order asked for."""

    def __init__(self, path: Path, entries: dict, order: list, group_bytes: int):
        self.reader = _dcp_reader(path)
        self.entries = entries
        self.order = order
        self.index = {name: i for i, name in enumerate(order)}
        self.group_bytes = group_bytes
        self.cache: dict = {}

    def _nbytes(self, name: str) -> int:
        item = self.entries[name]
        return TensorSpec(name, tuple(item.size), item.properties.dtype).nbytes

    def get(self, name: str) -> torch.Tensor:
        import torch.distributed.checkpoint as dcp

        if name not in self.cache:
            self.cache = {}
            group, total = [], 0
            for other in self.order[self.index[name]:]:
                size = self._nbytes(other)
                if group and total + size > self.group_bytes:
                    break
                group.append(other)
                total += size
            state = {}
            for other in group:
                item = self.entries[other]
                state[f"model.{other}"] = torch.empty(tuple(item.size), dtype=item.properties.dtype)
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(state, storage_reader=self.reader, planner=SafeLoadPlanner(), no_dist=True)
            self.cache = {key[len("model."):]: tensor for key, tensor in state.items()}
        return self.cache.pop(name)


# ----------------------------------------------------------------------------- consolidate


def consolidate(
    checkpoint: Union[str, Path],
    out_dir: Union[str, Path],
    dtype: str = "fp32",
    group_bytes: int = DEFAULT_GROUP_BYTES,
) -> dict:
    """A training checkpoint -> `out_dir/model.safetensors` + `out_dir/flip_config.yaml` (model only).

    Tensors are read from DCP a small group at a time (`group_bytes`) and appended to the output
    as they come, so memory stays near the largest tensor (about 3x: DCP's read buffer, the loaded
    tensor, the target). Returns a report: counts, sizes, and the process's peak RSS before the
    tensors were read (`rss_before_mib`) and at the end (`peak_rss_mib`).
    """
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype}: valid values are {', '.join(DTYPES)}")
    kind, path = checkpoint_kind(checkpoint)
    if kind == "deepspeed":
        return consolidate_deepspeed(path, Path(out_dir), dtype)
    if kind != "dcp":
        raise ConvertError(f"{checkpoint} is already a consolidated directory; `consolidate` reads training checkpoints")
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    cfg = pin_architecture(_config_from_yaml_file(path / "config.yaml"), trainer_state.get("model_arch"))
    entries = _dcp_model_entries(path, read_dcp_metadata(path))
    check_names({n: tuple(e.size) for n, e in entries.items()}, expected_state(cfg),
                f"the model state of {path}", f"its config.yaml (model.name={cfg.model.name})")
    rss_before = peak_rss_mib()  # imports and the meta-device model above are not the tensors' cost
    target = DTYPES[dtype]
    specs = []
    for name, item in entries.items():
        source = item.properties.dtype
        specs.append(TensorSpec(name, tuple(item.size), target if source.is_floating_point else source))
    loader = _GroupedDCPLoader(path, entries, [s.name for s in specs], group_bytes)
    total = sum(spec.nbytes for spec in specs)
    progress = {"done": 0, "started": time.perf_counter(), "last": time.perf_counter()}

    def produce(spec: TensorSpec) -> torch.Tensor:
        tensor = loader.get(spec.name).to(spec.dtype)
        progress["done"] += spec.nbytes
        now = time.perf_counter()
        if now - progress["last"] >= PROGRESS_EVERY_S:  # a G/14-sized model takes minutes on slow disks
            progress["last"] = now
            rate = progress["done"] / max(now - progress["started"], 1e-9)
            print(f"consolidate: {progress['done'] / 2**30:.1f} of {total / 2**30:.1f} GiB "
                  f"({100 * progress['done'] / total:.0f}%), {rate / 2**20:.0f} MiB/s, ETA "
                  f"{(total - progress['done']) / max(rate, 1e-9):.0f}s", file=sys.stderr, flush=True)
        return tensor

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    step = trainer_state.get("step")
    metadata = {
        "format": "pt", "producer": "flip_scale.convert", "kind": "flip_scale_consolidated",
        "step": step, "source": str(path.resolve()), "source_format": "dcp",
        "source_layout": trainer_state.get("layout", "unknown"),
        "source_world_size": trainer_state.get("world_size", "unknown"), "dtype": dtype,
    }
    size = write_safetensors(out_dir / MODEL_FILE, specs, produce, metadata)
    write_config(cfg, out_dir, f"flip_scale consolidated model, step {step}, from {path.resolve()}")
    return {
        "out": str(out_dir), "step": step, "tensors": len(specs), "params": sum(s.numel for s in specs),
        "file_bytes": size, "largest_tensor_bytes": max(s.nbytes for s in specs),
        "rss_before_mib": rss_before, "peak_rss_mib": peak_rss_mib(), "dtype": dtype,
    }


# ----------------------------------------------------------------------------- load


def load_consolidated(path: Union[str, Path], model, strict: bool = True, broadcast_from_rank0: bool = False) -> dict:
    """Load a consolidated checkpoint into a built model; returns the file's `__metadata__`.

    `path`: a consolidated directory or its model.safetensors. `model`: a module, or a list of model
    parts (the pipeline stages this rank holds), plain or sharded (FSDP2 / tensor parallel): the
    full tensors are handed to `set_model_state_dict(..., full_state_dict=True)`, which keeps the
    shard of each rank. Tensors are cast to the dtype of the parameter they load into.
    `strict`: every tensor of the model must be in the file, and (for a single module) every tensor
    of the file in the model. `broadcast_from_rank0`: only rank 0 reads the file and broadcasts
    (saves host memory when many ranks share a node; every rank must call this).
    """
    import torch.distributed as dist
    from safetensors import safe_open
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    path = Path(path)
    file = path if path.is_file() else path / MODEL_FILE
    if not file.is_file():
        raise ConvertError(f"{path}: no {MODEL_FILE} (expected a consolidated directory or the file itself)")
    metadata, _ = read_safetensors_header(file)
    broadcast = broadcast_from_rank0 and dist.is_available() and dist.is_initialized()
    reads = not broadcast or dist.get_rank() == 0
    parts = list(model) if isinstance(model, (list, tuple)) else [model]
    names = [get_model_state_dict(part) for part in parts]  # local shards: names and dtypes, nothing gathered
    # The file is checked against the model before any tensor moves, and with a broadcast every rank
    # learns rank 0's verdict: a rank that raised alone would leave the others in a collective.
    problem = None
    if reads:
        with safe_open(str(file), framework="pt") as reader:
            in_file = set(reader.keys())
        wanted_all = {name for wanted in names for name in wanted}
        missing = sorted(wanted_all - in_file)
        unexpected = sorted(in_file - wanted_all) if len(parts) == 1 else []
        if strict and missing:
            problem = f"{file} lacks {len(missing)} tensors of the model: {', '.join(missing[:8])}"
        elif strict and unexpected:
            problem = f"{file} has {len(unexpected)} tensors the model does not: {', '.join(unexpected[:8])}"
    if broadcast:
        verdict = [problem]
        dist.broadcast_object_list(verdict, src=0)
        problem = verdict[0]
    if problem is not None:
        raise ConvertError(problem)
    # Only the tensors this rank's parts hold are read (a pipeline stage reads its own stage's).
    import contextlib

    with (safe_open(str(file), framework="pt") if reads else contextlib.nullcontext()) as reader:
        in_file = set(reader.keys()) if reads else set()
        for part, wanted in zip(parts, names):
            state = ({name: reader.get_tensor(name).to(wanted[name].dtype) for name in wanted if name in in_file}
                     if reads else {})
            options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast, strict=strict)
            set_model_state_dict(part, state, options=options)
            del state
    return metadata


# ----------------------------------------------------------------------------- inspect


def _config_summary(cfg: Config) -> dict:
    arch = arch_from_config(cfg.model)
    return {
        "model": cfg.model.name, "mask_ratio": cfg.model.mask_ratio, "embed_dim": arch.embed_dim,
        "image_size": arch.image_size, "patch_size": arch.patch_size,
        "vision": dataclasses.asdict(arch.vision), "text": dataclasses.asdict(arch.text),
        "vocab_size": arch.vocab_size, "context_length": arch.context_length,
        "vision_pool": cfg.model.vision_pool, "text_pad_mask": cfg.model.text_pad_mask,
        "text_causal": cfg.model.text_causal, "norm_eps": cfg.model.norm_eps,
    }


def inspect_checkpoint(path: Union[str, Path]) -> dict:
    """Step, config summary, parameter count, layout and tensor list of a DCP or consolidated checkpoint."""
    kind, directory = checkpoint_kind(path)
    if kind == "deepspeed":
        refuse_deepspeed(directory)
    if kind == "dcp":
        trainer_state = json.loads((directory / "trainer_state.json").read_text())
        cfg = pin_architecture(_config_from_yaml_file(directory / "config.yaml"), trainer_state.get("model_arch"))
        metadata = read_dcp_metadata(directory)
        entries = _dcp_model_entries(directory, metadata)
        tensors = [(name, tuple(item.size), item.properties.dtype) for name, item in entries.items()]
        other = [k for k in metadata.state_dict_metadata if not k.startswith("model.")]
        info = {
            "kind": "dcp training checkpoint", "path": str(directory), "step": trainer_state.get("step"),
            "layout": trainer_state.get("layout", "unknown"), "world_size": trainer_state.get("world_size", "unknown"),
            "samples_seen": trainer_state.get("samples_seen"),
            "optimizer_entries": sum(1 for k in other if k.startswith("optim.")),
            "files": sorted(p.name for p in directory.iterdir() if p.is_file()),
        }
    else:
        cfg = _config_from_yaml_file(directory / CONFIG_FILE)
        header, specs = read_safetensors_header(directory / MODEL_FILE)
        tensors = [(s.name, s.shape, s.dtype) for s in specs]
        step = header.get("step")
        info = {
            "kind": "consolidated", "path": str(directory),
            "step": int(step) if step and step.isdigit() else step,
            "layout": f"consolidated (written by {header.get('source_format', 'unknown')} layout "
                      f"{header.get('source_layout', 'unknown')})",
            "world_size": header.get("source_world_size", "unknown"), "source": header.get("source"),
        }
    info["config"] = _config_summary(cfg)
    info["params"] = sum(torch.Size(shape).numel() for _, shape, _ in tensors)
    info["tensors"] = [{"name": n, "shape": list(s), "dtype": str(d).replace("torch.", "")} for n, s, d in tensors]
    return info


def format_inspect(info: dict) -> str:
    c = info["config"]
    lines = [
        f"checkpoint   {info['path']} ({info['kind']})",
        f"step         {info['step']}",
        f"layout       {info['layout']}, world_size {info['world_size']}",
        f"model        {c['model']}: embed {c['embed_dim']}, image {c['image_size']} px / patch {c['patch_size']}, "
        f"vision {c['vision']['layers']}x{c['vision']['width']}x{c['vision']['heads']} (mlp {c['vision']['mlp_dim']}), "
        f"text {c['text']['layers']}x{c['text']['width']}x{c['text']['heads']} (mlp {c['text']['mlp_dim']}), "
        f"vocab {c['vocab_size']}, context {c['context_length']}",
        f"mask_ratio   {c['mask_ratio']}  (vision_pool {c['vision_pool']}, text_pad_mask {c['text_pad_mask']}, "
        f"text_causal {c['text_causal']})",
        f"params       {info['params']:,} ({info['params'] / 1e6:.2f}M) in {len(info['tensors'])} tensors",
    ]
    if "optimizer_entries" in info:
        lines.append(f"optimizer    {info['optimizer_entries']} entries")
    lines.append("tensors")
    width = max(len(t["name"]) for t in info["tensors"])
    for t in info["tensors"]:
        lines.append(f"  {t['name']:<{width}}  {str(tuple(t['shape'])):<16} {t['dtype']}")
    return "\n".join(lines)
