"""Checkpoints: retention, completeness checks, safe loading, async saves, exact resume, resume into
another parallel layout, and a run killed during a save.

Runs use the real entry point (`flip_scale.train.main`) on the tiny config's synthetic shards,
with a global batch of 32 and `train.log_every_steps=1`, so metrics.jsonl holds every step's loss.
"""

from __future__ import annotations

import ast
import contextlib
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from dist_utils import run_distributed
from flip_scale import checkpoint as ckpt
from flip_scale.checkpoint import dcp as ckpt_dcp
from flip_scale.checkpoint import (
    CheckpointError,
    checkpoint_problem,
    find_latest,
    is_complete,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from flip_scale.metrics import read_jsonl

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- helpers


def _overrides(data_dir: Path, steps: int, every: int, workers: int = 0, *extra: str) -> list[str]:
    return [
        f"data.synthetic_dir={data_dir}",
        f"data.train_shards={data_dir}/train-{{000000..000007}}.tar",
        f"data.tokenizer={data_dir}/tokenizer.model",
        f"train.max_steps={steps}",
        "train.global_batch_size=32",
        "train.log_every_steps=1",
        f"checkpoint.every_steps={every}",
        "checkpoint.keep_last=0",  # keep every checkpoint: the tests resume from intermediate ones
        f"data.num_workers={workers}",
        "eval.at_end=false",
        "logging.tensorboard=false",
        *extra,
    ]


def _losses(run_dir: Path) -> dict[int, float]:
    """step -> loss; a step logged twice (a run resumed before it) keeps its last value."""
    return {r["step"]: r["loss"] for r in read_jsonl(Path(run_dir) / "metrics.jsonl")}


@contextlib.contextmanager
def _recording_batches():
    """Records the sample keys of each trained step: [(step, keys), ...] in training order."""
    from flip_scale.train import Trainer

    seen: list[tuple[int, list[str]]] = []
    original = Trainer.train_step

    def train_step(self, batch):
        seen.append((self.state.step + 1, list(batch["keys"])))
        return original(self, batch)

    Trainer.train_step = train_step
    try:
        yield seen
    finally:
        Trainer.train_step = original


class _Stop(Exception):
    """Raised right after a checkpoint: the run dies there, as if killed."""


@contextlib.contextmanager
def _stop_after_save(step: int):
    from flip_scale.train import Trainer

    original = Trainer.save

    def save(self, *args):
        path = original(self, *args)
        if self.state.step == step:
            raise _Stop(f"stopped after the checkpoint of step {step}")
        return path

    Trainer.save = save
    try:
        yield
    finally:
        Trainer.save = original


def _train(run_dir: Path, args: list[str], resume: str | None = None) -> None:
    from flip_scale.train import main

    argv = ["--run-dir", str(run_dir), *(["--resume", resume] if resume else []), *args]
    assert main(argv) == 0


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(3, 2)

    def forward(self, x):
        return self.b(self.a(x))


def _small_checkpoints(run_dir: Path, steps, keep_last: int = 0, keep_every: int = 0):
    """Checkpoints of a small module + AdamW written by `save_checkpoint` in this process."""
    torch.manual_seed(0)
    net = _Net()
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    for step in steps:
        net(torch.randn(5, 4)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        save_checkpoint(
            run_dir, step, net, opt, None, trainer_state={"world_size": 1, "samples_seen": step},
            config_yaml="model: {}\n", keep_last=keep_last, keep_every=keep_every,
        )
    return net, opt


# ----------------------------------------------------------------------------- retention, completeness, safety


def test_keep_last_and_keep_every(tmp_path):
    _small_checkpoints(tmp_path, range(1, 11), keep_last=2, keep_every=4)
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "step_00000004", "step_00000008", "step_00000009", "step_00000010",
    ]
    assert (tmp_path / "latest").read_text().strip() == "step_00000010"
    assert not list(tmp_path.glob("*.tmp"))
    # keep_last=0 keeps everything.
    _small_checkpoints(tmp_path / "all", range(1, 4), keep_last=0)
    assert len(list_checkpoints(tmp_path / "all")) == 3


def test_pruning_after_resuming_from_an_older_checkpoint_keeps_the_new_one(tmp_path):
    """Resumed from step 2 in a directory that still holds steps 3 and 4 (an abandoned
    continuation), the new step-3 save with keep_last=2 must not be pruned by the later ones."""
    _small_checkpoints(tmp_path, [1, 2, 3, 4], keep_last=0)
    _small_checkpoints(tmp_path, [3], keep_last=2)  # the resumed run's next checkpoint
    assert (tmp_path / "latest").read_text().strip() == "step_00000003"
    assert find_latest(tmp_path).name == "step_00000003"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000003", "step_00000004"]


def test_saved_state_loads_back(tmp_path):
    net, opt = _small_checkpoints(tmp_path, [1, 2])
    fresh = _Net()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    state = load_checkpoint(tmp_path / "step_00000002", fresh, fresh_opt)
    assert state["step"] == 2 and state["samples_seen"] == 2
    for (name, a), b in zip(net.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    for p, q in zip(net.parameters(), fresh.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], fresh_opt.state[q][key]), key


def test_truncated_or_partial_checkpoints_are_skipped(tmp_path, caplog):
    _small_checkpoints(tmp_path, [1, 2, 3, 4])
    # step 4: a shard file shorter than .metadata says (a copy or write cut short).
    shard = next((tmp_path / "step_00000004").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-10])
    # step 3: a shard file named in .metadata is missing.
    next((tmp_path / "step_00000003").glob("*.distcp")).unlink()
    # A newer save that never finished is never a candidate.
    (tmp_path / "step_00000005.tmp").mkdir()
    assert not is_complete(tmp_path / "step_00000004")
    assert "truncated" in checkpoint_problem(tmp_path / "step_00000004")
    assert "missing" in checkpoint_problem(tmp_path / "step_00000003")
    with caplog.at_level(logging.WARNING, logger="flip_scale.checkpoint"):
        assert find_latest(tmp_path).name == "step_00000002"
    text = caplog.text
    assert "step_00000004" in text and "truncated" in text
    assert "step_00000003" in text and "missing" in text
    # Explicitly naming an incomplete checkpoint is refused with the reason.
    with pytest.raises(CheckpointError, match="truncated"):
        ckpt.resolve_resume(str(tmp_path / "step_00000004"), tmp_path)
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        load_checkpoint(tmp_path / "step_00000003", _Net())
    # A rank's RNG file missing (trainer_state says 1 rank wrote one) makes it incomplete too.
    (tmp_path / "step_00000002" / "rng_rank0.pt").unlink()
    assert "rng_rank0.pt" in checkpoint_problem(tmp_path / "step_00000002")
    assert find_latest(tmp_path).name == "step_00000001"


