"""Training checkpoints: sharded (torch.distributed.checkpoint), atomic, resumable.

A checkpoint is a directory `step_00001234/` holding
  model + optimizer      DCP shards (each rank writes its part; re-sharded on load)
  trainer_state.json     step, samples seen, lr schedule, layout it was written with
  rng_rank{r}.pt         every rank's RNG states (tensors only: loads with weights_only=True)
  data_rank{r}.json      the data stream position of each data-parallel rank
  config.yaml            the resolved config
It is written as `step_00001234.tmp/` and renamed when every rank has finished; `latest` names the
last complete one and is replaced last, so a crash mid-save never leaves a checkpoint that resume
would pick.

Asynchronous saves (`checkpoint.async_save`): the state is copied to host memory, written by a
background thread (DCP `async_save`, over a gloo group of its own so that its collectives never
interleave with training's), and training goes on. The save is committed (renamed, `latest`
updated, old ones pruned) by `finalize_pending_save`, which waits until the write has finished on
every rank; it runs at the start of the next save and at the end of training.

Completeness (`checkpoint_problem`): besides the files above, every storage file that `.metadata`
names must exist and be at least as long as the metadata says, so a truncated or partly copied
checkpoint is skipped by `--resume auto` (with a warning naming it) in favour of an older one.

Nothing is unpickled without restriction: `rng_rank{r}.pt` loads with `weights_only=True`, and
the DCP `.metadata` pickle is read with an unpickler that admits only DCP's metadata classes.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from .config import flatten_tree
from .distributed import barrier

log = logging.getLogger("flip_scale.checkpoint")

STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    pass


# Optimizer state flattened to one key per (parameter name, state): the keys of several model parts
# (pipeline stages on one rank) merge without collisions, and re-shard across any layout.
_OPTIM_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def model_state(model_parts) -> dict:
    """The model state of every part (pipeline stages hold disjoint names), merged."""
    merged = {}
    for part in _as_list(model_parts):
        merged.update(get_model_state_dict(part))
    return merged


def optimizer_state(model_parts, optimizers) -> dict:
    merged = {}
    for part, optimizer in zip(_as_list(model_parts), _as_list(optimizers)):
        merged.update(get_optimizer_state_dict(part, optimizer, options=_OPTIM_OPTIONS))
    return merged


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


@contextmanager
def _single_process_quiet():
    """DCP warns on every single-process save and load that it assumes one process; it is meant."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


# ----------------------------------------------------------------------------- completeness


def read_metadata(path: Path):
    """The DCP `Metadata` of a checkpoint directory, read with the restricted unpickler."""
    # Imported here: the conversion package imports this module.
    from .convert.safety import read_dcp_metadata

    return read_dcp_metadata(path)


class _RestrictedReader(FileSystemReader):
    """DCP's file reader with `.metadata` read by the restricted unpickler (DCP's own uses pickle.load)."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        if kwargs.get("rank") is not None:
            raise CheckpointError(f"{self.path}: per-rank DCP metadata (written without collectives) is not supported")
        metadata = read_metadata(Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner with non-tensor entries (optimizer hyper-parameters, stored as pickled
    bytes) read by `torch.load(weights_only=True)`: DCP's own planner unpickles them with
    `weights_only=False`, which would run code planted in a checkpoint shard."""

    def load_bytes(self, read_item, value) -> None:
        from torch.distributed.checkpoint._traverse import set_element  # what DCP's planner uses

        try:
            loaded = torch.load(value, weights_only=True)
        except Exception as error:  # UnpicklingError naming the refused global, usually
            lines = str(error).splitlines()
            reason = next((line.strip() for line in lines if "Unsupported global" in line), lines[0] if lines else "")
            refused = (f"checkpoint entry {read_item.dest_index.fqn!r} is not plain data (numbers, strings, lists, "
                            f"dicts, tensors) and is refused rather than unpickled: {reason}")
            raise CheckpointError(refused) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


def _dcp_load(state: dict, path: Path, planner: SafeLoadPlanner, no_dist: bool) -> None:
    """`dcp.load` with the restricted reader and planner; a refused entry surfaces as CheckpointError
    (DCP wraps errors of its read step in its own exception)."""
    try:
        dcp.load(state, storage_reader=_RestrictedReader(str(path)), planner=planner, no_dist=no_dist)
    except CheckpointError:
        raise
    except CheckpointException as error:  # a BaseException holding each rank's error
        refused = [exc for exc, _ in error.failures.values() if isinstance(exc, CheckpointError)]
        if refused:
            raise CheckpointError(f"{path}: {refused[0]}") from None
        raise


