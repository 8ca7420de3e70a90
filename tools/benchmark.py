#!/usr/bin/env python
"""Throughput, peak memory and communication per training step, for parallel layouts.

Runs the real training step (`flip_scale.train.Trainer.train_step`: forward/backward with the
exact feature cache, clipping, AdamW) on random tensors, so data loading is not measured.
A script that prints numbers, never a test. Record results in BENCHMARKS.md.

Two modes. The layout sweep (--model/--layouts) runs each layout in its own processes and prints a
table. `--config FILE [key=value ...]` (a recipe and overrides, as flip-train takes them) measures
that run in this process (or in each rank, under torchrun): images/s, the median step and its
spread, TFLOP/s per rank and MFU, peak memory, and a split of one extra step into forward /
backward / optimizer / communication; `--json` makes the last line one JSON object of those.
`--compare-openclip` also builds the same architecture in OpenCLIP (its PatchDropout at the same
mask ratio, ClipLoss, AdamW) and steps both on the same batches, in turn, in this process;
`--separate-processes R` runs each side in a process of its own instead, R alternating rounds
(in one process the two share the heap and the allocator's state, which moves each by a few %).

examples:
  python tools/benchmark.py                                   # tiny model, a sweep of CPU layouts
  python tools/benchmark.py --model B/16 --layouts 1 dp_shard=2 tp=2 --batch 8 --steps 3
  python tools/benchmark.py --model B/16 --device cuda --batch 256 --precision bf16 --layouts 1
  torchrun --nproc_per_node 8 tools/benchmark.py --model G/14 --layouts tp=2,dp_shard=4 --worker
  python tools/benchmark.py --config configs/flip_b16.yaml train.global_batch_size=16 model.mask_ratio=0.75 \
      train.precision=fp32 --threads 2 --steps 5 --warmup 1 --compare-openclip --json
  python tools/benchmark.py --config configs/flip_h14.yaml train.global_batch_size=64 parallel.compile=true \
      --compile-openclip --compare-openclip --json          # each at its best: compiled blocks / torch.compile
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(1, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from benchmark_openclip import (  # noqa: E402
    OpenClipStepper, interleave, peak_memory_bytes, peak_tflops, refuse_for_openclip, summary, sync)

DEFAULT_LAYOUTS = ["1", "dp_shard=2", "dp_shard=4", "tp=2", "dp_shard=2,tp=2", "dp_replicate=2,dp_shard=2",
                   "pp=2", "pp=2,dp_shard=2"]


def layout_overrides(layout: str) -> list[str]:
    """'dp_shard=2,tp=2' -> ['parallel.dp_shard=2', 'parallel.tp=2']; '1' = one process."""
    if layout in ("1", ""):
        return []
    return [f"parallel.{item.strip()}" for item in layout.split(",") if item.strip()]


def layout_world_size(layout: str) -> int:
    size = 1
    for item in layout_overrides(layout):
        key, value = item.split("=")
        if key.split(".")[1] in ("dp_shard", "dp_replicate", "tp", "pp"):
            size *= int(value)
    return size


class CommCounter(TorchDispatchMode):
    """Bytes of the collectives this rank takes part in per step, counted at the dispatcher, so
    FSDP2, DTensor (tensor parallel), the loss gather and pipeline send/recv are all seen: for each
    c10d op, the size of its largest tensor argument (the full buffer of an all-gather or
    reduce-scatter, the tensor of an all-reduce or a send)."""

    NAMESPACES = ("c10d", "_c10d_functional", "c10d_functional", "_dtensor")

    def __init__(self, device: torch.device | None = None):
        super().__init__()
        self.bytes = 0
        self.calls = 0
        self.seconds = 0.0  # time inside the collectives' calls and waits (synchronised on CUDA)
        self.device = device

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace in self.NAMESPACES[:3]:
            largest = 0
            for value in list(args) + list(kwargs.values()):
                for tensor in value if isinstance(value, (list, tuple)) else [value]:
                    for item in tensor if isinstance(tensor, (list, tuple)) else [tensor]:
                        if isinstance(item, torch.Tensor):
                            largest = max(largest, item.numel() * item.element_size())
            self.bytes += largest
            self.calls += 1
            sync(self.device)
            started = time.perf_counter()
            out = func(*args, **kwargs)
            sync(self.device)
            self.seconds += time.perf_counter() - started
            return out
        return func(*args, **kwargs)


def microbatches(args) -> int:
    """--microbatches, or by default 2 per pipeline stage (1 without pp: no micro-batching)."""
    if args.microbatches:
        return args.microbatches
    pp = next((int(item.split("=")[1]) for item in layout_overrides(args.layout) if item.startswith("parallel.pp=")), 1)
    return 2 * pp if pp > 1 else 1


def state_bytes(engine) -> int:
    """Bytes of the weights and optimizer state this rank holds (its shards where sharded): the
    parameters, plus AdamW's moments (and, under DeepSpeed, its fp32 master partition)."""
    from flip_scale.parallel.utils import optimizer_state_bytes

    params = list(engine.parameters())
    weights = engine.local_parameter_count() * (params[0].element_size() if params else 4)
    if hasattr(engine, "optimizer_state_bytes"):  # DeepSpeed: master partition + moments
        return weights + engine.optimizer_state_bytes()
    return weights + sum(optimizer_state_bytes(o) for o in engine.optimizers.optimizers)


