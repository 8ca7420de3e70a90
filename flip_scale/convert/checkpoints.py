"""Training checkpoints (DCP or DeepSpeed) -> one consolidated file, and inspection of any of them.

The consolidated format (model.safetensors + flip_config.yaml), its reading and loading, and what
a path names (`checkpoint_kind`) are the checkpoint package's (flip_scale/checkpoint/consolidated.py,
sources.py): loading a consolidated directory is a checkpoint source like any other. Writing one,
from a training checkpoint, is here.
"""

from __future__ import annotations

import dataclasses
import json
import re
import resource
import sys
import time
import warnings
from pathlib import Path
from typing import Optional, Union

import torch

from ..checkpoint import SafeLoadPlanner
from ..checkpoint.consolidated import (
    CONFIG_FILE, MODEL_FILE, TensorSpec, config_from_yaml_file, read_safetensors_header, resolved_config,
)
from ..checkpoint.safety import ConvertError, read_dcp_metadata
from ..checkpoint.deepspeed_files import DS_TAG
from ..checkpoint.deepspeed_reader import DeepSpeedFiles
from ..checkpoint.sources import checkpoint_kind, read_consolidated_config
from ..config import Config
from ..models import arch_from_config, build_model
from .safetensors_io import write_safetensors

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


# ----------------------------------------------------------------------------- configs


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


def write_config(cfg: Config, out_dir: Path, header: str) -> Path:
    file = Path(out_dir) / CONFIG_FILE
    text = "".join(f"# {line}\n" for line in header.splitlines()) + resolved_config(cfg).to_yaml()
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(file)
    return file


def expected_state(cfg: Config) -> dict:
    """name -> shape of the model a config builds (on the meta device: nothing allocated); MAE's
    decoder included where the run trained one (loss.mae_weight > 0: consolidate keeps it)."""
    model = build_model(cfg.model, device="meta", mae_decoder=cfg.loss.mae_weight > 0)
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


def read_consolidated_tensors(consolidated: Union[str, Path]) -> tuple[Config, Path, dict, dict[str, TensorSpec]]:
    """A consolidated directory (or its model.safetensors) -> (its config, the weights file, the
    file's header, its tensors by name), the names checked against the model the config builds.
    Nothing is read but the config and the header: exporters stream the tensors themselves."""
    cfg = read_consolidated_config(consolidated)
    file = Path(consolidated)
    file = file if file.is_file() else file / MODEL_FILE
    header, specs = read_safetensors_header(file)
    found = {spec.name: spec for spec in specs}
    check_names({name: spec.shape for name, spec in found.items()}, expected_state(cfg), str(file), CONFIG_FILE)
    return cfg, file, header, found


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


class _InOrder:
    """The tensors of an iterator of (name, tensor), asked for in its order (the DeepSpeed reader's)."""

    def __init__(self, items):
        self.items = iter(items)

    def get(self, name: str) -> torch.Tensor:
        got, tensor = next(self.items)
        if got != name:
            raise ConvertError(f"asked for {name}, the reader gave {got} (the tensors must be asked for in order)")
        return tensor


def _progress_line(done: int, total: int, started: float, now: float) -> str:
    rate = done / max(now - started, 1e-9)
    return (f"consolidate: {done / 2**30:.1f} of {total / 2**30:.1f} GiB ({100 * done / total:.0f}%), "
            f"{rate / 2**20:.0f} MiB/s, ETA {(total - done) / max(rate, 1e-9):.0f}s")


def consolidate(
    checkpoint: Union[str, Path],
    out_dir: Union[str, Path],
    dtype: str = "fp32",
    group_bytes: int = DEFAULT_GROUP_BYTES,
) -> dict:
    """A training checkpoint -> `out_dir/model.safetensors` + `out_dir/flip_config.yaml` (model only).

    Tensors are appended to the output as they come, so memory stays near the largest tensor.
    DCP: read a small group at a time (`group_bytes`; about 3x the largest tensor: DCP's read
    buffer, the loaded tensor, the target). DeepSpeed: each parameter's fp32 master weights are
    assembled from the ZeRO partitions of the memory-mapped rank files, one at a time, the maps
    dropped every `group_bytes` read (DeepSpeedFiles). Returns a report: counts, sizes, and the
    process's peak RSS before the tensors were read (`rss_before_mib`) and at the end (`peak_rss_mib`).
    """
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype}: valid values are {', '.join(DTYPES)}")
    kind, path = checkpoint_kind(checkpoint)
    if kind == "consolidated":
        raise ConvertError(f"{checkpoint} is already a consolidated directory; `consolidate` reads training checkpoints")
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    cfg = pin_architecture(config_from_yaml_file(path / "config.yaml"), trainer_state.get("model_arch"))
    if kind == "deepspeed":
        # Every rank file opened (mapped) and the partitions checked against the shapes before any
        # output is written; deepspeed's import is then behind us too (not the tensors' cost).
        files = DeepSpeedFiles(path, release_bytes=group_bytes).validate()
        entries = files.weight_entries()
        loader = _InOrder(files.weights())
    else:
        dcp_entries = _dcp_model_entries(path, read_dcp_metadata(path))
        entries = {name: (tuple(item.size), item.properties.dtype) for name, item in dcp_entries.items()}
        loader = _GroupedDCPLoader(path, dcp_entries, list(entries), group_bytes)
    check_names({name: shape for name, (shape, _) in entries.items()}, expected_state(cfg),
                f"the model state of {path}", f"its config.yaml (model.name={cfg.model.name})")
    rss_before = peak_rss_mib()  # imports and the meta-device model above are not the tensors' cost
    target = DTYPES[dtype]
    specs = [TensorSpec(name, shape, target if source.is_floating_point else source)
             for name, (shape, source) in entries.items()]
    total = sum(spec.nbytes for spec in specs)
    progress = {"done": 0, "started": time.perf_counter(), "last": time.perf_counter()}

    def produce(spec: TensorSpec) -> torch.Tensor:
        tensor = loader.get(spec.name).to(spec.dtype)
        progress["done"] += spec.nbytes
        now = time.perf_counter()
        if now - progress["last"] >= PROGRESS_EVERY_S:  # a G/14-sized model takes minutes on slow disks
            progress["last"] = now
            print(_progress_line(progress["done"], total, progress["started"], now), file=sys.stderr, flush=True)
        return tensor

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    step = trainer_state.get("step")
    metadata = {
        "format": "pt", "producer": "flip_scale.convert", "kind": "flip_scale_consolidated",
        "step": step, "source": str(path.resolve()), "source_format": kind,
        "source_layout": trainer_state.get("layout", "unknown"),
        "source_world_size": trainer_state.get("world_size", "unknown"), "dtype": dtype,
    }
    if kind == "deepspeed":
        metadata["source_zero_stage"] = files.zero_stage
    size = write_safetensors(out_dir / MODEL_FILE, specs, produce, metadata)
    write_config(cfg, out_dir, f"flip_scale consolidated model, step {step}, from {path.resolve()}")
    return {
        "out": str(out_dir), "step": step, "tensors": len(specs), "params": sum(s.numel for s in specs),
        "file_bytes": size, "largest_tensor_bytes": max(s.nbytes for s in specs), "source_format": kind,
        "rss_before_mib": rss_before, "peak_rss_mib": peak_rss_mib(), "dtype": dtype,
    }


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
        "vision_pos_embed": cfg.model.vision_pos_embed, "vision_ln_pre": cfg.model.vision_ln_pre,
        "act": cfg.model.act, "text_pool": cfg.model.text_pool,
    }


