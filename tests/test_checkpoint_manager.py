"""CheckpointManager with fake components of every kind (sharded, json, rank_blobs, files): what a
step directory holds, what comes back on load, background saves committed at finalize and dropped
by abandon, the components' declarations checked, 2 ranks' data blobs merged on every rank, and the
checkpoint written by the code before the checkpoint package read by the new one."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, get_optimizer_state_dict, set_model_state_dict, set_optimizer_state_dict,
)

from dist_utils import run_distributed
from flip_scale.checkpoint import (
    CheckpointError, CheckpointManager, CheckpointSaveError, find_latest, is_complete, list_checkpoints, open_checkpoint,
    read_rank_blobs, step_dir_name,
)
from flip_scale.data.resume import data_state_for_resume as merge_blobs

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

LEGACY = Path(__file__).resolve().parent / "fixtures" / "legacy_checkpoint" / "step_00000002"
OPTIM = StateDictOptions(flatten_optimizer_state_dict=True)


@dataclass
class _Cfg:  # config.CheckpointConfig's fields
    every_steps: int = 2
    keep_last: int = 0
    keep_every: int = 0
    async_save: bool = False


class _Engine:
    """kind "sharded" by its key: a module and its AdamW as the DCP entries "model" and "optim"."""

    def __init__(self, seed: int = 0, shard=None):
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
        if shard is not None:
            shard(self.model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.1)

    def train_step(self):
        self.model(torch.randn(3, 4)).square().mean().backward()
        self.optimizer.step()
        self.optimizer.zero_grad()

    def state_dict(self) -> dict:
        return {"model": get_model_state_dict(self.model),
                "optim": get_optimizer_state_dict(self.model, self.optimizer, options=OPTIM)}

    def load_state_dict(self, state: dict) -> None:
        set_model_state_dict(self.model, state["model"])
        set_optimizer_state_dict(self.model, self.optimizer, optim_state_dict=state["optim"], options=OPTIM)

    def full_state(self) -> dict:
        options = StateDictOptions(full_state_dict=True, flatten_optimizer_state_dict=True)
        model = get_model_state_dict(self.model, options=options)
        optim = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        out = {f"model.{k}": v for k, v in model.items()}
        out.update({f"optim.{k}": v for k, v in optim.items()})
        return {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in out.items()}


class _Trainer:
    """kind "json" by its key."""

    def __init__(self, state: dict):
        self.state = state
        self.loaded = None

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.loaded = state


class _Data:
    """kind "rank_blobs" by its key."""

    blob_prefix = "data_rank"

    def __init__(self, rank: int, blob):
        self.blob_name = f"data_rank{rank}"
        self.blob = blob
        self.loaded = None

    def state_dict(self):
        return self.blob

    def load_state_dict(self, blobs: list) -> None:
        self.loaded = blobs


class _Notes:
    """kind "files": writes and reads its own file (as the DeepSpeed engine will)."""

    checkpoint_kind = "files"

    def __init__(self, text: str = ""):
        self.text = text

    def save_files(self, tmp_dir: Path) -> None:
        assert tmp_dir.name.endswith(".tmp")  # written before the rename
        (tmp_dir / "notes.txt").write_text(self.text)

    def load_files(self, step_dir: Path) -> None:
        self.text = (step_dir / "notes.txt").read_text()


def _states(engine, trainer_state=None, blob=None, notes=None) -> dict:
    states = {"engine": engine, "trainer": _Trainer(trainer_state or {"world_size": 1, "samples_seen": 40})}
    if blob is not None:
        states["data"] = _Data(0, blob)
    if notes is not None:
        states["notes"] = notes
    return states


def _assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert torch.equal(got[key], value) if torch.is_tensor(value) else got[key] == value, key


# ----------------------------------------------------------------------------- one process


def test_every_component_kind_is_written_and_loaded_back(tmp_path):
    engine = _Engine(seed=0)
    engine.train_step()
    blob = {"positions": {"0": [1, 7]}}
    manager = CheckpointManager(tmp_path, _Cfg(), _states(engine, blob=blob, notes=_Notes("hello")),
                                config_yaml="model:\n  name: tiny\n")
    assert manager.maybe_save(1) is None and not list_checkpoints(tmp_path)  # every_steps=2
    path = manager.maybe_save(2)
    assert path == tmp_path / "step_00000002" and is_complete(path)
    assert (tmp_path / "latest").read_text() == "step_00000002\n" and not list(tmp_path.glob("*.tmp"))
    assert sorted(p.name for p in path.iterdir()) == [
        ".metadata", "__0_0.distcp", "config.yaml", "data_rank0.json", "notes.txt", "rng_rank0.pt",
        "trainer_state.json",
    ]
    assert json.loads((path / "trainer_state.json").read_text()) == {"world_size": 1, "samples_seen": 40, "step": 2,
                                                                     "format_version": 1}
    assert json.loads((path / "data_rank0.json").read_text()) == blob
    assert (path / "config.yaml").read_text() == "model:\n  name: tiny\n"
    saved = engine.full_state()
    expected_rand = torch.rand(3)  # what the RNG gives after the save point

    fresh = _Engine(seed=1)
    fresh.train_step()  # other weights and optimizer state, overwritten by the load
    states = _states(fresh, blob={"unused": True}, notes=_Notes())
    torch.manual_seed(123)
    trainer_state = CheckpointManager(tmp_path, _Cfg(), states, config_yaml="").load(path)
    assert torch.equal(torch.rand(3), expected_rand)  # this rank's RNG restored last
    assert trainer_state == states["trainer"].loaded == {"world_size": 1, "samples_seen": 40, "step": 2,
                                                         "format_version": 1}
    assert states["data"].loaded == [blob]
    assert states["notes"].text == "hello"
    _assert_same(fresh.full_state(), saved)
    # force: a save at a step that is not a multiple of every_steps.
    assert manager.maybe_save(3, force=True) == tmp_path / "step_00000003"


def test_an_engine_that_writes_its_own_files_resumes_and_is_pruned(tmp_path):
    """No sharded component (a DeepSpeed-like engine owning its files): no .metadata, yet the
    checkpoint is complete, `latest` resolves to it, it loads back, and old ones are pruned."""
    cfg = _Cfg(keep_last=1)
    for step, text in ((2, "two"), (4, "four")):
        states = {"notes": _Notes(text), "trainer": _Trainer({"world_size": 1})}
        CheckpointManager(tmp_path, cfg, states, config_yaml="x: 1\n").save(step)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000004"]  # step 2 pruned
    assert not (tmp_path / "step_00000004" / ".metadata").exists()
    assert is_complete(tmp_path / "step_00000004") and find_latest(tmp_path).name == "step_00000004"
    notes, trainer = _Notes(), _Trainer({"world_size": 1})
    saved = CheckpointManager(tmp_path, cfg, {"notes": notes, "trainer": trainer}, config_yaml="").load(
        tmp_path / "step_00000004")
    assert notes.text == "four" and saved["step"] == 4 and saved["dcp_shards"] is False
    # A checkpoint with DCP shards still needs its .metadata.
    engine = _Engine()
    CheckpointManager(tmp_path / "dcp", _Cfg(), _states(engine), config_yaml="").save(1)
    (tmp_path / "dcp" / "step_00000001" / ".metadata").unlink()
    assert not is_complete(tmp_path / "dcp" / "step_00000001")


class _FailingNotes(_Notes):
    """A files-kind engine whose save fails while `fail` is set (a full disk)."""

    fail = False

    def save_files(self, tmp_dir: Path) -> None:
        if self.fail:
            raise OSError(28, "No space left on device")
        super().save_files(tmp_dir)


@pytest.mark.parametrize("async_save", [False, True])
def test_a_written_save_resets_the_failures_in_a_row_for_every_engine_kind(tmp_path, async_save):
    """No sharded state (a DeepSpeed-like engine) with async_save too: a save that is written ends
    the run of failures, so max_failed_saves counts failures in a row, not in all."""
    notes = _FailingNotes("x")
    cfg = _Cfg(async_save=async_save)
    cfg.max_failed_saves = 1
    manager = CheckpointManager(tmp_path, cfg, {"notes": notes, "trainer": _Trainer({"world_size": 1})},
                                config_yaml="")
    for step in (1, 3, 5):
        notes.fail = True
        assert manager.save(step) is None and manager.failed_in_a_row == 1
        notes.fail = False
        assert manager.save(step + 1) == tmp_path / step_dir_name(step + 1)
        manager.finalize()
        assert manager.failed_in_a_row == 0, step
    notes.fail = True
    manager.save(7)
    with pytest.raises(CheckpointSaveError, match="2 saves in a row failed, more than checkpoint.max_failed_saves=1"):
        manager.save(9)


def test_partial_state_keys_load_what_the_checkpoint_has(tmp_path):
    class WithExtra(_Engine):
        partial_state_keys = ("optim", "extra")
        extra = None

        def state_dict(self):
            return dict(super().state_dict(), extra={"ema": self.extra if self.extra is not None else torch.zeros(2)})

        def load_state_dict(self, state):
            super().load_state_dict(state)
            self.extra = state["extra"]["ema"]

    engine = _Engine()
    engine.train_step()
    CheckpointManager(tmp_path, _Cfg(), _states(engine), config_yaml="").save(2)
    later = WithExtra()
    later.extra = torch.full((2,), 5.0)
    CheckpointManager(tmp_path, _Cfg(), _states(later), config_yaml="").load(tmp_path / "step_00000002")
    assert torch.equal(later.extra, torch.full((2,), 5.0))  # not in the checkpoint: left as it was
    _assert_same(later.full_state(), engine.full_state())
    # An entry outside partial_state_keys that the checkpoint lacks is refused.
    WithExtra.partial_state_keys = ("optim",)
    with pytest.raises(CheckpointException, match="extra"):
        CheckpointManager(tmp_path, _Cfg(), _states(WithExtra()), config_yaml="").load(tmp_path / "step_00000002")


def test_components_must_say_how_they_are_stored(tmp_path):
    engine = _Engine()
    with pytest.raises(ValueError, match=r"'ema' declares no checkpoint_kind; valid kinds: sharded, files, json"):
        CheckpointManager(tmp_path, _Cfg(), dict(_states(engine), ema=object()), config_yaml="")
    with pytest.raises(ValueError, match=r"'notes' \(files\) lacks save_files, load_files"):
        bare = type("Bare", (), {"checkpoint_kind": "files"})()
        CheckpointManager(tmp_path, _Cfg(), dict(_states(engine), notes=bare), config_yaml="")
    with pytest.raises(ValueError, match="exactly one of kind 'json'"):
        CheckpointManager(tmp_path, _Cfg(), {"engine": engine}, config_yaml="")
    with pytest.raises(ValueError, match="no 'world_size'"):
        CheckpointManager(tmp_path, _Cfg(), _states(engine, {"samples_seen": 1}), config_yaml="").save(2)
    states = _states(engine, blob={"x": 1})
    states["data"].blob_name = "data3"
    with pytest.raises(ValueError, match="blob_name 'data3' is not blob_prefix 'data_rank'"):
        CheckpointManager(tmp_path, _Cfg(), states, config_yaml="").save(2)


def test_load_refuses_incomplete_checkpoints_and_other_architectures(tmp_path):
    arch = {"embed_dim": 8, "vision": {"width": 32}}
    states = _states(_Engine(), {"world_size": 1, "model_arch": arch})
    CheckpointManager(tmp_path, _Cfg(), states, config_yaml="model:\n  vision_pool: cls\n").save(2)
    path = tmp_path / "step_00000002"
    with pytest.raises(CheckpointError, match="not a complete checkpoint: the name 'step_00000004.tmp'"):
        CheckpointManager(tmp_path, _Cfg(), _states(_Engine()), config_yaml="").load(tmp_path / "step_00000004.tmp")
    other = dict(arch, vision={"width": 64})
    with pytest.raises(CheckpointError, match=r"vision.width: 32 in the checkpoint, 64 now"):
        CheckpointManager(tmp_path, _Cfg(), _states(_Engine()), config_yaml="", model_arch=other).load(path)
    with pytest.raises(CheckpointError, match=r"model.vision_pool \('cls' in the checkpoint, 'avg_patches' now\)"):
        CheckpointManager(tmp_path, _Cfg(), _states(_Engine()), config_yaml="", model_arch=arch,
                          model_config={"vision_pool": "avg_patches"}).load(path)


def test_async_save_is_committed_at_finalize_and_dropped_by_abandon(tmp_path, caplog):
    engine = _Engine()
    manager = CheckpointManager(tmp_path, _Cfg(async_save=True, keep_last=1), _states(engine), config_yaml="")
    final = manager.save(2)
    assert manager.pending == final == tmp_path / "step_00000002"
    assert (tmp_path / "step_00000002.tmp" / "trainer_state.json").is_file()  # the small files: written already
    manager.finalize()
    assert manager.pending is None and is_complete(final) and find_latest(tmp_path) == final
    # The next save commits the pending one first (pruning step 2 with keep_last=1).
    assert manager.save(4) == manager.pending == tmp_path / "step_00000004"
    assert find_latest(tmp_path) == final
    manager.save(6)
    assert manager.pending == tmp_path / "step_00000006"
    assert find_latest(tmp_path).name == "step_00000004" and not final.exists()
    # abandon: this rank's write finishes, nothing is committed, `latest` keeps the previous one.
    with caplog.at_level(logging.WARNING, logger="flip_scale.checkpoint"):
        manager.abandon()
    assert "step_00000006 was not committed" in caplog.text
    assert manager.pending is None and not (tmp_path / "step_00000006").exists()
    assert (tmp_path / "step_00000006.tmp" / ".metadata").is_file()
    assert (tmp_path / "latest").read_text().strip() == "step_00000004"
    manager.close()  # nothing pending: a no-op
    assert find_latest(tmp_path).name == "step_00000004"


# ----------------------------------------------------------------------------- 2 ranks (FSDP2)


def _two_rank_save_and_load(rank: int, world_size: int, run_dir: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))

    def shard(model):  # dp_shard=2: each rank holds half of every parameter
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)

    engine = _Engine(seed=0, shard=shard)
    torch.manual_seed(10 + rank)  # each rank its own batch
    engine.train_step()
    blob = {"dp_rank": rank, "positions": {str(rank): [0, 16 * (rank + 1)]}}
    states = {"engine": engine, "trainer": _Trainer({"world_size": world_size}), "data": _Data(rank, blob)}
    path = CheckpointManager(run_dir, _Cfg(), states, config_yaml="model: {}\n").save(2)
    saved = engine.full_state()
    expected_rand = torch.rand(2)

    fresh = _Engine(seed=5, shard=shard)
    fresh.train_step()
    states = {"engine": fresh, "trainer": _Trainer({"world_size": world_size}), "data": _Data(rank, None)}
    CheckpointManager(run_dir, _Cfg(), states, config_yaml="").load(path)
    same_rng = torch.equal(torch.rand(2), expected_rand)
    got = fresh.full_state()
    same = sorted(got) == sorted(saved) and all(
        torch.equal(got[k], v) if torch.is_tensor(v) else got[k] == v for k, v in saved.items())
    return {"blobs": states["data"].loaded, "same_state": same, "same_rng": same_rng,
            "files": sorted(p.name for p in Path(path).iterdir())}


def test_two_ranks_write_the_legacy_layout_and_every_rank_gets_every_blob(tmp_path):
    results = run_distributed(_two_rank_save_and_load, 2, (str(tmp_path),))
    blobs = [{"dp_rank": 0, "positions": {"0": [0, 16]}}, {"dp_rank": 1, "positions": {"1": [0, 32]}}]
    for result in results:
        assert result["blobs"] == blobs
        assert result["same_state"] and result["same_rng"]
    # The same files as the checkpoint the code before this package wrote for 2 ranks, dp_shard=2.
    assert results[0]["files"] == sorted(p.name for p in LEGACY.iterdir())
    assert is_complete(tmp_path / "step_00000002")


# ----------------------------------------------------------------------------- the legacy checkpoint


def test_the_checkpoint_of_the_code_before_the_package_reads(tmp_path):
    assert is_complete(LEGACY)
    source = open_checkpoint(LEGACY)
    assert source.kind == "dcp" and source.path == LEGACY and source.step == 2 and source.samples_seen == 64
    assert source.config_tree["model"]["name"] == "tiny" and source.config_tree["parallel"]["dp_shard"] == 2
    # Its data blobs, as the manager hands them to a "data" component, and merged for a resume.
    data = _Data(0, None)
    rng = torch.get_rng_state(), random.getstate()
    try:
        trainer_state = CheckpointManager(tmp_path, _Cfg(), {"trainer": _Trainer({}), "data": data},
                                          config_yaml="").load(LEGACY)
    finally:
        torch.set_rng_state(rng[0])
        random.setstate(rng[1])
    assert trainer_state["step"] == 2 and trainer_state["world_size"] == 2 and trainer_state["scheduler"]
    assert [blob["dp_rank"] for blob in data.loaded] == [0, 1] and read_rank_blobs(LEGACY, "data_rank") == data.loaded
    fresh = dict(data.loaded[0], dp_rank=0, dp_size=1, batch_size=32, positions={"0": [0, 0], "1": [0, 0]})
    state, reason = merge_blobs(data.loaded, fresh)
    assert reason is None and state["positions"] == {"0": [0, 32], "1": [0, 32]}


# ----------------------------------------------------------------------------- dependencies


def _imports(file: Path, package: str) -> list[str]:
    """The flip_scale modules `file` (a module of `package`) imports, anywhere in it, absolute."""
    import ast

    found = []
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.append(module)
    return [name for name in found if name.startswith("flip_scale")]


def test_dependencies_point_one_way():
    """The checkpoint package imports neither the converter nor the entry points (the converter
    imports it), and the data part knows no checkpoint."""
    root = Path(__file__).resolve().parent.parent / "flip_scale"
    refused = ("flip_scale.convert", "flip_scale.evaluation", "flip_scale.train", "flip_scale.unmask",
               "flip_scale.evaluate", "flip_scale.data")
    offenders = []
    for file in sorted((root / "checkpoint").glob("*.py")):
        for name in _imports(file, "flip_scale.checkpoint"):
            if name.startswith(refused):
                offenders.append(f"{file.name} imports {name}")
    for file in sorted((root / "data").glob("*.py")):
        offenders += [f"data/{file.name} imports {name}" for name in _imports(file, "flip_scale.data")
                      if name.startswith("flip_scale.checkpoint")]
    assert not offenders, offenders
    assert "flip_scale.checkpoint.safety" in _imports(root / "convert" / "checkpoints.py", "flip_scale.convert")
    assert not (root / "convert" / "safety.py").exists()