def worker(args) -> dict:
    """One rank of one layout (run under torchrun, or alone for a one-process layout)."""
    from flip_scale.config import load_config
    from flip_scale.distributed import init_distributed, needs_cpu_collectives, shutdown
    from flip_scale.runtime import setup_logging
    from flip_scale.train import Trainer

    overrides = [
        f"model.name={args.model}", f"train.global_batch_size={args.batch}", f"train.max_steps={args.steps + args.warmup}",
        f"model.mask_ratio={args.mask_ratio}", f"train.device={args.device}", f"train.precision={args.precision}",
        f"parallel.activation_checkpointing={args.ac}", "schedule.warmup_steps=0", "logging.tensorboard=false",
        f"optim.grad_accum_steps={args.grad_accum}", f"parallel.compile={str(args.compile).lower()}",
        *layout_overrides(args.layout),
    ] + [f"parallel.microbatches={microbatches(args)}"] + (["model.vocab_size=512"] if args.model == "tiny" else [])
    cfg = load_config(None, overrides)
    proc = init_distributed(cfg.train.device, cpu_collectives=needs_cpu_collectives(cfg.parallel))
    setup_logging(proc.rank if args.verbose else 1)
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            trainer = Trainer(cfg, Path(run_dir), proc, with_data=False)
            arch = trainer.arch
            generator = torch.Generator().manual_seed(proc.rank)
            local = trainer.local_batch

            def batch():
                return {
                    "images": torch.randn(local, 3, arch.image_size, arch.image_size, generator=generator),
                    "tokens": torch.randint(4, arch.vocab_size, (local, arch.context_length), generator=generator),
                }

            cuda = trainer.device.type == "cuda"
            for _ in range(args.warmup):
                trainer.train_step(batch())
                trainer.state.step += 1
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            batches = [batch() for _ in range(args.steps)]
            started = time.perf_counter()
            for b in batches:
                trainer.train_step(b)
                trainer.state.step += 1
            if cuda:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - started
            # Communication is counted on one more step, outside the timed ones (the counter costs time).
            with CommCounter(trainer.device) as comm:
                trainer.train_step(batch())
            peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            state = state_bytes(trainer.engine)
            result = {
                "layout": args.layout, "model": args.model, "rank": proc.rank, "world": proc.world_size,
                "images_per_s": args.batch * args.steps / elapsed,
                "step_s": elapsed / args.steps,
                "peak_mem_gib": peak / 2**30,
                "peak_mem_kind": "cuda allocated" if cuda else "process RSS",
                "comm_mb_per_step": comm.bytes / 1e6,
                "state_mib": state / 2**20,
                "tflops_per_s_per_rank": trainer.train_flops_per_sample * args.batch * args.steps / elapsed / proc.world_size / 1e12,
            }
            # One line from rank 0 with every rank's figures (ranks printing at once interleave).
            results = [result]
            if proc.world_size > 1:
                import torch.distributed as dist

                results = [None] * proc.world_size
                dist.all_gather_object(results, result)
            if proc.rank == 0:
                print("RESULT " + json.dumps(results), flush=True)
            return result
    finally:
        shutdown()


