"""Process-group start-up from the launcher's variables: torchrun's (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) or, for one process per GPU started by `srun` directly, Slurm's
(SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, the node list, the job id)."""

from __future__ import annotations

import datetime
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch
import torch.distributed as dist

from .runtime import set_host_group

log = logging.getLogger("flip_scale.distributed")


@dataclass(frozen=True)
class ProcessInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(setting: str, local_rank: int) -> torch.device:
    if setting == "cpu":
        return torch.device("cpu")
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


# ----------------------------------------------------------------------------- Slurm (srun without torchrun)
_HOST_GROUP = re.compile(r"\[([^\[\]]*)\]")


def expand_hostlist(text: str) -> list[str]:
    """Expand a Slurm host list without scontrol: `gpu[001-004,007],cpu01` -> gpu001 .. gpu004,
    gpu007, cpu01. Zero padding is kept; several bracket groups in one name expand as a product
    (`r[1-2]n[1-2]` -> r1n1 r1n2 r2n1 r2n2)."""
    text = text.strip()
    if not text:
        raise ValueError("empty Slurm host list")
    names, depth, start = [], 0, 0
    for i, char in enumerate(text + ","):
        if char == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"Slurm host list {text!r}: nested '['")
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"Slurm host list {text!r}: ']' without '['")
        elif char == "," and depth == 0:
            token = text[start:i].strip()
            if not token:
                raise ValueError(f"Slurm host list {text!r}: empty name between commas")
            names.extend(_expand_host(token, text))
            start = i + 1
    if depth != 0:
        raise ValueError(f"Slurm host list {text!r}: '[' without ']'")
    return names


def _expand_host(token: str, whole: str) -> list[str]:
    match = _HOST_GROUP.search(token)
    if match is None:
        if "[" in token or "]" in token:
            raise ValueError(f"Slurm host list {whole!r}: unbalanced brackets in {token!r}")
        return [token]
    prefix, suffix = token[: match.start()], token[match.end():]
    values = []
    for part in match.group(1).split(","):
        part = part.strip()
        bounds = part.split("-")
        if len(bounds) == 1 and bounds[0].isdigit():
            values.append(bounds[0])
        elif len(bounds) == 2 and bounds[0].isdigit() and bounds[1].isdigit() and int(bounds[0]) <= int(bounds[1]):
            width = len(bounds[0])
            values.extend(str(n).zfill(width) for n in range(int(bounds[0]), int(bounds[1]) + 1))
        else:
            raise ValueError(f"Slurm host list {whole!r}: {part!r} is not a number or a range a-b with a <= b")
    return [name for value in values for name in _expand_host(prefix + value + suffix, whole)]


