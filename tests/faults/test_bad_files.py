"""Bad files at start, each refused before the engine is built, naming the setting and the value.
(The architecture comparison itself: tests/test_checkpoint.py::test_other_architecture_is_refused_
naming_the_keys and test_checkpoint_manager.py; the vocabulary check itself: test_engine.py.)"""

import json

import pytest
from fault_runs import tiny_overrides

from flip_scale.checkpoint import find_latest
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


def test_a_checkpoint_of_a_newer_format_or_another_architecture_is_refused_before_the_engine_exit_2(
        tmp_path, synthetic_dir, capfd):
    run_dir = tmp_path / "run"
    assert main(["--run-dir", str(run_dir), *tiny_overrides(synthetic_dir, 1, 0)]) == 0
    checkpoint = find_latest(run_dir)
    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["format_version"] == 1
    capfd.readouterr()
    # Another architecture: refused naming the key, exit 2 (a usage error, never requeued).
    code = main(["--run-dir", str(run_dir), "--resume", "auto", *tiny_overrides(synthetic_dir, 2, 0),
                 "model.vision_layers=3"])
    err = capfd.readouterr().err
    assert code == 2 and "flip-train: checkpoint error:" in err and "different model architecture" in err, err[-2000:]
    assert BUILT not in err
    state_file.write_text(json.dumps({**state, "format_version": 2}))
    code = main(["--run-dir", str(run_dir), "--resume", "auto", *tiny_overrides(synthetic_dir, 2, 0)])
    err = capfd.readouterr().err
    assert code == 2 and "format_version 2 (trainer_state.json), newer than the 1 this" in err, err[-2000:]
    assert BUILT not in err
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1]  # nothing trained after the refusals