def launch(args, layout: str) -> list[dict]:
    world = layout_world_size(layout)
    cmd = [sys.executable]
    if world > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
    cmd += [__file__, "--worker", "--layout", layout, "--model", args.model, "--batch", str(args.batch),
            "--steps", str(args.steps), "--warmup", str(args.warmup), "--mask-ratio", str(args.mask_ratio),
            "--device", args.device, "--precision", args.precision, "--ac", args.ac, "--grad-accum", str(args.grad_accum),
            "--microbatches", str(args.microbatches)] + (["--compile"] if args.compile else [])
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    results = [r for line in proc.stdout.splitlines() if line.startswith("RESULT ") for r in json.loads(line[7:])]
    if proc.returncode != 0 or not results:
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        # The exception line of a rank says why; torchrun's own summary after it does not.
        errors = list(dict.fromkeys(line.split("]:", 1)[-1].strip() for line in lines if "Error:" in line))
        print(f"{layout:>28}: failed (exit code {proc.returncode})\n    " + "\n    ".join(errors[-3:] or lines[-8:]))
    return results


def summarize(layout: str, results: list[dict]) -> str:
    ips = results[0]["images_per_s"]
    peak = max(r["peak_mem_gib"] for r in results)
    comm = max(r["comm_mb_per_step"] for r in results)
    tflops = sum(r["tflops_per_s_per_rank"] for r in results) / len(results)
    state = max(r.get("state_mib", 0.0) for r in results)
    return (f"{layout:>28} | {len(results):>5} | {ips:>10.1f} | {results[0]['step_s']:>8.3f} | {peak:>9.2f} | "
            f"{state:>11.1f} | {comm:>11.1f} | {tflops:>8.4f}")


def split_step(trainer, batch: dict) -> dict:
    """One more step, cut into forward (the model parts' forward calls), backward (the rest of
    forward + backward: loss and gradients), optimizer (clipping, AdamW) and communication (time in
    collectives, which overlaps the others), each synchronised on CUDA. Slower than a plain step."""
    device, engine = trainer.device, trainer.engine
    spent = {"forward": 0.0, "forward_backward": 0.0, "optimizer": 0.0}
    starts = []

    def pre(module, args):
        sync(device)
        starts.append(time.perf_counter())

    def post(module, args, output):
        sync(device)
        spent["forward"] += time.perf_counter() - starts.pop()

    def clocked(name, fn):
        def wrapper(*a, **k):
            sync(device)
            started = time.perf_counter()
            out = fn(*a, **k)
            sync(device)
            spent[name] += time.perf_counter() - started
            return out
        return wrapper

    handles = [h for part in trainer.model_parts
               for h in (part.register_forward_pre_hook(pre), part.register_forward_hook(post))]
    engine.forward_backward = clocked("forward_backward", engine.forward_backward)
    engine.clip_and_step = clocked("optimizer", engine.clip_and_step)
    try:
        with CommCounter(device) as comm:
            trainer.train_step(batch)
            trainer.state.step += 1
    finally:
        del engine.forward_backward, engine.clip_and_step  # the instance attributes: back to the methods
        for handle in handles:
            handle.remove()
    return {"forward_s": spent["forward"], "backward_s": max(0.0, spent["forward_backward"] - spent["forward"]),
            "optimizer_s": spent["optimizer"], "communication_s": comm.seconds, "comm_bytes": comm.bytes}