def slurm_hostnames(nodelist: str) -> list[str]:
    """`scontrol show hostnames NODELIST` where scontrol runs; else the parser above."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=60, check=True).stdout.split()
            if out:
                return out
        except (OSError, subprocess.SubprocessError):
            pass
    return expand_hostlist(nodelist)


def slurm_master_port(env: Mapping[str, str]) -> int:
    """MASTER_PORT if set, else 15000 + job id mod 10000 (the same on every node of one job)."""
    if env.get("MASTER_PORT"):
        return int(env["MASTER_PORT"])
    job = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not job or not job.isdigit():
        raise ValueError(f"cannot derive MASTER_PORT: SLURM_JOB_ID is {job!r}; set MASTER_PORT")
    return 15000 + int(job) % 10000


def launched_by_srun(env: Mapping[str, str]) -> bool:
    """A task of an srun step that no torchrun stands between: SLURM_PROCID, SLURM_NTASKS and
    SLURM_LOCALID set, RANK unset. SLURM_STEP_ID is required too: a batch script's own shell (and a
    python started from it without srun) also carries SLURM_PROCID=0 and the job's SLURM_NTASKS."""
    return (
        "RANK" not in env
        and all(env.get(key) not in (None, "") for key in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"))
        and env.get("SLURM_STEP_ID", env.get("SLURM_STEPID")) not in (None, "")
    )


def slurm_launch_env(env: Mapping[str, str],
                     hostnames: Callable[[str], list] = slurm_hostnames) -> Optional[dict]:
    """torchrun's variables derived from an srun task's Slurm variables (None: not such a task).

    RANK = SLURM_PROCID, WORLD_SIZE = SLURM_STEP_NUM_TASKS (else SLURM_NTASKS), LOCAL_RANK =
    SLURM_LOCALID, MASTER_ADDR = MASTER_ADDR or the first host of SLURM_STEP_NODELIST /
    SLURM_JOB_NODELIST / SLURM_NODELIST (block distribution puts rank 0 there), MASTER_PORT =
    MASTER_PORT or derived from the job id."""
    if not launched_by_srun(env):
        return None
    try:
        rank, local_rank = int(env["SLURM_PROCID"]), int(env["SLURM_LOCALID"])
        world = int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"])
    except ValueError as error:
        raise ValueError(f"Slurm task variables are not integers: {error}") from None
    if not 0 <= rank < world:
        raise ValueError(f"SLURM_PROCID={rank} is outside 0..{world - 1} (SLURM_NTASKS={world})")
    result = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank)}
    if world == 1:
        return result
    master = env.get("MASTER_ADDR")
    if not master:
        nodelist = next((env[k] for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") if env.get(k)), None)
        if nodelist is None:
            raise ValueError("srun task without SLURM_JOB_NODELIST / SLURM_NODELIST: set MASTER_ADDR")
        master = hostnames(nodelist)[0]
    result["MASTER_ADDR"] = master
    result["MASTER_PORT"] = str(slurm_master_port(env))
    return result


def needs_cpu_collectives(parallel_cfg) -> bool:
    """Whether collectives on CPU tensors happen beside the GPU's: FSDP2's CPU offload keeps the
    gradient shards in host memory, and their norm is all-reduced where they are."""
    return getattr(parallel_cfg, "engine", "fsdp") == "fsdp" and bool(getattr(parallel_cfg, "cpu_offload", False))


def process_group_backend(device_type: str, cpu_collectives: bool = False) -> str:
    """gloo on CPU; NCCL on CUDA, with gloo beside it for CPU tensors when `cpu_collectives`
    (NCCL takes CUDA tensors only). Every group made from the default one (new_group, each axis of
    the DeviceMesh) inherits both."""
    if device_type != "cuda":
        return "gloo"
    return "cpu:gloo,cuda:nccl" if cpu_collectives else "nccl"


def init_distributed(device_setting: str = "auto", timeout_minutes: int = 30,
                     cpu_collectives: bool = False) -> ProcessInfo:
    """Join the process group when launched with WORLD_SIZE > 1 (torchrun, or srun one task per
    GPU: Slurm's variables are translated first); else one process. `cpu_collectives`
    (`needs_cpu_collectives(cfg.parallel)`): see `process_group_backend`."""
    slurm = slurm_launch_env(os.environ)
    if slurm is not None:
        os.environ.update(slurm)
        if int(slurm["WORLD_SIZE"]) > 1 and slurm["RANK"] == "0":
            log.info("srun task: rank/world from SLURM_PROCID/SLURM_NTASKS, rendezvous at %s:%s",
                     slurm["MASTER_ADDR"], slurm["MASTER_PORT"])
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_setting, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        backend = process_group_backend(device.type, cpu_collectives)
        # The device is bound (eager NCCL init, the mesh's groups split from it) only for plain NCCL;
        # with a gloo half beside it the groups are made by new_group, as a precaution that every
        # group keeps both halves (split_group in 2.14 inherits them, but nothing here relies on it).
        bind = device.type == "cuda" and backend == "nccl"
        timeout = datetime.timedelta(minutes=timeout_minutes)
        dist.init_process_group(backend=backend, timeout=timeout, device_id=device if bind else None)
        # Host-side agreements (runtime.any_rank: the preemption check after every step) run on CPU
        # tensors: over a gloo group of all ranks beside plain NCCL, else over the default group's
        # own gloo half. They sync the hosts, not the GPU's queue.
        set_host_group(dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else dist.group.WORLD)
        log.info("rank %d/%d joined the %s process group", rank, world_size, backend)
    return ProcessInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        set_host_group(None)
        dist.destroy_process_group()