def storage_problem(path: Path) -> Optional[str]:
    """Why the DCP data of `path` is incomplete (a storage file named by `.metadata` is missing or
    shorter than the metadata says), or None. Reads only the metadata and file sizes."""
    path = Path(path)
    try:
        metadata = read_metadata(path)
    except Exception as error:  # unreadable, truncated or refused metadata
        return f"its .metadata cannot be read ({error})"
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            return f"the shard file {name} named in .metadata is missing"
        have = file.stat().st_size
        if have < size:
            return f"the shard file {name} holds {have} bytes, .metadata says at least {size} (truncated)"
    return None


def checkpoint_problem(path: Path) -> Optional[str]:
    """Why `path` is not a complete checkpoint, or None when it is."""
    path = Path(path)
    if not STEP_DIR.match(path.name):
        return f"the name {path.name!r} is not step_XXXXXXXX (a .tmp directory is a save that never finished)"
    if not path.is_dir():
        return "it does not exist"
    for name in (".metadata", "trainer_state.json", "config.yaml"):
        if not (path / name).is_file():
            return f"{name} is missing"
    try:
        trainer_state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError) as error:
        return f"trainer_state.json cannot be read ({error})"
    world_size = int(trainer_state.get("world_size", 0) or 0)
    for rank in range(world_size):
        if not (path / f"rng_rank{rank}.pt").is_file():
            return f"rng_rank{rank}.pt is missing (written by {world_size} ranks)"
    return storage_problem(path)


def is_complete(path: Path) -> bool:
    """A renamed step directory with readable metadata, trainer state, config and every shard file
    at its full size (no `.tmp` suffix)."""
    return checkpoint_problem(path) is None


def list_checkpoints(run_dir: Path) -> list[Path]:
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def find_latest(run_dir: Path) -> Optional[Path]:
    """The checkpoint named by `latest` if complete, else the newest complete one (with a warning
    naming each checkpoint skipped and why)."""
    run_dir = Path(run_dir)
    latest_file = run_dir / "latest"
    skipped = None
    if latest_file.exists():
        named = run_dir / latest_file.read_text().strip()
        problem = checkpoint_problem(named)
        if problem is None:
            return named
        log.warning("'latest' names %s, which is incomplete: %s; looking for an older complete one", named, problem)
        skipped = named
    for path in reversed(list_checkpoints(run_dir)):
        if skipped is not None and path.resolve() == skipped.resolve():
            continue
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        log.warning("skipping incomplete checkpoint %s: %s", path, problem)
    return None