def run_config(args) -> dict:
    """--config mode: measure the configured run in this process (each rank under torchrun)."""
    from flip_scale.config import load_config
    from flip_scale.distributed import init_distributed, needs_cpu_collectives, shutdown
    from flip_scale.runtime import setup_logging
    from flip_scale.train import Trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = list(args.overrides) + ["logging.tensorboard=false"]
    cfg = load_config(args.config, overrides)
    if cfg.train.max_steps < args.steps + args.warmup + 1:
        cfg = load_config(args.config, overrides + [f"train.max_steps={args.steps + args.warmup + 1}"])
    proc = init_distributed(cfg.train.device, cpu_collectives=needs_cpu_collectives(cfg.parallel))
    setup_logging(proc.rank if args.verbose else 1)
    side = getattr(args, "side", "both")  # callers that build the arguments (gpu_check) may leave it out
    try:
        if args.compare_openclip or side == "openclip":
            refuse_for_openclip(cfg, proc.world_size)
        if side == "openclip":
            return openclip_only(args, cfg, proc)
        # What the process holds on the GPU before this run (another run's leftovers, in gpu_check).
        baseline = int(torch.cuda.memory_allocated()) if proc.device.type == "cuda" else 0
        with tempfile.TemporaryDirectory() as run_dir:
            trainer = Trainer(cfg, Path(run_dir), proc, with_data=False)
            arch, device, local = trainer.arch, trainer.device, trainer.local_batch
            batches = random_batches(arch, local, args.steps, proc.rank, device)

            def ours(batch):
                trainer.train_step(batch)
                trainer.state.step += 1

            for index in range(args.warmup):
                ours(batches[index % len(batches)])
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            split = split_step(trainer, batches[0])
            steppers = {"ours": ours}
            result_peak = peak_memory_bytes(device)  # before OpenCLIP's model exists
            if args.compare_openclip and side == "both":
                openclip = OpenClipStepper(cfg, device, trainer.precision, compile_model=args.compile_openclip)
                for index in range(args.warmup):
                    openclip.step(batches[index % len(batches)])
                steppers["openclip"] = openclip.step
            times = interleave(steppers, batches, device)
            peak, source = peak_tflops(args.peak_tflops, device, trainer.precision)
            mine = summary(times["ours"], cfg.train.global_batch_size)
            tflops = trainer.train_flops_per_sample * mine["images_per_s"] / proc.world_size / 1e12
            result = {
                "config": args.config, "model": cfg.model.name, "mask_ratio": cfg.model.mask_ratio,
                "global_batch": cfg.train.global_batch_size, "device": device.type, "precision": trainer.precision,
                "world_size": proc.world_size, "threads": torch.get_num_threads(),
                "compiled_blocks": bool(cfg.parallel.compile), "steps": args.steps, "warmup": args.warmup,
                **mine, "tflops_per_s_per_rank": tflops, "peak_tflops": peak, "peak_tflops_source": source,
                "mfu": tflops / peak, "peak_mem_bytes": result_peak, "mem_baseline_bytes": baseline,
                "peak_mem_kind": "cuda allocated" if device.type == "cuda" else "process peak RSS",
                **split, "step_times": times["ours"],
            }
            if "openclip" in times:
                theirs = summary(times["openclip"], cfg.train.global_batch_size)
                result.update({"openclip_images_per_s": theirs["images_per_s"], "openclip_step_s": theirs["step_s"],
                               "openclip_step_s_min": theirs["step_s_min"], "openclip_step_s_max": theirs["step_s_max"],
                               "openclip_compiled": bool(args.compile_openclip),
                               "ratio": mine["images_per_s"] / theirs["images_per_s"]})
            if proc.world_size > 1:  # every rank's peak and the slowest rank's step
                import torch.distributed as dist

                results = [None] * proc.world_size
                dist.all_gather_object(results, result)
                result["peak_mem_bytes"] = max(r["peak_mem_bytes"] for r in results)
            if proc.rank == 0:
                print_result(result, args.json)
            return result
    finally:
        shutdown()


def random_batches(arch, local: int, steps: int, rank: int, device: torch.device) -> list[dict]:
    generator = torch.Generator().manual_seed(rank)
    batches = [{"images": torch.randn(local, 3, arch.image_size, arch.image_size, generator=generator),
                "tokens": torch.randint(4, arch.vocab_size, (local, arch.context_length), generator=generator)}
               for _ in range(steps)]
    if device.type == "cuda":  # as the loader's batches are: the copy to the GPU does not stall the host
        batches = [{name: tensor.pin_memory() for name, tensor in b.items()} for b in batches]
    return batches


