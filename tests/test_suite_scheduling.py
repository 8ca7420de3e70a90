"""The README's `-n 2`: which tests share a pytest-xdist worker (tests/conftest.py)."""

from pathlib import Path

from conftest import _RUN_ALONE, xdist_scope

TESTS = Path(__file__).resolve().parent


def test_every_file_that_starts_a_slurm_cluster_runs_alone():
    # A Slurm cluster of the tests (tests/test_slurm.py's fixture) or a timed fault beside another
    # file's multi-rank runs would time the load, not the code.
    for path in sorted(set(TESTS.rglob("test_*.py")) - {Path(__file__).resolve()}):
        text = path.read_text()
        if "slurm_cluster" in text or "running_cluster" in text or path.parent.name == "faults":
            nodeid = f"{path.relative_to(TESTS.parent).as_posix()}::test_x"
            assert xdist_scope(nodeid) == "alone", f"{nodeid}: add its file to _RUN_ALONE"


def test_other_files_are_a_unit_each():
    assert xdist_scope("tests/test_parallel.py::test_layout_matches_one_process[dp_shard=4]") == "tests/test_parallel.py"
    assert xdist_scope("tests/test_parallel.py::test_zero3_shards_parameters_and_optimizer_state") == "tests/test_parallel.py"
    assert xdist_scope("tests/faults/test_chaos.py::test_killed_five_times") == "alone"
    assert all(prefix.startswith("tests/") for prefix in _RUN_ALONE)
