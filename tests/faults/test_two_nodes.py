"""slurm/flip_g14.sh on two Slurm nodes (two network namespaces of this machine, see
two_node_slurm.py), and a node that dies.

- `sbatch -N 2 slurm/flip_g14.sh` with FLIP_DEVICE=cpu and the tiny recipe: 2 nodes x 2 tasks, the
  template's layout (tp 2 inside a node, dp_shard 2 across the nodes); the rendezvous is node 1's
  namespace address, which node 2 reaches only over the veth pair. Every logged number equals a
  plain local 4-rank run of the same command (the one-node run of the same layout).
- A silent loss of the ranks' network (their own veth pair, every packet dropped, nothing closed;
  Slurm's network unharmed): every rank of both nodes exits 1 within the collective timeout, each
  naming its step; srun returns, the template requeues the job itself (its requeue path, which a
  node death never reaches: see docs/design.md), and with the network back it resumes to the
  same losses. The seconds from the loss to the last rank's exit are printed.
- The same job, node 2 killed mid-run (its slurmd, step daemon and both ranks, SIGKILL): the ranks
  of node 1 exit, the job fails and is requeued (by Slurm on the node failure, or by the template
  after the trainer's failure; the test says which), node 2's slurmd is started again, and the
  requeued job resumes from `latest` to the same losses as the uninterrupted run. The seconds from
  the death to the survivors' exit and to the job's failure are printed.

Skipped, with the reason, only where Slurm cannot be installed or the kernel refuses network
namespaces (as tests/test_slurm.py's fixture)."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import pytest
from fault_runs import Ranks, logged_steps
from two_node_slurm import ADDRESSES, DATA_ADDRESSES, DATA_INTERFACE, INTERFACE, NODES, TwoNodeSlurm, namespaces_refused

from flip_scale.metrics import read_jsonl
from test_slurm import EXACT_KEYS, G14_LAYOUT, running_cluster

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent.parent
STEPS = 6
EVERY = 2  # checkpoint every 2 steps: the node dies after step 3, the job resumes from step 2
JOB = ["-N", "2", "--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0", "--time=15"]
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")


def _overrides(data_dir: Path) -> list[str]:
    return [
        f"data.synthetic_dir={data_dir}", f"data.train_shards={data_dir}/train-{{000000..000007}}.tar",
        f"data.tokenizer={data_dir}/tokenizer.model", f"train.max_steps={STEPS}", "train.global_batch_size=16",
        "train.log_every_steps=1", f"checkpoint.every_steps={EVERY}", "checkpoint.keep_last=0", "eval.at_end=false",
        "logging.tensorboard=false", "data.num_workers=0",
    ]


def _job_env(data_dir: Path, *extra: str, data_network: bool = False) -> dict:
    master, interface = (DATA_ADDRESSES[0], DATA_INTERFACE) if data_network else (ADDRESSES[0], INTERFACE)
    return {
        "FLIP_HOME": str(REPO), "FLIP_CONFIG": "configs/tiny.yaml", "FLIP_DEVICE": "cpu", "FLIP_PYTHON": sys.executable,
        "FLIP_ARGS": " ".join([*_overrides(data_dir), *extra]), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
        # The node names do not resolve; rank 0 is on node 1. Gloo binds to the address of the host
        # name (127.0.0.1 here) unless told the interface.
        "MASTER_ADDR": master, "GLOO_SOCKET_IFNAME": interface,
    }


def _by_step(records: list[dict]) -> dict[int, dict]:
    """step -> the numbers that must repeat exactly (a resumed run's line replaces the earlier one)."""
    return {r["step"]: {k: r[k] for k in EXACT_KEYS} for r in records}


@pytest.fixture(scope="module")
def two_nodes():
    yield from running_cluster(TwoNodeSlurm, "flip-twonode-", namespaces_refused)


@pytest.fixture(scope="module")
def one_node(two_nodes, synthetic_dir, tmp_path_factory) -> dict[int, dict]:
    """The command the template runs (recipe, layout, overrides), as 4 local ranks without Slurm."""
    run_dir = tmp_path_factory.mktemp("one_node") / "run"
    ranks = Ranks(run_dir, ["--config", str(REPO / "configs" / "tiny.yaml"), "--resume", "auto", "train.device=cpu",
                            *G14_LAYOUT, *_overrides(synthetic_dir)], world=4)
    assert ranks.wait(300) == [0] * 4, ranks.output()[-4000:]
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    return _by_step(records)


def test_g14_template_on_two_nodes_equals_the_one_node_run(two_nodes, one_node, synthetic_dir, tmp_path):
    job = two_nodes.sbatch([*JOB, "--job-name=two-a", str(REPO / "slurm" / "flip_g14.sh")], _job_env(synthetic_dir),
                           cwd=tmp_path)
    log = tmp_path / f"two-a-{job}.out"
    ranks_seen = {node: 0 for node in NODES}
    deadline = time.time() + 300
    while (info := two_nodes.job(job)).get("JobState") not in DONE:
        assert time.time() < deadline, f"job {job} not done in 300 s\n{log.read_text()[-4000:]}\n{two_nodes.logs()}"
        for node in NODES:
            ranks_seen[node] = max(ranks_seen[node], len(two_nodes.trainer_pids(node)))
        time.sleep(0.3)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{text[-4000:]}"
    assert ranks_seen == {NODES[0]: 2, NODES[1]: 2}  # two ranks in each namespace
    assert "nodes flipn[1-2] (2) x 2 processes = 4 ranks, device cpu" in text
    assert "layout: 4 ranks = pp 1 x dp_replicate 1 x dp_shard 2 x tp 2" in text
    run_dir = tmp_path / "runs" / "two-a"
    assert (run_dir / "latest").read_text().strip() == f"step_{STEPS:08d}"
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert _by_step(records) == one_node


def test_a_node_that_dies_fails_the_job_which_is_requeued_and_resumes(two_nodes, one_node, synthetic_dir, tmp_path):
    env = _job_env(synthetic_dir, "train.collective_timeout_seconds=10")
    job = two_nodes.sbatch([*JOB, "--job-name=two-b", str(REPO / "slurm" / "flip_g14.sh")], env, cwd=tmp_path)
    log = tmp_path / f"two-b-{job}.out"
    run_dir = tmp_path / "runs" / "two-b"
    deadline = time.time() + 240
    while not ((run_dir / "latest").is_file() and logged_steps(run_dir) >= EVERY + 1):
        assert time.time() < deadline and two_nodes.job(job).get("JobState") not in DONE, (
            f"no checkpoint and step {EVERY + 1}\n{log.read_text()[-4000:] if log.exists() else ''}")
        time.sleep(0.1)
    resume_from = (run_dir / "latest").read_text().strip()
    steps_before = logged_steps(run_dir)
    victims = two_nodes.trainer_pids(NODES[1])
    assert len(victims) == 2 and len(two_nodes.trainer_pids(NODES[0])) == 2
    killed = two_nodes.kill_node(NODES[1])
    died = time.monotonic()
    assert set(victims) <= set(killed)

    ranks_gone = job_failed = None
    deadline = died + 180
    while job_failed is None or ranks_gone is None:
        assert time.monotonic() < deadline, f"job {job} still {two_nodes.job(job).get('JobState')}\n{two_nodes.logs()}"
        if ranks_gone is None and not two_nodes.trainer_pids(NODES[0]):
            ranks_gone = time.monotonic() - died
        if job_failed is None and two_nodes.job(job).get("JobState") != "RUNNING":
            job_failed = time.monotonic() - died
        time.sleep(0.1)
    info = two_nodes.wait_for(job, lambda i: i.get("Restarts") == "1" and i.get("JobState") == "PENDING", 120,
                              "the requeue", log)
    by_slurm = f"requeue job JobId={job} due to failure of node {NODES[1]}" in two_nodes.ctld_log()
    by_template = f"requeueing job {job} (failed with exit code" in log.read_text()
    assert by_slurm or by_template, f"{info}\n{log.read_text()[-4000:]}\n{two_nodes.logs()}"
    path = "Slurm (node failure)" if by_slurm else "the template (the trainer's failure)"

    # The node comes back; the requeued job's begin time (two minutes on) is brought forward once
    # both nodes are idle (a relaunch within a second of the requeue is refused, see test_slurm.py).
    two_nodes.start_node(NODES[1])
    deadline = time.time() + 60
    while set(two_nodes.run(["sinfo", "-h", "-N", "-o", "%T"], check=False).stdout.split()) != {"idle"}:
        assert time.time() < deadline, two_nodes.logs()
        time.sleep(0.5)
    time.sleep(3)
    two_nodes.run(["scontrol", "update", f"JobId={job}", "StartTime=now"])
    info = two_nodes.wait_for(job, lambda i: i.get("JobState") in DONE, 300, "the end after the requeue", log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0" and info["Restarts"] == "1", (
        f"{info}\n{text[-5000:]}\n{two_nodes.logs()}")
    if by_slurm:  # the restarted job counts Slurm's restart under FLIP_MAX_REQUEUES
        assert f"restart 1 of job {job} was not requested by the batch script" in text
    else:
        assert f"restart 1 of job {job} follows its own requeue" in text
    resumed_at = int(resume_from.split("_")[1])
    assert f"resumed from runs/two-b/{resume_from} at step {resumed_at}" in text
    assert (run_dir / "latest").read_text().strip() == f"step_{STEPS:08d}"
    records = read_jsonl(run_dir / "metrics.jsonl")
    steps = [r["step"] for r in records]
    assert sorted(set(steps)) == list(range(1, STEPS + 1)) and steps[-1] == STEPS
    assert _by_step(records) == one_node  # the steps re-run after the resume, and all others
    print(f"\ntwo nodes: {NODES[1]} killed after step {steps_before} ({len(killed)} processes); node {NODES[0]}'s "
          f"ranks exited {ranks_gone:.1f} s later, the job failed "
          f"{job_failed:.1f} s later (SlurmdTimeout=6); requeued by {path}; resumed from {resume_from}; "
          f"{STEPS} steps with the losses of the one-node run")


def _wait_for_checkpoint_and_step(two_nodes, job, run_dir: Path, log: Path) -> None:
    deadline = time.time() + 240
    while not ((run_dir / "latest").is_file() and logged_steps(run_dir) >= EVERY + 1):
        assert time.time() < deadline and two_nodes.job(job).get("JobState") not in DONE, (
            f"no checkpoint and step {EVERY + 1}\n{log.read_text()[-4000:] if log.exists() else ''}")
        time.sleep(0.1)


def test_a_silent_network_loss_stops_every_rank_and_the_template_requeues(two_nodes, one_node, synthetic_dir,
                                                                          tmp_path):
    timeout = 10
    env = _job_env(synthetic_dir, f"train.collective_timeout_seconds={timeout}", data_network=True)
    job = two_nodes.sbatch([*JOB, "--job-name=two-c", str(REPO / "slurm" / "flip_g14.sh")], env, cwd=tmp_path)
    log = tmp_path / f"two-c-{job}.out"
    run_dir = tmp_path / "runs" / "two-c"
    try:
        _wait_for_checkpoint_and_step(two_nodes, job, run_dir, log)
        resume_from = (run_dir / "latest").read_text().strip()
        assert all(len(two_nodes.trainer_pids(node)) == 2 for node in NODES)
        two_nodes.drop_data()
        lost = time.monotonic()
        ranks_gone = None
        while ranks_gone is None:
            assert time.monotonic() < lost + 120, f"ranks still alive 120 s after the loss\n{log.read_text()[-4000:]}"
            if not any(two_nodes.trainer_pids(node) for node in NODES):
                ranks_gone = time.monotonic() - lost
            time.sleep(0.1)
        two_nodes.wait_for(job, lambda i: i.get("Restarts") == "1" and i.get("JobState") == "PENDING", 120,
                           "the template's requeue", log)
    finally:
        two_nodes.drop_data(False)
    text = log.read_text()
    failed_at = {int(r): int(s) for r, s in re.findall(r"rank (\d) at step (\d+) \(", text)}
    assert sorted(failed_at) == [0, 1, 2, 3], text[-5000:]  # every rank named where it stopped
    assert all(s > EVERY for s in failed_at.values()), failed_at
    exits = re.findall(r"srun: error: (flipn\d): tasks? ([\d-]+): (.*)", text)
    assert {node for node, _, _ in exits} == set(NODES) and all(e == "Exited with exit code 1" for *_, e in exits), exits
    assert f"requeueing job {job} (failed with exit code 1;" in text, text[-4000:]
    assert f"requeue job JobId={job} due to failure of node" not in two_nodes.ctld_log()  # not Slurm's requeue
    # The requeued job's begin time is brought forward once the nodes are idle (see the test above).
    deadline = time.time() + 60
    while set(two_nodes.run(["sinfo", "-h", "-N", "-o", "%T"], check=False).stdout.split()) != {"idle"}:
        assert time.time() < deadline, two_nodes.logs()
        time.sleep(0.5)
    time.sleep(3)
    two_nodes.run(["scontrol", "update", f"JobId={job}", "StartTime=now"])
    info = two_nodes.wait_for(job, lambda i: i.get("JobState") in DONE, 300, "the end after the requeue", log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{text[-5000:]}"
    assert f"restart 1 of job {job} follows its own requeue" in text
    assert f"resumed from runs/two-c/{resume_from}" in text
    assert _by_step(read_jsonl(run_dir / "metrics.jsonl")) == one_node
    print(f"\ntwo nodes, data network silenced after step {min(failed_at.values()) - 1}: every rank exited "
          f"{ranks_gone:.1f} s later (train.collective_timeout_seconds={timeout}); ranks stopped at {failed_at}; "
          f"requeued by the template; resumed from {resume_from}")