def _rank_file_summary(names: list) -> list:
    """File names with their rank numbers folded: zero_pp_rank_{0..7}_mp_rank_00_optim_states.pt (8 files)."""
    patterns: dict = {}
    for name in names:
        match = re.match(r"^(.*zero_pp_rank_)(\d+)(_.*)$", name)
        key = (match.group(1), match.group(3)) if match else (name, None)
        patterns.setdefault(key, []).append(int(match.group(2)) if match else None)
    lines = []
    for (head, tail), ranks in patterns.items():
        if tail is None:
            lines.append(head)
        else:
            lines.append(f"{head}{{{min(ranks)}..{max(ranks)}}}{tail} ({len(ranks)} files)")
    return lines


def _inspect_deepspeed(directory: Path, trainer_state: dict) -> tuple[list, dict]:
    """(tensors, info) of a DeepSpeed step directory, from its model states (no optimizer file read)."""
    files = DeepSpeedFiles(directory)
    tensors = [(name, shape, dtype) for name, (shape, dtype) in files.weight_entries().items()]
    info = {
        "kind": "deepspeed training checkpoint", "path": str(directory), "step": trainer_state.get("step"),
        "layout": trainer_state.get("layout", "unknown"), "world_size": trainer_state.get("world_size", "unknown"),
        "samples_seen": trainer_state.get("samples_seen"), "engine": "deepspeed", "zero_stage": files.zero_stage,
        "dp_world_size": files.dp_world_size, "bf16": files.bf16, "ds_version": files.ds_version,
        "frozen": list(files.frozen),
        "files": sorted(p.name for p in directory.iterdir() if p.is_file()) + [f"{DS_TAG}/{n}" for n in files.files],
        "deepspeed_files": _rank_file_summary(files.files),
    }
    return tensors, info


def inspect_checkpoint(path: Union[str, Path]) -> dict:
    """Step, config summary, parameter count, layout and tensor list of a DCP, DeepSpeed or consolidated
    checkpoint (metadata only: no tensor is read)."""
    kind, directory = checkpoint_kind(path)
    if kind == "deepspeed":
        trainer_state = json.loads((directory / "trainer_state.json").read_text())
        cfg = pin_architecture(config_from_yaml_file(directory / "config.yaml"), trainer_state.get("model_arch"))
        tensors, info = _inspect_deepspeed(directory, trainer_state)
    elif kind == "dcp":
        trainer_state = json.loads((directory / "trainer_state.json").read_text())
        cfg = pin_architecture(config_from_yaml_file(directory / "config.yaml"), trainer_state.get("model_arch"))
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
        cfg = config_from_yaml_file(directory / CONFIG_FILE)
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
        f"options      vision_pos_embed {c['vision_pos_embed']}, vision_ln_pre {c['vision_ln_pre']}, act {c['act']}, "
        f"text_pool {c['text_pool']}, norm_eps {c['norm_eps']:g}",
        f"params       {info['params']:,} ({info['params'] / 1e6:.2f}M) in {len(info['tensors'])} tensors",
    ]
    if "optimizer_entries" in info:
        lines.append(f"optimizer    {info['optimizer_entries']} entries")
    if "zero_stage" in info:
        frozen = f", {len(info['frozen'])} frozen parameters" if info["frozen"] else ""
        lines.append(f"engine       deepspeed ZeRO-{info['zero_stage']}, dp world size {info['dp_world_size']}"
                     f"{', bf16' if info['bf16'] else ', fp32'}, DeepSpeed {info['ds_version']}{frozen}")
        lines.append(f"files        {DS_TAG}/ " + "; ".join(info["deepspeed_files"]))
    lines.append("tensors")
    width = max(len(t["name"]) for t in info["tensors"])
    for t in info["tensors"]:
        lines.append(f"  {t['name']:<{width}}  {str(tuple(t['shape'])):<16} {t['dtype']}")
    return "\n".join(lines)
