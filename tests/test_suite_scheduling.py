"""The README's `-n 2`: which tests share a pytest-xdist worker (tests/conftest.py)."""

import re
from pathlib import Path
from types import SimpleNamespace

from conftest import SLURM_AND_FAULTS, pytest_xdist_make_scheduler, xdist_scope

TESTS = Path(__file__).resolve().parent
STARTS_A_CLUSTER = re.compile(r"slurm_cluster|running_cluster|LocalSlurm|TwoNodeSlurm|two_node_slurm|\bsbatch\b")


def test_every_file_that_starts_a_slurm_cluster_is_in_the_slurm_and_faults_unit():
    # Two Slurm clusters at once, or a timed fault beside one, would time each other.
    found = []
    for path in sorted(set(TESTS.rglob("test_*.py")) - {Path(__file__).resolve()}):
        if STARTS_A_CLUSTER.search(path.read_text()):
            nodeid = f"{path.relative_to(TESTS.parent).as_posix()}::test_x"
            assert xdist_scope(nodeid) == SLURM_AND_FAULTS, f"{nodeid}: add its file to _SLURM_AND_FAULTS"
            found.append(path.name)
    assert {"test_slurm.py", "test_studies.py", "test_two_nodes.py"} <= set(found)


class _Node:
    def __init__(self, name: str):
        self.name, self.sent = name, []
        self.gateway, self.shutting_down = SimpleNamespace(id=name), False

    def send_runtest_some(self, indexes):
        self.sent.extend(indexes)

    def shutdown(self):
        pass


def _config(dist: str = "load") -> SimpleNamespace:
    option = SimpleNamespace(dist=dist, tx=["popen", "popen"], loadscopereorder=True)
    return SimpleNamespace(option=option, getvalue=lambda name: getattr(option, name))


def test_the_scheduler_sends_whole_files_and_the_slurm_and_fault_files_together_first():
    collection = [
        "tests/faults/test_chaos.py::test_a", "tests/faults/test_two_nodes.py::test_b",
        "tests/test_loss.py::test_c", "tests/test_parallel.py::test_d[dp_shard=4]",
        "tests/test_parallel.py::test_d[tp=4]", "tests/test_parallel.py::test_e", "tests/test_slurm.py::test_f",
        "tests/test_studies.py::test_g", "tests/test_unmask.py::test_h", "tests/test_deepspeed_engine.py::test_i",
    ]
    config = _config()
    scheduler = pytest_xdist_make_scheduler(config=config, log=None)
    assert config.option.loadscopereorder is False  # collection order: the long unit first, DeepSpeed last
    nodes = [_Node("gw0"), _Node("gw1")]
    for node in nodes:
        scheduler.add_node(node)
    for node in nodes:
        scheduler.add_node_collection(node, collection)
    scheduler.schedule()
    # The first worker's first unit: the Slurm and fault files, whole.
    assert [collection[i] for i in nodes[0].sent[:5]] == [n for n in collection if xdist_scope(n) == SLURM_AND_FAULTS]
    done = {node.name: 0 for node in nodes}
    while any(done[node.name] < len(node.sent) for node in nodes):  # the workers run what they got
        for node in nodes:
            while done[node.name] < len(node.sent):
                scheduler.mark_test_complete(node, node.sent[done[node.name]])
                done[node.name] += 1
    assert scheduler.tests_finished
    sent = {node.name: {collection[i] for i in node.sent} for node in nodes}
    assert sorted(sent["gw0"] | sent["gw1"]) == sorted(collection) and not sent["gw0"] & sent["gw1"]
    units = {}
    for nodeid in collection:
        units.setdefault(xdist_scope(nodeid), set()).add(nodeid)
    assert len(units) == 5  # the Slurm and fault files, and one unit for each of the 4 other files
    for unit in units.values():  # every unit whole on one worker
        assert unit <= sent["gw0"] or unit <= sent["gw1"], unit


def test_an_explicit_dist_mode_is_left_to_pytest_xdist():
    assert pytest_xdist_make_scheduler(config=_config("loadfile"), log=None) is None
