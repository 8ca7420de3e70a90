#!/usr/bin/env python
"""The one-command check for a lent GPU: is the fast path in use, how fast, how big, how exact.

Sections (each with a time budget; a section whose budget the run no longer has is skipped, and
named in "skipped"), in this order:
  flash           bf16 and the SDPA flash kernel in use: a B/16 step with SDPA restricted to the
                  flash backend (a fallback raises) and the profiler's kernel names
  host_syncs      two B/16 steps (not log steps) under torch.cuda.set_sync_debug_mode: no call may
                  wait for the GPU (the loss, the skip decision and the metrics stay on the device)
  bf16_vs_fp32    one B/16 step in bf16 autocast against fp32, same weights and batch: loss, gradient
                  norm and parameter change within the stated tolerances
  deepspeed       one DeepSpeed ZeRO-2 bf16 step (one process) against the native engine's bf16 step
  throughput      B/16 and H/14 images/s and MFU at mask 0 / 0.5 / 0.75, with and without compiled
                  blocks (`tools/benchmark.py --config`'s code), uncompiled runs also `--compare-openclip`
  openclip        the ours / OpenCLIP ratios of those runs
  memory          each run's peak CUDA memory against the README's memory model (`flip-train --dry-run`)
  batch_search    H/14's largest per-GPU batch at each mask ratio, without and with full activation
                  checkpointing (doubling, then bisection, bounded; OOM caught and the cache emptied)
`--smoke` runs the same code on the CPU with the tiny model (bf16 CPU autocast), one step per
measurement, the batch search bounded at 8 and without compiled blocks (inductor's C++ build takes
longer than the whole smoke run); the flash check is "not applicable on CPU" there. `--json`: the
last line is one JSON object of every section.

examples:
  python tools/gpu_check.py --json              # on the GPU machine, under 8 minutes
  python tools/gpu_check.py --smoke --json      # the same path on the CPU, in seconds
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tools"))

import torch  # noqa: E402

import gpu_check_sections as sections  # noqa: E402

TOTAL_BUDGET_S = 450.0  # the whole run on one H200: under 8 minutes with the start-up
BUDGETS_S = {"flash": 25, "host_syncs": 20, "bf16_vs_fp32": 30, "deepspeed": 45, "throughput": 220, "batch_search": 110}


@dataclass
class Setup:
    device: str
    models: dict            # label -> (config file, overrides)
    batches: dict           # label -> global batch of the throughput runs (those models are measured)
    masks: tuple = (0.0, 0.5, 0.75)
    compile_options: tuple = (False, True)
    steps: int = 3
    warmup: int = 2
    small_batch: int = 32   # the flash check and the one-step equality checks
    search_start: int = 32
    search_bound: int = 4096
    search_step: int = 16
    search_tries: int = 10
    ds_precision: str = "bf16"
    notes: list = field(default_factory=list)


def gpu_setup() -> Setup:
    common = ["train.device=cuda", "train.precision=bf16", "train.max_steps=100"]
    # H/14's recipe checkpoints every 2nd block; OpenCLIP has no such setting: measured without (the
    # batch search sets its own).
    return Setup(device="cuda", models={"B/16": (str(ROOT / "configs/flip_b16.yaml"), list(common)),
                                        "H/14": (str(ROOT / "configs/flip_h14.yaml"),
                                                 common + ["parallel.activation_checkpointing=none"])},
                 batches={"B/16": 256, "H/14": 64})


def smoke_setup() -> Setup:
    common = ["train.device=cpu", "train.precision=bf16", "train.max_steps=100"]
    tiny = (str(ROOT / "configs/tiny.yaml"), common)
    return Setup(device="cpu", models={"B/16": tiny, "H/14": tiny}, batches={"tiny": 8},
                 compile_options=(False,), steps=1, warmup=1, small_batch=8, search_start=4, search_bound=8,
                 search_step=2, search_tries=3, ds_precision=deepspeed_cpu_precision(),
                 notes=["smoke: the tiny model stands for B/16 and H/14 (measured once, as tiny), on the CPU, bf16 CPU autocast",
                        "smoke: no compiled blocks (inductor's C++ build takes longer than the smoke run)"])


def deepspeed_cpu_precision() -> str:
    """DeepSpeed's bf16 on the CPU needs its CPU accelerator to report bf16: else fp32 (both engines)."""
    try:
        from deepspeed.accelerator import get_accelerator

        return "bf16" if get_accelerator().is_bf16_supported() else "fp32"
    except Exception:  # noqa: BLE001 - no DeepSpeed: the section says so when it runs
        return "fp32"


def run_sections(setup: Setup, total_budget: float) -> dict:
    started = time.perf_counter()
    end = started + total_budget
    report = {"device": torch.cuda.get_device_name() if setup.device == "cuda" else "cpu",
              "torch": torch.__version__, "notes": setup.notes, "skipped": [], "sections": {}}

    def section(name, fn):
        budget = BUDGETS_S.get(name, 0)
        left = end - time.perf_counter()
        if left < budget * (0.05 if setup.device == "cpu" else 0.5):
            report["skipped"].append(f"{name}: {left:.0f} s of the budget left, it needs ~{budget} s")
            return None
        t0 = time.perf_counter()
        try:
            result = fn(min(end, t0 + budget))
        except Exception as error:  # noqa: BLE001 - one section's failure is reported, the rest still run
            result = {"pass": False, "error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
        result["seconds"] = round(time.perf_counter() - t0, 2)
        report["sections"][name] = result
        print(f"gpu_check: {name}: {summary_line(result)}", flush=True)
        return result

    section("flash", lambda deadline: sections.flash_check(setup))
    section("host_syncs", lambda deadline: sections.host_syncs(setup))
    section("bf16_vs_fp32", lambda deadline: sections.bf16_vs_fp32(setup))
    section("deepspeed", lambda deadline: sections.deepspeed_vs_native(setup))
    runs = section("throughput", lambda deadline: sections.throughput(setup, deadline))
    rows = runs.get("rows", []) if runs else []
    report["sections"]["openclip"] = sections.openclip_ratios(rows)
    report["sections"]["memory"] = sections.memory_vs_model(setup, rows)
    section("batch_search", lambda deadline: sections.batch_search(setup, deadline))
    for name, result in list(report["sections"].items()):  # runs a section left out against its deadline
        report["skipped"] += [f"{name}: {label}" for label in (result.get("skipped") or [])]
    checks = [s.get("pass") for s in report["sections"].values() if isinstance(s, dict)]
    report["pass"] = all(c is not False for c in checks) and not report["skipped"]
    report["seconds"] = round(time.perf_counter() - started, 2)
    return report


def summary_line(result: dict) -> str:
    shown = {k: v for k, v in result.items() if not isinstance(v, (list, dict))}
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("examples:")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="the same code on the CPU, tiny model, a few steps")
    parser.add_argument("--json", action="store_true", help="the last line is one JSON object of every section")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here. Valid: run it on a GPU machine, or --smoke on the CPU", file=sys.stderr)
        return 2
    if args.smoke:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    report = run_sections(smoke_setup() if args.smoke else gpu_setup(), TOTAL_BUDGET_S)
    report["mode"] = "smoke" if args.smoke else "gpu"
    print(f"gpu_check: {'all checks pass' if report['pass'] else 'a check failed or a section was skipped'} "
          f"in {report['seconds']:.0f} s", flush=True)
    if args.json:
        print(json.dumps(report, default=float), flush=True)
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