class _RunsCode:
    """Unpickles to a call of os.system: what a malicious .metadata could hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_metadata_is_never_unpickled_freely(tmp_path):
    _small_checkpoints(tmp_path, [1])
    path = tmp_path / "step_00000001"
    marker = tmp_path / "code_ran"
    (path / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    assert "cannot be read" in checkpoint_problem(path)
    assert find_latest(tmp_path) is None
    with pytest.raises(CheckpointError):
        load_checkpoint(path, _Net())
    assert not marker.exists()


def test_code_planted_in_an_optimizer_entry_is_refused_and_never_runs(tmp_path, monkeypatch):
    """DCP stores optimizer hyper-parameters as pickled bytes; loading them must not unpickle code."""
    marker = tmp_path / "code_ran"
    original = ckpt_dcp.optimizer_state

    def planted(model, optimizer):
        state = original(model, optimizer)
        state["param_groups.a.weight.lr"] = _RunsCode(marker)
        return state

    monkeypatch.setattr(ckpt_dcp, "optimizer_state", planted)
    _small_checkpoints(tmp_path, [1])
    monkeypatch.setattr(ckpt_dcp, "optimizer_state", original)
    assert not marker.exists()
    fresh = _Net()
    with pytest.raises(CheckpointError, match=r"param_groups\.a\.weight\.lr.*refused rather than unpickled"):
        load_checkpoint(tmp_path / "step_00000001", fresh, torch.optim.AdamW(fresh.parameters(), lr=0.1))
    assert not marker.exists()
    # A checkpoint of plain hyper-parameters still loads them (lr 0.1, not the fresh optimizer's 0.5).
    _small_checkpoints(tmp_path / "plain", [1])
    opt = torch.optim.AdamW(fresh.parameters(), lr=0.5)
    load_checkpoint(tmp_path / "plain" / "step_00000001", fresh, opt)
    assert [group["lr"] for group in opt.param_groups] == [0.1]


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    import random

    torch.manual_seed(123)
    random.seed(7)
    random.gauss(0, 1)  # leaves the second normal of a pair pending
    _small_checkpoints(tmp_path, [1])  # reseeds torch with 0 and draws from it, then saves
    expected_torch = torch.rand(4)
    expected_python = [random.gauss(0, 1), random.random()]
    torch.manual_seed(999)
    random.seed(999)
    load_checkpoint(tmp_path / "step_00000001", _Net())
    assert torch.equal(torch.rand(4), expected_torch)
    assert [random.gauss(0, 1), random.random()] == expected_python


def _call_name(node: ast.Call) -> str:
    func = node.func
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def test_package_loads_pickles_only_with_weights_only():
    """Every torch.load in the package passes weights_only=True; nothing calls pickle.load(s)."""
    offenders = []
    for file in sorted((REPO / "flip_scale").rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if not isinstance(node, ast.Call):
                continue
            name = _call_name(node)
            where = f"{file.relative_to(REPO)}:{node.lineno}"
            if name == "torch.load":
                flags = {k.arg: k.value for k in node.keywords}
                value = flags.get("weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    offenders.append(f"{where} torch.load without weights_only=True")
            elif name in ("pickle.load", "pickle.loads"):
                offenders.append(f"{where} {name}")
    assert not offenders, offenders


# ----------------------------------------------------------------------------- exact resume (one process)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, synthetic_dir):
    """6 steps, checkpoints at 3 and 6, no interruption, one process, data.num_workers=0."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    with _recording_batches() as seen:
        _train(run_dir, _overrides(synthetic_dir, 6, 3, 0))
    return run_dir, _losses(run_dir), seen


