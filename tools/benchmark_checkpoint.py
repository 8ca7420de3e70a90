#!/usr/bin/env python
"""Checkpoint write and `convert_ckpt.py consolidate` at full model size: time, bytes, peak RSS.

Writes a training checkpoint (DCP, one process) of a randomly initialised model of the given size,
then consolidates it to one safetensors file in a fresh process and reports that process's peak
resident memory next to the model's size: streaming consolidation should stay near a few times the
largest tensor, not the model. A script that prints numbers, never a test; record results in
BENCHMARKS.md. Needs free disk of about 2.5x the fp32 model (G/14: ~10 GB checkpoint + output).

examples:
  python tools/benchmark_checkpoint.py --model G/14
  python tools/benchmark_checkpoint.py --model B/16 --dtype bf16 --dir /scratch/bench --keep
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def write_checkpoint(model_name: str, run_dir: Path) -> dict:
    """A random model of `model_name` saved as step 1 of `run_dir` (model only, no optimizer)."""
    import torch

    from flip_scale.checkpoint import save_checkpoint
    from flip_scale.config import load_config
    from flip_scale.convert.checkpoints import peak_rss_mib
    from flip_scale.models import arch_from_config, build_model

    cfg = load_config(None, [f"model.name={model_name}", "model.vocab_size=32000"])
    arch = arch_from_config(cfg.model)
    model = build_model(cfg.model, device="meta").to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02, generator=generator)
    params = sum(p.numel() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    started = time.perf_counter()
    path = save_checkpoint(run_dir, 1, model, None, None,
                           trainer_state={"world_size": 1, "layout": "1 process", "model_arch": arch.to_dict()},
                           config_yaml=cfg.to_yaml(), keep_last=0)
    seconds = time.perf_counter() - started
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {"checkpoint": str(path), "params": params, "largest_tensor_mib": largest / 2**20,
            "checkpoint_gib": size / 2**30, "write_s": seconds, "writer_peak_rss_mib": peak_rss_mib()}


def consolidate_in_child(checkpoint: str, out: Path, dtype: str) -> dict:
    code = (
        "import json, sys, time\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})\n"
        "from flip_scale.convert.checkpoints import consolidate\n"
        "t = time.perf_counter()\n"
        f"report = consolidate({checkpoint!r}, {str(out)!r}, dtype={dtype!r})\n"
        "report['seconds'] = time.perf_counter() - t\n"
        "print('REPORT ' + json.dumps(report))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"consolidate failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("REPORT "):])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1], epilog=__doc__.split("examples:")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="G/14", help="registry name: tiny, B/16, L/16, H/14, G/14 (default G/14)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="consolidated dtype")
    parser.add_argument("--dir", default=None, help="working directory (default: a temporary one, removed after)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and the output")
    args = parser.parse_args(argv)
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="flip_ckpt_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(f"model {args.model}: writing a random training checkpoint to {work} ...", flush=True)
        written = write_checkpoint(args.model, work / "run")
        print(f"  {written['params'] / 1e9:.3f} B parameters, {written['checkpoint_gib']:.2f} GiB, largest tensor "
              f"{written['largest_tensor_mib']:.0f} MiB; DCP write {written['write_s']:.1f} s "
              f"(writer peak RSS {written['writer_peak_rss_mib'] / 1024:.1f} GiB: it holds the model)", flush=True)
        print(f"consolidating to {args.dtype} in a fresh process ...", flush=True)
        report = consolidate_in_child(written["checkpoint"], work / "consolidated", args.dtype)
        model_mib = written["params"] * 4 / 2**20
        growth = report["peak_rss_mib"] - report["rss_before_mib"]
        print(f"  {report['tensors']} tensors, {report['file_bytes'] / 2**30:.2f} GiB written in {report['seconds']:.1f} s "
              f"({report['file_bytes'] / 2**20 / report['seconds']:.0f} MiB/s)")
        print(f"  peak RSS {report['peak_rss_mib']:.0f} MiB (before reading tensors {report['rss_before_mib']:.0f} MiB; "
              f"growth {growth:.0f} MiB = {growth / written['largest_tensor_mib']:.1f}x the largest tensor, "
              f"{100 * growth / model_mib:.1f}% of the fp32 model's {model_mib:.0f} MiB)")
        print("RESULT " + json.dumps({"model": args.model, "dtype": args.dtype, **written, **report}))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
