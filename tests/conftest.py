import os
from pathlib import Path

import pytest

import ds_ops

os.environ.setdefault("OMP_NUM_THREADS", "1")

# Test files whose tests need DeepSpeed's compiled CPU ops (CPU Adam, async I/O): run last, with the
# ops built in the background meanwhile (tests/ds_ops.py).
_NEEDS_DEEPSPEED_OPS = ("test_deepspeed_engine.py",)


def pytest_collection_modifyitems(session, config, items):
    later = [item for item in items if item.path.name in _NEEDS_DEEPSPEED_OPS]
    if not later or len(later) == len(items):
        return
    items[:] = [item for item in items if item.path.name not in _NEEDS_DEEPSPEED_OPS] + later
    ds_ops.start(Path(str(config.rootpath)) / ".pytest_logs")


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