@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume_after_stopping(tmp_path, synthetic_dir, uninterrupted, workers):
    """Stop right after the checkpoint of step k, resume with --resume auto: the losses of steps
    k+1..n are bitwise those of an uninterrupted run and every step trains on the same samples
    (none seen twice, none skipped). With 2 loader workers k is odd, so the resumed stream must
    also continue with the worker whose turn it was."""
    steps, k = (6, 3) if workers == 0 else (7, 3)
    args = _overrides(synthetic_dir, steps, k, workers)
    if workers == 0:
        reference_dir, reference, reference_seen = uninterrupted
    else:
        reference_dir = tmp_path / "uninterrupted"
        with _recording_batches() as reference_seen:
            _train(reference_dir, args)
        reference = _losses(reference_dir)
    assert sorted(reference) == list(range(1, steps + 1))

    run_dir = tmp_path / "run"
    with _recording_batches() as seen, _stop_after_save(k), pytest.raises(_Stop):
        _train(run_dir, args)
    assert find_latest(run_dir).name == f"step_{k:08d}"
    assert max(_losses(run_dir)) == k
    with _recording_batches() as seen_after:
        _train(run_dir, args, resume="auto")
    resumed = _losses(run_dir)
    assert [s for s, _ in seen_after] == list(range(k + 1, steps + 1))
    for step in range(k + 1, steps + 1):
        assert resumed[step] == reference[step], (step, resumed[step], reference[step])  # bitwise
    # The data stream: the same samples in the same batches as the uninterrupted run.
    assert seen + seen_after == reference_seen
    keys = [key for _, batch in reference_seen for key in batch]
    assert len(keys) == len(set(keys)) == steps * 32  # within the first epoch: no repeats at all
    state = json.loads((run_dir / f"step_{steps:08d}" / "trainer_state.json").read_text())
    assert state["step"] == steps and state["samples_seen"] == steps * 32


