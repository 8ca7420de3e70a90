"""Bad files at start, each refused before the engine is built, naming the setting and the value.
(A checkpoint of another architecture: tests/test_checkpoint.py::test_other_architecture_is_refused_
naming_the_keys and test_checkpoint_manager.py; the vocabulary check itself: test_engine.py.)"""

import json

import pytest
from fault_runs import tiny_overrides

from flip_scale.checkpoint import CheckpointError, find_latest
from flip_scale.metrics import read_jsonl
from flip_scale.train import main

BUILT = "optimizer: "  # the engine's first line: nothing heavy may have started before a refusal


@pytest.mark.parametrize("setting, message", [
    ("data.train_shards=[]", "data.train_shards: shard pattern [] names no files"),
    ("data.tokenizer=/nonexistent/tok.model", "data.tokenizer: tokenizer model '/nonexistent/tok.model' does not exist"),
    ("model.vocab_size=100", "but model.vocab_size is 100; set model.vocab_size="),
])
def test_bad_data_files_are_refused_before_the_engine_is_built(tmp_path, synthetic_dir, capfd, setting, message):
    code = main(["--run-dir", str(tmp_path / "run"), *tiny_overrides(synthetic_dir, 2, 0, "data.synthetic=false"),
                 setting])
    err = capfd.readouterr().err
    assert code == 2 and "flip-train: config error:" in err and message in err, err[-2000:]
    assert BUILT not in err


def test_a_checkpoint_of_a_newer_format_is_refused_before_loading(tmp_path, synthetic_dir):
    run_dir = tmp_path / "run"
    assert main(["--run-dir", str(run_dir), *tiny_overrides(synthetic_dir, 1, 0)]) == 0
    checkpoint = find_latest(run_dir)
    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["format_version"] == 1
    state_file.write_text(json.dumps({**state, "format_version": 2}))
    with pytest.raises(CheckpointError, match=r"format_version 2 \(trainer_state.json\), newer than the 1 this"):
        main(["--run-dir", str(run_dir), "--resume", "auto", *tiny_overrides(synthetic_dir, 2, 0)])
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1]  # nothing trained after the refusal
