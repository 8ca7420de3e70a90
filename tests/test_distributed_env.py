"""Rendezvous from Slurm's variables (srun one task per GPU, no torchrun): pure functions on sample
variable sets, no process group."""

import re

import pytest

import flip_scale.distributed as fd
from flip_scale.distributed import expand_hostlist, launched_by_srun, slurm_hostnames, slurm_launch_env, slurm_master_port


@pytest.mark.parametrize("text, expected", [
    ("node01", ["node01"]),
    ("gpu[001-004,007],cpu01", ["gpu001", "gpu002", "gpu003", "gpu004", "gpu007", "cpu01"]),
    ("a[8-11]", ["a8", "a9", "a10", "a11"]),  # padding follows the first bound
    ("a[08-11]", ["a08", "a09", "a10", "a11"]),
    ("gpu-[1-2]-ib,login", ["gpu-1-ib", "gpu-2-ib", "login"]),  # text after the brackets
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),  # several groups: a product, as scontrol prints
    (" x[3] , y ", ["x3", "y"]),
])
def test_expand_hostlist(text, expected):
    assert expand_hostlist(text) == expected


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("gpu[1-3", "without ']'"),
    ("gpu1-3]", "without '['"),
    ("gpu[3-1]", "a <= b"),
    ("gpu[a-b]", "not a number"),
    ("a,,b", "empty name"),
    ("gpu[[1]]", "nested"),
])
def test_expand_hostlist_refuses_malformed_lists(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        expand_hostlist(text)


def test_slurm_hostnames_falls_back_to_the_parser_without_scontrol(monkeypatch):
    monkeypatch.setattr(fd.shutil, "which", lambda name: None)
    assert slurm_hostnames("gpu[001-002],cpu01") == ["gpu001", "gpu002", "cpu01"]


def test_slurm_hostnames_falls_back_when_scontrol_fails(monkeypatch):
    def failing_run(*args, **kwargs):
        raise fd.subprocess.CalledProcessError(1, args[0])

    monkeypatch.setattr(fd.shutil, "which", lambda name: "/usr/bin/scontrol")
    monkeypatch.setattr(fd.subprocess, "run", failing_run)
    assert slurm_hostnames("n[1-2]") == ["n1", "n2"]


# Variables of rank 9 of a 2-node x 8-task srun step in job 4242 (as srun sets them).
SRUN_TASK = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NODELIST": "gpu[017-018]",
    "SLURM_NODELIST": "gpu[017-018]",
    "SLURM_STEP_NODELIST": "gpu[017-018]",
    "SLURM_NTASKS": "16",
    "SLURM_STEP_NUM_TASKS": "16",
    "SLURM_PROCID": "9",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
    "SLURM_STEP_ID": "0",
}


def test_srun_task_gets_rank_world_local_rank_and_the_first_node_as_master():
    env = slurm_launch_env(SRUN_TASK, hostnames=expand_hostlist)
    assert env == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu017",
                   "MASTER_PORT": str(15000 + 4242 % 10000)}


def test_master_port_and_address_from_the_environment_win():
    env = slurm_launch_env(dict(SRUN_TASK, MASTER_PORT="29511", MASTER_ADDR="10.0.0.7"), hostnames=expand_hostlist)
    assert env["MASTER_PORT"] == "29511" and env["MASTER_ADDR"] == "10.0.0.7"


def test_master_port_is_the_same_for_every_task_of_a_job_and_differs_between_jobs():
    ports = {slurm_master_port({"SLURM_JOB_ID": "123456"}) for _ in range(3)}
    assert ports == {15000 + 3456}
    assert slurm_master_port({"SLURM_JOB_ID": "123457"}) != slurm_master_port({"SLURM_JOB_ID": "123456"})
    assert all(1024 < slurm_master_port({"SLURM_JOB_ID": str(j)}) < 32768 for j in (1, 9999, 10000, 987654321))
    with pytest.raises(ValueError, match="SLURM_JOB_ID"):
        slurm_master_port({})


def test_job_nodelist_is_used_when_the_step_list_is_missing_and_scontrol_output_is_taken_first():
    env = dict(SRUN_TASK)
    del env["SLURM_STEP_NODELIST"]
    seen = []

    def fake_scontrol(nodelist):
        seen.append(nodelist)
        return ["gpu017", "gpu018"]

    assert slurm_launch_env(env, hostnames=fake_scontrol)["MASTER_ADDR"] == "gpu017"
    assert seen == ["gpu[017-018]"]
    del env["SLURM_JOB_NODELIST"]
    assert slurm_launch_env(env, hostnames=expand_hostlist)["MASTER_ADDR"] == "gpu017"  # SLURM_NODELIST


def test_not_an_srun_task():
    # torchrun already set RANK: its variables are used as they are.
    assert slurm_launch_env(dict(SRUN_TASK, RANK="3"), hostnames=expand_hostlist) is None
    assert not launched_by_srun(dict(SRUN_TASK, RANK="3"))
    # The batch script's own shell carries SLURM_PROCID=0 and the job's SLURM_NTASKS but no step id:
    # a python started there without srun is one process, not rank 0 of 16.
    batch_shell = {k: v for k, v in SRUN_TASK.items() if not k.startswith("SLURM_STEP")}
    batch_shell["SLURM_PROCID"] = "0"
    assert slurm_launch_env(batch_shell, hostnames=expand_hostlist) is None
    # Outside Slurm.
    assert slurm_launch_env({}, hostnames=expand_hostlist) is None


def test_one_task_needs_no_rendezvous():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0", "SLURM_STEP_ID": "3"}
    assert slurm_launch_env(env, hostnames=expand_hostlist) == {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}


def test_inconsistent_variables_are_refused_with_the_values():
    with pytest.raises(ValueError, match="SLURM_PROCID=16 is outside 0..15"):
        slurm_launch_env(dict(SRUN_TASK, SLURM_PROCID="16"), hostnames=expand_hostlist)
    with pytest.raises(ValueError, match="not integers"):
        slurm_launch_env(dict(SRUN_TASK, SLURM_LOCALID="x"), hostnames=expand_hostlist)
    env = {k: v for k, v in SRUN_TASK.items() if "NODELIST" not in k}
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        slurm_launch_env(env, hostnames=expand_hostlist)


def test_init_distributed_single_srun_task_sets_torchrun_variables(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "")  # recorded, so that the variables init_distributed sets are undone
        monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    info = fd.init_distributed("cpu")
    assert (info.rank, info.world_size, info.local_rank) == (0, 1, 0)
    assert fd.os.environ["RANK"] == "0" and fd.os.environ["WORLD_SIZE"] == "1"