def test_async_save_overlaps_training_and_resumes_exactly(tmp_path, synthetic_dir, uninterrupted, monkeypatch):
    """checkpoint.async_save: training goes on while the shards are written (the writer is slowed
    down to make the overlap certain), the checkpoint is committed only once written, the losses
    equal the synchronous run's, and resuming from the checkpoint written while training went on
    reproduces the remaining steps bitwise."""
    from torch.distributed.checkpoint import FileSystemWriter

    from flip_scale.train import Trainer

    _, reference, _ = uninterrupted
    writes, step_starts = [], []
    original_write, original_step = FileSystemWriter.write_data, Trainer.train_step

    def slow_write(self, plan, planner):
        started = time.monotonic()
        time.sleep(1.5)
        result = original_write(self, plan, planner)
        import threading

        writes.append((Path(str(self.path)).name, started, time.monotonic(), threading.current_thread().name))
        return result

    def train_step(self, batch):
        final3 = self.run_dir / "step_00000003"
        step_starts.append((self.state.step + 1, time.monotonic(), final3.exists()))
        return original_step(self, batch)

    monkeypatch.setattr(FileSystemWriter, "write_data", slow_write)
    monkeypatch.setattr(Trainer, "train_step", train_step)
    run_dir = tmp_path / "async"
    _train(run_dir, _overrides(synthetic_dir, 6, 3, 0, "checkpoint.async_save=true"))

    assert [w[0] for w in writes] == ["step_00000003.tmp", "step_00000006.tmp"]
    name, write_start, write_end, thread = writes[0]
    assert thread != "MainThread"
    # Steps 4 and 5 started before step 3's shards were written (5 only after 4 had finished).
    during = [s for s, t, _ in step_starts if s > 3 and t < write_end]
    assert 4 in during and 5 in during, (step_starts, writes[0])
    # Step 3's checkpoint was not visible while it was being written; both are complete at the end.
    assert [done for s, _, done in step_starts if s in (4, 5, 6)] == [False, False, False]
    assert find_latest(run_dir).name == "step_00000006"
    assert all(is_complete(run_dir / f"step_0000000{s}") for s in (3, 6))
    assert not list(run_dir.glob("*.tmp"))
    losses = _losses(run_dir)
    assert losses == reference  # bitwise, every step

    # Resume from the checkpoint that was written while steps 4-6 ran.
    monkeypatch.setattr(FileSystemWriter, "write_data", original_write)
    resumed_dir = tmp_path / "resumed"
    _train(resumed_dir, _overrides(synthetic_dir, 6, 3, 0, "checkpoint.async_save=true"),
           resume=str(run_dir / "step_00000003"))
    resumed = _losses(resumed_dir)
    assert sorted(resumed) == [4, 5, 6]
    assert all(resumed[s] == reference[s] for s in (4, 5, 6)), (resumed, reference)


def _refused_resume(run_dir: Path, args: list[str], checkpoint: Path, capfd) -> str:
    """A resume of a checkpoint this run can never load: exit 2 (a usage error) and the message."""
    from flip_scale.train import main

    capfd.readouterr()
    assert main(["--run-dir", str(run_dir), "--resume", str(checkpoint), *args]) == 2
    err = capfd.readouterr().err
    assert "flip-train: checkpoint error:" in err, err[-2000:]
    return err