def openclip_only(args, cfg, proc) -> dict:
    """--side openclip: OpenCLIP alone in this process (no model of ours beside it), same batches."""
    from flip_scale.preflight import plan_run
    from flip_scale.runtime import resolve_precision

    plan = plan_run(cfg, proc.world_size)
    precision = resolve_precision(cfg, proc.device)
    batches = random_batches(plan.arch, plan.local_batch, args.steps, proc.rank, proc.device)
    openclip = OpenClipStepper(cfg, proc.device, precision, compile_model=args.compile_openclip)
    for index in range(args.warmup):
        openclip.step(batches[index % len(batches)])
    times = interleave({"openclip": openclip.step}, batches, proc.device)["openclip"]
    theirs = summary(times, cfg.train.global_batch_size)
    result = {"config": args.config, "model": cfg.model.name, "mask_ratio": cfg.model.mask_ratio, "side": "openclip",
              "openclip_images_per_s": theirs["images_per_s"], "openclip_step_s": theirs["step_s"],
              "openclip_step_times": times, "openclip_compiled": bool(args.compile_openclip)}
    print(json.dumps(result), flush=True)
    return result


def separate_processes(args) -> dict:
    """--separate-processes R: ours and OpenCLIP each in a process of its own, alternating R rounds
    (the side that starts alternates too), each child its warm-up then --steps timed steps; the
    medians over every timed step of each side. In one process the two trainers share the heap, the
    page cache and the allocator's state, which moves each one's step by several percent."""
    command = [sys.executable, __file__, "--config", args.config, *args.overrides, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--json"] + (["--threads", str(args.threads)] if args.threads else [])
    command += ["--compile-openclip"] if args.compile_openclip else []
    if args.peak_tflops:
        command += ["--peak-tflops", str(args.peak_tflops)]
    from flip_scale.config import load_config

    refuse_for_openclip(load_config(args.config, list(args.overrides)), int(os.environ.get("WORLD_SIZE", "1")))
    ours_runs, theirs_times = [], []
    for round_index in range(args.separate_processes):
        for side in (("ours", "openclip") if round_index % 2 == 0 else ("openclip", "ours")):
            child = subprocess.run(command + ["--side", side], capture_output=True, text=True)
            lines = child.stdout.strip().splitlines()
            if child.returncode != 0 or not lines:
                raise RuntimeError(f"--separate-processes: the {side} process failed (exit {child.returncode}): "
                                   + " | ".join((child.stderr.strip().splitlines() or ["no output"])[-3:]))
            result = json.loads(lines[-1])
            if side == "ours":
                ours_runs.append(result)
            else:
                theirs_times += result["openclip_step_times"]
            print(f"benchmark: round {round_index + 1}/{args.separate_processes} {side}: "
                  f"{result.get('step_s', result.get('openclip_step_s')):.3f} s a step", file=sys.stderr, flush=True)
    result = dict(ours_runs[-1])
    times = [t for run in ours_runs for t in run["step_times"]]
    mine, theirs = summary(times, result["global_batch"]), summary(theirs_times, result["global_batch"])
    scale = mine["images_per_s"] / result["images_per_s"]  # the last run's FLOP rate, at the median of all
    result.update(mine, step_times=times, tflops_per_s_per_rank=result["tflops_per_s_per_rank"] * scale,
                  mfu=result["mfu"] * scale, separate_processes=args.separate_processes,
                  openclip_images_per_s=theirs["images_per_s"], openclip_step_s=theirs["step_s"],
                  openclip_step_s_min=theirs["step_s_min"], openclip_step_s_max=theirs["step_s_max"],
                  openclip_compiled=bool(args.compile_openclip), ratio=mine["images_per_s"] / theirs["images_per_s"])
    return result


def print_result(result: dict, as_json: bool) -> None:
    line = (f"{result['model']} mask {result['mask_ratio']} batch {result['global_batch']} {result['device']}/"
            f"{result['precision']} x{result['world_size']}: {result['images_per_s']:.2f} images/s (step "
            f"{result['step_s']:.3f} s, {result['step_s_min']:.3f}..{result['step_s_max']:.3f}), "
            f"{result['tflops_per_s_per_rank']:.4f} TFLOP/s/rank, MFU {100 * result['mfu']:.1f}% of "
            f"{result['peak_tflops']:.1f} ({result['peak_tflops_source']}), peak {result['peak_mem_bytes'] / 2**30:.2f} GiB; "
            f"split forward {result['forward_s']:.3f} s, backward {result['backward_s']:.3f} s, optimizer "
            f"{result['optimizer_s']:.3f} s, communication {result['communication_s']:.3f} s")
    if "ratio" in result:
        line += f"\nOpenCLIP: {result['openclip_images_per_s']:.2f} images/s; ours / OpenCLIP = {result['ratio']:.3f}x"
    print(line, flush=True)
    if as_json:
        print(json.dumps(result), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1], epilog=__doc__.split("examples:")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="registry name: tiny, B/16, L/16, H/14, G/14")
    parser.add_argument("--layouts", nargs="*", default=None, help=f"layouts to sweep (default: {' '.join(DEFAULT_LAYOUTS)})")
    parser.add_argument("--layout", default=None, help="one layout, e.g. dp_shard=2,tp=2 (same as --layouts with one)")
    parser.add_argument("--batch", type=int, default=64, help="global batch size")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--mask-ratio", type=float, default=0.5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"])
    parser.add_argument("--ac", default="none", choices=["none", "full", "selective"], help="activation checkpointing")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="parallel.compile: torch.compile every block")
    parser.add_argument("--microbatches", type=int, default=0, help="pipeline micro-batches (default: 2 x pp)")
    parser.add_argument("--worker", action="store_true", help="run one rank (under torchrun) instead of the sweep")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--config", default=None, help="a recipe: measure it in this process (overrides follow)")
    parser.add_argument("overrides", nargs="*", help="with --config: key.sub=value overrides, as flip-train takes them")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", action="store_true", help="with --config: the last line is one JSON object")
    parser.add_argument("--compare-openclip", action="store_true",
                        help="with --config: the same architecture in OpenCLIP, stepped in turn on the same batches")
    parser.add_argument("--compile-openclip", action="store_true", help="with --compare-openclip: torch.compile OpenCLIP")
    parser.add_argument("--separate-processes", type=int, default=0, metavar="R",
                        help="with --compare-openclip: each side in a process of its own, R alternating rounds")
    parser.add_argument("--side", default="both", choices=["both", "ours", "openclip"],
                        help="with --config: measure only one side in this process (what --separate-processes runs)")
    parser.add_argument("--peak-tflops", type=float, default=0.0,
                        help="the device's peak for MFU (default: known GPUs' bf16 peak, else a measured matmul)")
    args = parser.parse_args(argv)
    if args.config is None and (args.overrides or args.json or args.compare_openclip):
        parser.error("overrides, --json and --compare-openclip go with --config FILE")
    if args.config is not None:
        if args.steps < 1 or args.warmup < 0:
            parser.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
        if args.separate_processes < 0 or (args.separate_processes and not args.compare_openclip):
            parser.error("--separate-processes R (R >= 1) goes with --compare-openclip")
        try:
            if args.separate_processes:
                print_result(separate_processes(args), args.json)
            else:
                run_config(args)
        except ValueError as error:
            print(f"benchmark: {error}", file=sys.stderr)
            return 2
        except RuntimeError as error:
            if not args.separate_processes:
                raise
            print(f"benchmark: {error}", file=sys.stderr)
            return 1
        return 0
    if args.layout is not None and args.layouts:
        parser.error("give --layout or --layouts, not both")
    layouts = [args.layout] if args.layout is not None else (args.layouts or DEFAULT_LAYOUTS)
    if args.worker:
        args.layout = layouts[0] if args.layout is not None or args.layouts else "1"
        worker(args)
        return 0
    print(f"model {args.model}, global batch {args.batch}, mask {args.mask_ratio}, {args.device}/{args.precision}, "
          f"AC {args.ac}{', compiled blocks' if args.compile else ''}, {args.steps} timed steps after {args.warmup}")
    print(f"{'layout':>28} | ranks | images/s   | step s   | peak GiB  | state MiB/rank | comm MB/step | TFLOP/s/rank")
    failed = []
    for layout in layouts:
        results = launch(args, layout)
        if results:
            print(summarize(layout, results), flush=True)
        else:
            failed.append(layout)
    if failed:
        print(f"benchmark: {len(failed)} of {len(layouts)} layouts failed: {' '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
