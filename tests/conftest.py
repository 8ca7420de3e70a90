import os
from pathlib import Path

import pytest

import ds_ops

os.environ.setdefault("OMP_NUM_THREADS", "1")

# Test files whose tests need DeepSpeed's compiled CPU ops (CPU Adam, async I/O): run last, with the
# ops built in the background meanwhile (tests/ds_ops.py).
_NEEDS_DEEPSPEED_OPS = ("test_deepspeed_engine.py",)


# Under `-n 2` (README, pytest-xdist): the files that start a Slurm cluster or time a fault are one
# unit, so they run one after another on one worker and never beside each other; the other worker
# meanwhile runs other files (their timing bounds allow that load: every -n 2 run in BENCHMARKS.md
# passed). Every other file is a unit of its own, so that its module fixtures (the layouts'
# reference runs) are computed once, not once per worker.
_SLURM_AND_FAULTS = ("tests/faults/", "tests/test_slurm.py", "tests/test_studies.py")
SLURM_AND_FAULTS = "slurm-and-faults"


def xdist_scope(nodeid: str) -> str:
    """The unit a test is sent to a worker in: its file, or SLURM_AND_FAULTS."""
    path = nodeid.split("::", 1)[0]
    return SLURM_AND_FAULTS if path.startswith(_SLURM_AND_FAULTS) else path


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """pytest-xdist's scope scheduling with `xdist_scope` as the scope, in collection order
    (tests/faults/ first, the DeepSpeed engine's file last)."""
    if config.getvalue("dist") != "load":  # what `-n N` sets; another --dist mode is left to xdist
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FileScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_scope(nodeid)

    config.option.loadscopereorder = False
    return FileScheduling(config, log)


def pytest_collection_modifyitems(session, config, items):
    later = [item for item in items if item.path.name in _NEEDS_DEEPSPEED_OPS]
    if not later or len(later) == len(items):
        return
    items[:] = [item for item in items if item.path.name not in _NEEDS_DEEPSPEED_OPS] + later
    # One build per session (worker gw0's, or the only process's); another worker's wait() polls it.
    ds_ops.start(Path(str(config.rootpath)) / ".pytest_logs",
                 build_here=os.environ.get("PYTEST_XDIST_WORKER", "gw0") == "gw0")


def pytest_sessionfinish(session, exitstatus):
    ds_ops.stop()


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    """The tiny config's synthetic dataset and tokenizer, written once per test session."""
    from flip_scale.config import load_config
    from flip_scale.data import ensure_synthetic_data

    out = tmp_path_factory.mktemp("synthetic")
    cfg = load_config(None, [
        f"data.synthetic_dir={out}",
        f"data.train_shards={out}/train-{{000000..000007}}.tar",
        f"data.tokenizer={out}/tokenizer.model",
    ])
    ensure_synthetic_data(cfg.data, image_size=32, vocab_size=cfg.model.vocab_size)
    return out