def test_other_architecture_is_refused_naming_the_keys(tmp_path, synthetic_dir, uninterrupted, capfd):
    run_dir, _, _ = uninterrupted
    checkpoint = run_dir / "step_00000003"
    args = _overrides(synthetic_dir, 6, 3, 0, "model.vocab_size=1024")
    message = _refused_resume(tmp_path / "other", args, checkpoint, capfd)
    assert "vocab_size: 512 in the checkpoint, 1024 now" in message
    assert "model.vocab_size" in message and str(checkpoint) in message
    with pytest.raises(CheckpointError, match="model.vocab_size"):
        from flip_scale.train import main

        main(["--run-dir", str(tmp_path / "init"), "--init-from", str(checkpoint), *args])
    assert not (tmp_path / "other" / "metrics.jsonl").exists()  # refused before training


def test_other_model_options_are_refused_on_resume_and_logged_on_init_from(tmp_path, synthetic_dir, uninterrupted,
                                                                           capfd):
    """Options that change the computation but no shape (pooling, text masks, norm eps): a resume
    is refused naming them; --init-from (a fine-tune start, which may intend them) logs them and trains."""
    from flip_scale.train import main

    run_dir, _, _ = uninterrupted
    checkpoint = run_dir / "step_00000003"
    changed = ["model.vision_pool=cls", "model.text_causal=true", "model.norm_eps=1e-5"]
    message = _refused_resume(tmp_path / "other", _overrides(synthetic_dir, 6, 3, 0, *changed), checkpoint, capfd)
    for expected in ("model.vision_pool ('avg_patches' in the checkpoint, 'cls' now)",
                     "model.text_causal (False in the checkpoint, True now)",
                     "model.norm_eps (1e-06 in the checkpoint, 1e-05 now)", str(checkpoint)):
        assert expected in message, message
    assert "text_pad_mask" not in message
    assert not (tmp_path / "other" / "metrics.jsonl").exists()  # refused before training

    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # on the module's logger: flip-train's logging setup replaces the root's handlers
    logging.getLogger("flip_scale.checkpoint").addHandler(handler)
    try:
        assert main(["--run-dir", str(tmp_path / "init"), "--init-from", str(checkpoint),
                     *_overrides(synthetic_dir, 1, 1, 0, "model.text_pad_mask=true")]) == 0
    finally:
        logging.getLogger("flip_scale.checkpoint").removeHandler(handler)
    text = " ".join(record.getMessage() for record in records)
    assert "model.text_pad_mask (False in the checkpoint, True now)" in text, text
    assert sorted(_losses(tmp_path / "init")) == [1]


# ----------------------------------------------------------------------------- another layout (4 ranks)