def _write_json_atomic(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def rng_state() -> dict:
    _, words, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": torch.tensor(words, dtype=torch.int64)}
    if gauss_next is not None:  # the second normal of the last `random.gauss` pair, still to come
        state["python_gauss_next"] = torch.tensor([gauss_next], dtype=torch.float64)
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    gauss_next = float(state["python_gauss_next"].item()) if "python_gauss_next" in state else None
    random.setstate((3, tuple(int(x) for x in state["python"].tolist()), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------- saving


@dataclass
class _PendingSave:
    """An asynchronous save whose shards are still being written; committed by `finalize_pending_save`."""

    future: Any
    run_dir: Path
    step: int
    tmp: Path
    final: Path
    keep_last: int
    keep_every: int
    started: float


_pending: Optional[_PendingSave] = None
# The gloo group of the background writer, and the default group it was made under (a later
# process group, e.g. the next run in the same process, gets a new one).
_async_group = None
_async_group_world = None


def _writer_group():
    global _async_group, _async_group_world
    if not _distributed():
        return None
    world = dist.group.WORLD
    if _async_group is None or _async_group_world is not world:
        _async_group = dist.new_group(backend="gloo")
        _async_group_world = world
    return _async_group


def pending_save() -> Optional[Path]:
    """The final path of the asynchronous save not yet committed, if any."""
    return _pending.final if _pending is not None else None


def save_checkpoint(
    run_dir: Path,
    step: int,
    model,
    optimizer,
    scheduler,
    trainer_state: dict,
    config_yaml: str,
    data_state: Optional[dict] = None,
    dp_rank: int = 0,
    keep_last: int = 3,
    keep_every: int = 0,
    async_save: bool = False,
) -> Path:
    """Write `run_dir/step_XXXXXXXX/` collectively (every rank calls this) and update `latest`.

    `model` / `optimizer`: one module and its optimizer, or lists of model parts (the pipeline
    stages of this rank) and their optimizers, in the same order.
    With `async_save` the model and optimizer shards are written in the background and the save is
    committed by the next `save_checkpoint` or by `finalize_pending_save` (which every rank must
    call before exiting); the returned path exists only then.
    """
    global _pending
    finalize_pending_save()
    run_dir = Path(run_dir)
    final = run_dir / step_dir_name(step)
    tmp = run_dir / (step_dir_name(step) + ".tmp")
    rank = _rank()
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier()
    state = {"model": model_state(model), "optim": optimizer_state(model, optimizer)}
    # The small files first: they hold the state of this moment (the RNG moves on during an async write).
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    if data_state is not None:
        _write_json_atomic(tmp / f"data_rank{dp_rank}.json", data_state)
    if rank == 0:
        full_state = dict(trainer_state, step=step, scheduler=scheduler.state_dict() if scheduler else None)
        _write_json_atomic(tmp / "trainer_state.json", full_state)
        (tmp / "config.yaml").write_text(config_yaml)
    pending = _PendingSave(None, run_dir, step, tmp, final, keep_last, keep_every, time.perf_counter())
    if async_save:
        with _single_process_quiet():
            response = dcp.async_save(state, checkpoint_id=str(tmp), process_group=_writer_group(),
                                      no_dist=not _distributed())
        # Newer DCP returns staging and upload futures; the upload is what the commit waits for.
        pending.future = getattr(response, "upload_completion", response)
        _pending = pending
        log.info("checkpoint %s: writing in the background", final)
        return final
    with _single_process_quiet():
        dcp.save(state, checkpoint_id=str(tmp), no_dist=not _distributed())
    _commit(pending)
    return final


def finalize_pending_save() -> Optional[Path]:
    """Wait for the pending asynchronous save on every rank and commit it (collective; a no-op when
    none is pending). Returns the committed checkpoint, or None."""
    global _pending
    pending, _pending = _pending, None
    if pending is None:
        return None
    error = None
    try:
        pending.future.result()
    except Exception as caught:  # reported below, after every rank has said whether it succeeded
        error = caught
    if not _all_ranks_ok(error is None):
        where = f"on this rank: {type(error).__name__}: {error}" if error is not None else "on another rank"
        raise CheckpointError(
            f"the background write of checkpoint {pending.final} failed {where}; it was not committed and "
            f"{pending.run_dir / 'latest'} still names the previous checkpoint"
        )
    _commit(pending)
    return pending.final


def abandon_pending_save() -> None:
    """After a failure: let this rank's background write finish, but do not commit it (the other
    ranks may be gone). The `.tmp` directory is left for the next save of that step to replace."""
    global _pending
    pending, _pending = _pending, None
    if pending is None:
        return
    try:
        pending.future.result()
    except Exception:  # noqa: BLE001 - the run is failing already; the save is dropped either way
        pass
    log.warning("checkpoint %s was not committed: the run stopped before every rank had finished it", pending.final)


def _all_ranks_ok(ok: bool) -> bool:
    if not _distributed():
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
    if "nccl" in str(dist.get_backend()):
        flag = flag.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _commit(pending: _PendingSave) -> None:
    """Every rank has written its part of `pending.tmp`: rename it, update `latest`, prune."""
    _pause_for_tests("mid_save", pending.step)
    barrier()
    if _rank() == 0:
        final = pending.final
        if final.exists():
            shutil.rmtree(final)
        os.replace(pending.tmp, final)
        latest_tmp = pending.run_dir / "latest.tmp"
        latest_tmp.write_text(final.name + "\n")
        os.replace(latest_tmp, pending.run_dir / "latest")
        prune_checkpoints(pending.run_dir, pending.keep_last, pending.keep_every, pending.step)
        log.info("checkpoint written: %s (%.1f s)", final, time.perf_counter() - pending.started)
    barrier()


def _pause_for_tests(point: str, step: int) -> None:
    """Test hook: FLIP_SCALE_TEST_PAUSE=<point>:<seconds> sleeps at that point of every save,
    `<point>@<step>:<seconds>` only in the save of that step. `mid_save` is after every file of the
    checkpoint is written and before it is renamed."""
    setting = os.environ.get("FLIP_SCALE_TEST_PAUSE", "")
    if ":" not in setting:
        return
    where, seconds = setting.rsplit(":", 1)
    name, _, at_step = where.partition("@")
    if name == point and (not at_step or int(at_step) == step):
        log.warning("FLIP_SCALE_TEST_PAUSE: pausing %s s at %s of step %d", seconds, point, step)
        time.sleep(float(seconds))


def prune_checkpoints(run_dir: Path, keep_last: int, keep_every: int, current_step: Optional[int] = None) -> None:
    """Delete complete checkpoints beyond the last `keep_last`, keeping every `keep_every`-th step
    (`keep_last` <= 0 keeps everything).

    With `current_step` (the checkpoint just written) only checkpoints up to that step count and
    can go: after a resume from an older checkpoint, later ones of the abandoned continuation are
    left alone rather than allowed to push out the checkpoint just written."""
    if keep_last <= 0:
        return
    complete = [p for p in list_checkpoints(run_dir) if is_complete(p)]
    if current_step is not None:
        complete = [p for p in complete if int(STEP_DIR.match(p.name).group(1)) <= current_step]
    for path in complete[:-keep_last]:
        step = int(STEP_DIR.match(path.name).group(1))
        if keep_every and step % keep_every == 0:
            continue
        shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------- loading


def _differences(saved: dict, now: dict) -> list[tuple[str, Any, Any]]:
    saved, now = flatten_tree(saved), flatten_tree(now)
    return [(key, saved.get(key), now.get(key)) for key in sorted(set(saved) | set(now)) if saved.get(key) != now.get(key)]


# Model options that change what the model computes without changing any tensor's shape: weights
# load into either setting without an error, so they are compared besides the shapes.
FUNCTIONAL_KEYS = ("vision_pool", "text_causal", "text_pad_mask", "norm_eps")


def functional_differences(saved_model: Optional[dict], model_config: dict) -> list[tuple[str, Any, Any]]:
    """The FUNCTIONAL_KEYS that differ between a checkpoint's `model` config section and
    `model_config` (a key the checkpoint's config lacks has ModelConfig's default)."""
    from dataclasses import asdict

    from .config import ModelConfig

    defaults = asdict(ModelConfig())
    saved_model = saved_model or {}
    diffs = []
    for key in FUNCTIONAL_KEYS:
        old, new = saved_model.get(key, defaults[key]), model_config.get(key, defaults[key])
        if key == "norm_eps":
            try:
                same = float(old) == float(new)
            except (TypeError, ValueError):
                same = old == new
        else:
            same = old == new
        if not same:
            diffs.append((key, old, new))
    return diffs


def compare_architecture(
    where: str,
    saved_arch: Optional[dict],
    model_arch: dict,
    saved_model: Optional[dict] = None,
    model_config: Optional[dict] = None,
    functional: str = "refuse",
    config_file: Optional[Path] = None,
) -> None:
    """Refuse weights (`where`) of another architecture: `saved_arch` (FlipArch.to_dict of the
    weights; None: unknown, shapes not checked) against `model_arch`, and the FUNCTIONAL_KEYS of
    `saved_model` (the weights' `model` config section) against `model_config`, naming the keys.
    `functional`: "refuse" (resume: the run must compute what the checkpoint computed) or "warn"
    (a fine-tune start, which may mean another pooling or mask option: logged, not refused)."""
    if functional not in ("refuse", "warn"):
        raise ValueError(f"functional={functional!r}: expected 'refuse' or 'warn'")
    arch_diffs = _differences(saved_arch, model_arch) if saved_arch is not None else []
    func_diffs = (
        functional_differences(saved_model, model_config) if saved_model is not None and model_config is not None else []
    )
    if not arch_diffs and not func_diffs:
        return
    see = f" (see {config_file})" if config_file is not None else ""
    func_text = ", ".join(f"model.{key} ({old!r} in the checkpoint, {new!r} now)" for key, old, new in func_diffs)
    if not arch_diffs:
        if functional == "warn":
            log.warning(
                "%s was trained with other model options: %s. The weights load (the shapes are the same) but the "
                "model computes differently with these options; continuing, as a fine-tune may intend it", where, func_text,
            )
            return
        raise CheckpointError(
            f"{where} was written with other model options ({func_text}): the shapes match, but the model would "
            f"compute something else than the one that was trained. To resume, set those keys to the checkpoint's "
            f"values{see}; to start a fine-tune from its weights with other options, use --init-from"
        )
    text = ", ".join(f"{key}: {old!r} in the checkpoint, {new!r} now" for key, old, new in arch_diffs)
    config_text = ""
    if saved_model is not None and model_config is not None:
        config_diffs = _differences(saved_model, model_config)
        if config_diffs:
            config_text = "; config keys that differ: " + ", ".join(
                f"model.{key} ({old!r} in the checkpoint, {new!r} now)" for key, old, new in config_diffs
            )
    raise CheckpointError(
        f"{where} holds a different model architecture ({text}){config_text}. A checkpoint loads only into "
        f"the architecture it was written with: set those model keys to the checkpoint's values{see}"
    )


def check_architecture(path: Path, model_arch: dict, model_config: Optional[dict] = None, functional: str = "refuse") -> None:
    """Refuse a checkpoint whose model architecture (trainer_state.json `model_arch`) differs from
    `model_arch`, naming the differing architecture fields and `model.*` config keys. With
    `model_config` (the run's `model` section) the options that change the computation but no shape
    (FUNCTIONAL_KEYS: pooling, text masks, norm eps) are compared with the checkpoint's config.yaml
    too: refused (`functional="refuse"`, resume) or logged (`"warn"`, a fine-tune start)."""
    path = Path(path)
    saved = json.loads((path / "trainer_state.json").read_text()).get("model_arch")
    if saved is None:
        log.warning("%s records no model architecture; loading it without checking its shapes", path)
    saved_model = None
    if model_config is not None and (path / "config.yaml").is_file():
        import yaml

        saved_model = (yaml.safe_load((path / "config.yaml").read_text()) or {}).get("model") or {}
    compare_architecture(str(path), saved, model_arch, saved_model, model_config, functional, path / "config.yaml")


def load_checkpoint(
    path: Path,
    model,
    optimizer=None,
    scheduler=None,
    model_arch: Optional[dict] = None,
    model_config: Optional[dict] = None,
) -> dict:
    """Load a checkpoint into an already-built (and parallelised) model; return the trainer state.
    The data stream's positions are read by `data_states` / `data_state_for_resume` (every rank's,
    merged, so that they continue under another layout).

    With `model_arch` (and `model_config`, the `model` section of the config) a checkpoint of
    another architecture is refused before anything is loaded.
    """
    path = Path(path)
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"{path} is not a complete checkpoint: {problem}")
    if model_arch is not None:
        check_architecture(path, model_arch, model_config)
    no_dist = not _distributed()
    state = {"model": model_state(model)}
    with _single_process_quiet():
        _dcp_load(state, path, SafeLoadPlanner(), no_dist)
        if optimizer is not None:
            # Partial: a parameter that never had a gradient has no optimizer state in the file.
            state["optim"] = optimizer_state(model, optimizer)
            _dcp_load({"optim": state["optim"]}, path, SafeLoadPlanner(allow_partial_load=True), no_dist)
    for part in _as_list(model):
        set_model_state_dict(part, state["model"], options=StateDictOptions(strict=False))
    if optimizer is not None:
        for part, opt in zip(_as_list(model), _as_list(optimizer)):
            set_optimizer_state_dict(part, opt, optim_state_dict=state["optim"], options=_OPTIM_OPTIONS)
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    if scheduler is not None and trainer_state.get("scheduler"):
        scheduler.load_state_dict(trainer_state["scheduler"])
    rng_file = path / f"rng_rank{_rank()}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return trainer_state


def data_states(path: Path) -> list[dict]:
    """The data stream positions of every data-parallel rank that wrote one."""
    return [json.loads(f.read_text()) for f in sorted(Path(path).glob("data_rank*.json"))]


def data_state_for_resume(path: Path, fresh: dict) -> tuple[Optional[dict], Optional[str]]:
    """`flip_scale.data.resume.data_state_for_resume` of the blobs of checkpoint `path`."""
    from .data.resume import data_state_for_resume as merge

    return merge(data_states(path), fresh)


def resolve_resume(resume: Optional[str], run_dir: Path, option: str = "--resume") -> Optional[Path]:
    """`--resume auto`: the latest complete checkpoint of the run directory, or none (fresh start).
    `--resume PATH`: that checkpoint (a step directory, or a run directory's latest).
    `option`: the command-line option named in errors; "auto" has its meaning only for --resume
    (`--init-from` also takes a consolidated directory: flip_scale.evaluation.checkpoints.resolve_init_from)."""
    if not resume:
        return None
    if resume == "auto" and option == "--resume":
        return find_latest(run_dir)
    also = "" if option == "--resume" else " or a consolidated directory (model.safetensors + flip_config.yaml)"
    path = Path(resume)
    problem = checkpoint_problem(path)
    if problem is None:
        return path
    if path.is_dir() and not path.name.startswith("step_"):
        found = find_latest(path)
        if found is not None:
            return found
        raise CheckpointError(
            f"{option} {resume}: no complete checkpoint in that run directory (expected step_XXXXXXXX directories"
            f"{also})"
        )
    raise CheckpointError(
        f"{option} {resume}: not a complete checkpoint ({problem}); expected a complete step_XXXXXXXX directory"
        f"{',' if also else ' or'} a run directory{also}"
    )
