import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


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