def _full_state(trainer) -> dict:
    """Full (gathered) model and flattened optimizer state of this rank's model parts, on the CPU."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, flatten_optimizer_state_dict=True)
    out = {}
    for part, optimizer in zip(trainer.model_parts, trainer.optimizers.optimizers):
        for key, value in get_model_state_dict(part, options=options).items():
            out["model." + key] = value.detach().cpu().clone() if torch.is_tensor(value) else value
        for key, value in get_optimizer_state_dict(part, optimizer, options=options).items():
            out["optim." + key] = value.detach().cpu().clone() if torch.is_tensor(value) else value
    return out


def _train_rank(rank: int, world: int, argv: list[str], capture: bool) -> dict:
    """One rank of `flip-train` (the real `main`) under the test's process group; with `capture`
    returns the full model + optimizer state right after `Trainer.resume`."""
    import flip_scale.train as train

    train.shutdown = lambda: None  # the process group belongs to run_distributed
    captured = {}
    if capture:
        original = train.Trainer.resume

        def resume(self, path):
            original(self, path)
            captured.update(_full_state(self))

        train.Trainer.resume = resume
    assert train.main(argv) == 0
    return captured


def _one_process_state(synthetic_dir: Path, checkpoint: Path, run_dir: Path) -> dict:
    from flip_scale.config import load_config
    from flip_scale.distributed import ProcessInfo
    from flip_scale.train import Trainer

    cfg = load_config(None, _overrides(synthetic_dir, 4, 2, 0))
    trainer = Trainer(cfg, run_dir, ProcessInfo(0, 1, 0, torch.device("cpu")))
    trainer.resume(checkpoint)
    return _full_state(trainer)


def _assert_same_state(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), f"{what}: keys differ: {sorted(set(got) ^ set(want))[:5]}"
    for key, value in want.items():
        if torch.is_tensor(value):
            assert torch.equal(got[key], value), f"{what}: {key} differs after loading"
        else:
            assert got[key] == value, f"{what}: {key}: {got[key]!r} != {value!r}"


def test_resume_into_other_layouts(tmp_path, synthetic_dir):
    """A checkpoint written under dp_shard=4 (4 ranks) resumes under other layouts.

    The global batch is drawn from data.streams sample streams (here 8, chosen from the 8 shards), the same
    under every layout, and their positions are saved per stream; so every target layout continues
    with the losses of the uninterrupted dp_shard=4 run, to float tolerance (the reduction order
    differs): dp_replicate=2 x dp_shard=2, dp_shard=2 x tp=2, pp=2 x dp_shard=2
    (parallel.microbatches=2) and a plain dp_shard=2 on 2 ranks.
    And for every target layout the model and optimizer state right after loading, gathered to
    full tensors, equals bit for bit what one process loads from the checkpoint (which is step 2
    of the dp_shard=4 run: its loss at step 3 is reproduced).
    Ranks run the real `main` under the tests' gloo process helper (a forkserver with torch
    imported), which starts 4 ranks in about a second where torchrun takes about ten.
    """
    base = _overrides(synthetic_dir, 4, 2, 0)
    source = tmp_path / "dp_shard4"
    run_distributed(_train_rank, 4, args=(["--run-dir", str(source), *base, "parallel.dp_shard=4"], False))
    checkpoint = source / "step_00000002"
    assert is_complete(checkpoint) and find_latest(source).name == "step_00000004"
    uninterrupted = _losses(source)

    layouts = {
        "hsdp": (4, ["parallel.dp_replicate=2", "parallel.dp_shard=2"], True),
        "tp": (4, ["parallel.dp_shard=2", "parallel.tp=2"], True),
        "pp": (4, ["parallel.pp=2", "parallel.dp_shard=2", "parallel.microbatches=2"], True),
        "dp2": (2, ["parallel.dp_shard=2"], False),
    }
    losses, states = {}, {}
    for name, (world, extra, capture) in layouts.items():
        argv = ["--run-dir", str(tmp_path / name), "--resume", str(checkpoint), *base, *extra]
        results = run_distributed(_train_rank, world, args=(argv, capture))
        losses[name] = _losses(tmp_path / name)
        assert sorted(losses[name]) == [3, 4], name
        if capture:
            merged = {}
            for result in results:  # pipeline stages hold different keys; the other ranks agree
                for key, value in result.items():
                    if key in merged and torch.is_tensor(value):
                        assert torch.equal(merged[key], value), (name, key)
                    merged.setdefault(key, value)
            states[name] = merged

    reference_state = _one_process_state(synthetic_dir, checkpoint, tmp_path / "one_process")
    assert reference_state["optim.state.logit_scale.step"] == 2
    assert any(k.endswith("exp_avg") and v.abs().sum() > 0 for k, v in reference_state.items() if torch.is_tensor(v))
    for name, state in states.items():
        _assert_same_state(state, reference_state, name)

    def close(a: float, b: float) -> bool:
        return abs(a - b) <= 1e-5 * abs(b)

    for step in (3, 4):
        for name in layouts:
            assert close(losses[name][step], uninterrupted[step]), (name, step, losses[name], uninterrupted)
    # The losses are those of the data: a stream that restarted elsewhere would give others.
    assert uninterrupted[3] != uninterrupted[4]
    # Step 3's loss depends only on the loaded weights (and, for dp 4, the data position): exact.
    assert losses["hsdp"][3] == uninterrupted[3]


# ----------------------------------------------------------------------------- killed mid-save (2 ranks)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _torchrun(nproc: int, args: list[str], env: dict, log_file: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "flip_scale.train", *args]
    return subprocess.Popen(cmd, cwd=log_file.parent, env=env, stdout=log_file.open("w"), stderr=subprocess.STDOUT)


def test_kill_during_checkpoint_write_then_resume(tmp_path, synthetic_dir):
    """SIGKILL both ranks of a 2-rank torchrun while the checkpoint of step 4 is being written
    (every file written, not yet renamed): `latest` still names step 2, the partial directory is
    never picked, and `--resume auto` continues from step 2 to the end with the losses the killed
    run had logged for steps 3-4."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), FLIP_SCALE_TEST_PAUSE="mid_save@4:120")
    run_dir = tmp_path / "run"
    args = ["--run-dir", str(run_dir), *_overrides(synthetic_dir, 6, 2, 0)]
    log_file = tmp_path / "killed.log"
    proc = _torchrun(2, args, env, log_file)
    partial = run_dir / "step_00000004.tmp"
    deadline = time.monotonic() + 240
    try:
        needed = [".metadata", "trainer_state.json", "rng_rank0.pt", "rng_rank1.pt"]
        while not all((partial / name).exists() for name in needed) or log_file.read_text().count("pausing") < 2:
            assert proc.poll() is None, log_file.read_text()[-3000:]
            assert time.monotonic() < deadline, "the run never reached the checkpoint of step 4"
            time.sleep(0.2)
    finally:
        workers = _children(proc.pid)
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait(timeout=30)
    assert len(workers) == 2
    killed_losses = _losses(run_dir)
    assert sorted(killed_losses) == [1, 2, 3, 4]

    assert (run_dir / "latest").read_text().strip() == "step_00000002"
    assert partial.is_dir() and not (run_dir / "step_00000004").exists()
    assert find_latest(run_dir).name == "step_00000002"

    env.pop("FLIP_SCALE_TEST_PAUSE")
    proc = _torchrun(2, ["--resume", "auto", *args], env, tmp_path / "resumed.log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    assert "resumed from" in (tmp_path / "resumed.log").read_text()
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 3, 4, 5, 6]
    resumed = {r["step"]: r["loss"] for r in records[4:]}
    assert resumed[3] == killed_losses[3] and resumed[4] == killed_losses[4]
    assert find_latest(run_dir).name == "step_00000006"
    assert not partial.exists()  # the retried save of step 4 replaced it
    assert all(is_complete(run_dir / f"step_0000000{s}") for s in (2, 4, 6))


def _rank0_choice(rank: int, world_size: int, fail: str) -> str:
    from flip_scale.runtime import on_rank0_for_all

    def compute():
        if fail == "checkpoint":
            raise CheckpointError("no complete checkpoint")
        if fail == "other":
            raise OSError("stale file handle")
        return f"chosen by rank {rank}"

    try:
        return on_rank0_for_all(compute)
    except (CheckpointError, OSError) as error:
        return f"{type(error).__name__}: {error}"


def test_rank0_choice_and_its_errors_reach_every_rank():
    from dist_utils import run_distributed

    assert run_distributed(_rank0_choice, 2, ("",)) == ["chosen by rank 0", "chosen by rank 0"]
    assert run_distributed(_rank0_choice, 2, ("checkpoint",)) == ["CheckpointError: no complete checkpoint"] * 2
    # Any error type reaches every rank as itself (it used to arrive as a RuntimeError naming it).
    assert run_distributed(_rank0_choice, 2, ("other",)) == ["OSError: stale file handle"] * 2
