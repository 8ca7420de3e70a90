"""The sections of `tools/gpu_check.py`: each takes the check's settings and a deadline (a
`time.perf_counter()` value) and returns a JSON-ready dict; a section that is a check has "pass"
(True / False, or None where it does not apply, with a "note" saying why)."""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import torch

from benchmark import run_config  # noqa: E402 - tools/ is on sys.path (gpu_check.py puts it there)

# Tolerances of the equality checks (one step from the same weights on the same batch).
BF16_LOSS_RTOL = 2e-2      # bf16 autocast vs fp32: the loss
BF16_NORM_RTOL = 5e-2      # ... the gradient norm
BF16_UPDATE_RTOL = 0.35    # ... ||dW_bf16 - dW_fp32|| / ||dW_fp32|| (AdamW's first step ~ lr * sign(g))
DS_LOSS_RTOL = 1e-2        # DeepSpeed ZeRO-2 bf16 vs the native engine's bf16: the loss
DS_UPDATE_RTOL = 0.35      # ... the parameter change
MEMORY_MARGIN = 0.30       # measured CUDA peak within 30% of the README's memory model


def build_trainer(config: str, overrides: list, run_dir: str):
    from flip_scale.config import load_config
    from flip_scale.distributed import init_distributed
    from flip_scale.train import Trainer

    cfg = load_config(config, list(overrides) + ["logging.tensorboard=false", "schedule.warmup_steps=0"])
    proc = init_distributed(cfg.train.device)
    return cfg, Trainer(cfg, Path(run_dir), proc, with_data=False)


def random_batch(arch, size: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"images": torch.randn(size, 3, arch.image_size, arch.image_size, generator=generator),
            "tokens": torch.randint(4, arch.vocab_size, (size, arch.context_length), generator=generator),
            "sample_index": torch.arange(size)}


def release(device: torch.device) -> None:
    """Free what the last run left: compiled graphs (they hold their inputs' memory), then the cache."""
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def flash_check(setup) -> dict:
    """bf16 and the SDPA flash kernel: one training step of the B/16 shape with SDPA restricted to
    the flash backend (a fallback raises), the profiler's CUDA kernel names checked for flash."""
    if setup.device == "cpu":
        return {"pass": None, "note": "not applicable on CPU (the flash kernel is CUDA's)"}
    from torch.autograd import DeviceType
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    config, overrides = setup.models["B/16"]
    with tempfile.TemporaryDirectory() as run_dir:
        cfg, trainer = build_trainer(config, overrides + [f"train.global_batch_size={setup.small_batch}"], run_dir)
        batch = random_batch(trainer.arch, setup.small_batch)
        error = None
        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), \
                    profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                trainer.train_step(batch)
                torch.cuda.synchronize()
            flash = [event for event in prof.key_averages() if "flash" in event.key.lower()]
            kernels = sorted({e.key for e in flash if e.device_type == DeviceType.CUDA})  # the GPU kernels
            ops = sorted({e.key for e in flash if e.device_type == DeviceType.CPU})  # the aten ops launching them
        except RuntimeError as failure:  # "No available kernel": some attention call needs another backend
            error, kernels, ops = str(failure).splitlines()[0], [], []
        # Unrestricted, as training runs: which SDPA op PyTorch's own priority picks (flash, cuDNN or
        # memory-efficient), reported; restricting proves only that flash can run these shapes.
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            trainer.train_step(batch)
            torch.cuda.synchronize()
        default_ops = sorted({e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product_")
                              and e.device_type == DeviceType.CPU})
        precision = trainer.precision
        del trainer
    release(torch.device(setup.device))
    return {"pass": precision == "bf16" and error is None and bool(kernels or ops), "precision": precision,
            "flash_kernels": kernels[:6], "flash_ops": ops[:6], "error": error,
            "default_sdpa_ops": default_ops[:6],
            "default_is_flash": bool(default_ops) and all("flash" in op for op in default_ops)}


def host_syncs(setup) -> dict:
    """Steps that are not log steps read nothing back from the GPU: two B/16 training steps under
    `torch.cuda.set_sync_debug_mode("warn")` (after one untimed step), every synchronising call counted."""
    if setup.device == "cpu":
        return {"pass": None, "note": "not applicable on CPU (there is no device queue to stall)"}
    import warnings

    config, overrides = setup.models["B/16"]
    with tempfile.TemporaryDirectory() as run_dir:
        cfg, trainer = build_trainer(config, overrides + [f"train.global_batch_size={setup.small_batch}"], run_dir)
        batch = {name: tensor.pin_memory() for name, tensor in random_batch(trainer.arch, setup.small_batch).items()}
        trainer.train_step(batch)
        trainer.state.step += 1
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for _ in range(2):
                    trainer.train_step(batch)
                    trainer.state.step += 1
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        del trainer
    release(torch.device(setup.device))
    syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
    return {"pass": not syncs, "syncs_in_two_steps": len(syncs), "first": list(dict.fromkeys(syncs))[:4]}


def throughput(setup, deadline: float) -> dict:
    """images/s, MFU, the OpenCLIP ratio (uncompiled runs) and peak memory against the memory model,
    for each model x mask ratio x compiled blocks, through `tools/benchmark.py --config`'s code."""
    rows, skipped, longest = [], [], 0.0
    for compiled in setup.compile_options:  # every uncompiled run first: those carry the OpenCLIP ratios
        for name, batch in setup.batches.items():
            config, overrides = setup.models.get(name, setup.models["B/16"])
            for mask in setup.masks:
                label = f"{name} mask {mask}{' compiled' if compiled else ''}"
                if time.perf_counter() + longest > deadline:  # a run as long as the longest yet would overrun
                    skipped.append(label)
                    continue
                started = time.perf_counter()
                args = argparse.Namespace(
                    config=config, overrides=overrides + [f"model.mask_ratio={mask}", f"train.global_batch_size={batch}",
                                                          f"parallel.compile={str(compiled).lower()}"],
                    steps=setup.steps, warmup=setup.warmup, threads=0, verbose=False, json=False,
                    compare_openclip=not compiled, compile_openclip=False, peak_tflops=0.0)
                try:
                    result = run_config(args)
                    row = {"model": name, "mask_ratio": mask, "compiled": compiled, "batch": batch,
                           "images_per_s": result["images_per_s"], "mfu": result["mfu"],
                           "tflops_per_s_per_rank": result["tflops_per_s_per_rank"],
                           "peak_mem_bytes": result["peak_mem_bytes"] - result.get("mem_baseline_bytes", 0),
                           "mem_baseline_bytes": result.get("mem_baseline_bytes", 0),
                           "ratio_vs_openclip": result.get("ratio"),
                           "model_mem_bytes": model_memory(config, args.overrides)}
                except Exception as error:  # noqa: BLE001 - inductor, OOM, disk: this run failed, the rest still run
                    row = {"model": name, "mask_ratio": mask, "compiled": compiled,
                           "error": f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"}
                rows.append(row)
                release(torch.device(setup.device))
                longest = max(longest, time.perf_counter() - started)
    return {"pass": not any("error" in row for row in rows), "rows": rows, "skipped": skipped}


def model_memory(config: str, overrides: list) -> int:
    """The README's memory model's total for this run (what `flip-train --dry-run` prints)."""
    from flip_scale.config import load_config
    from flip_scale.models import build_model, count_parameters
    from flip_scale.preflight import memory_estimate, plan_run

    cfg = load_config(config, list(overrides))
    params = count_parameters(build_model(cfg.model, device="meta"))["params_total"]
    return int(memory_estimate(plan_run(cfg, 1), params)["total"])


def openclip_ratios(rows: list) -> dict:
    ratios = {f"{r['model']} mask {r['mask_ratio']}": r["ratio_vs_openclip"] for r in rows
              if not r.get("compiled") and r.get("ratio_vs_openclip") is not None}
    return {"ratios": ratios, "note": "ours / OpenCLIP images/s, same batches in turn, both uncompiled"}


def memory_vs_model(setup, rows: list) -> dict:
    checked = [{"run": f"{r['model']} mask {r['mask_ratio']}{' compiled' if r['compiled'] else ''}",
                "measured_bytes": r["peak_mem_bytes"], "model_bytes": r["model_mem_bytes"],
                "ratio": r["peak_mem_bytes"] / r["model_mem_bytes"]} for r in rows if "peak_mem_bytes" in r]
    if setup.device == "cpu":
        return {"pass": None, "rows": checked,
                "note": "not comparable on CPU: the peak is the process RSS (libraries and interpreter included)"}
    ok = bool(checked) and all(abs(c["ratio"] - 1) <= MEMORY_MARGIN for c in checked)
    return {"pass": ok, "margin": MEMORY_MARGIN, "rows": checked}


def fits(trainer, batch_size: int, device: torch.device) -> bool:
    """One training step at `batch_size` fits in memory (the OOM caught, the cache emptied after)."""
    ok = True
    try:
        trainer.train_step(random_batch(trainer.arch, batch_size))
        if device.type == "cuda":
            torch.cuda.synchronize()
    except torch.cuda.OutOfMemoryError:
        ok = False
    if not ok:
        for param in trainer.parameters():
            param.grad = None
    release(device)  # outside the except block: the traceback's frames no longer hold tensors
    return ok


def largest_batch(trainer, device: torch.device, start: int, bound: int, step: int, max_tries: int,
                  growth: float = 2.0) -> dict:
    """Growing from `start` by `growth` up to `bound` (a start that does not fit is halved first),
    then bisection in multiples of `step`; at most `max_tries` steps after the start."""
    tries = 0
    bad = None
    while not fits(trainer, start, device):  # the start is too big: halve it until one fits
        tries += 1
        bad = start
        if start <= step or tries >= max_tries:
            return {"largest": 0, "tries": tries, "bounded": False}
        start = max(step, start // 2 // step * step)
    good = start
    while bad is None and good < bound and tries < max_tries:
        candidate = min(bound, max(good + step, int(good * growth) // step * step))
        tries += 1
        if fits(trainer, candidate, device):
            good = candidate
        else:
            bad = candidate
    while bad is not None and bad - good > step and tries < max_tries:
        middle = (good + bad) // 2 // step * step
        tries += 1
        if fits(trainer, middle, device):
            good = middle
        else:
            bad = middle
    return {"largest": good, "tries": tries + 1, "bounded": bad is None}


def batch_search(setup, deadline: float) -> dict:
    """The largest per-GPU batch of H/14 at each mask ratio, without and with full checkpointing."""
    config, overrides = setup.models["H/14"]
    results, skipped, longest = {}, [], 0.0
    for mask in setup.masks:
        for ac in ("none", "full"):
            label = f"mask {mask} ac {ac}"
            if time.perf_counter() + longest > deadline:  # a search as long as the longest yet would overrun
                skipped.append(label)
                continue
            started = time.perf_counter()
            run = overrides + [f"model.mask_ratio={mask}", f"parallel.activation_checkpointing={ac}"]
            start = search_start(setup, config, run)
            try:
                with tempfile.TemporaryDirectory() as run_dir:
                    _, trainer = build_trainer(config, run + [f"train.global_batch_size={start}"], run_dir)
                    # Near the model's estimate on a GPU: grow by half, not double, past it.
                    results[label] = largest_batch(trainer, trainer.device, start, setup.search_bound,
                                                   setup.search_step, setup.search_tries,
                                                   growth=1.5 if setup.device == "cuda" else 2.0)
                    results[label]["start"] = start
                    del trainer
            except Exception as error:  # noqa: BLE001 - reported; the other searches still run
                results[label] = {"error": f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"}
            release(torch.device(setup.device))
            longest = max(longest, time.perf_counter() - started)
    return {"pass": not any("error" in r for r in results.values()), "largest_batch": results,
            "bound": setup.search_bound, "skipped": skipped}


def search_start(setup, config: str, overrides: list) -> int:
    """Where the search starts: 3/4 of the batch the README's memory model says fits the GPU (in
    multiples of the search step, within [step, bound]), so that a few tries find the edge; on the
    CPU (no memory to fill), `setup.search_start`."""
    if setup.device != "cuda":
        return setup.search_start
    free, _ = torch.cuda.mem_get_info()
    one, two = (model_memory(config, overrides + [f"train.global_batch_size={b}"]) for b in (32, 64))
    per_sample = max(1.0, (two - one) / 32)
    fitting = (free - (one - 32 * per_sample)) / per_sample
    start = int(0.75 * fitting) // setup.search_step * setup.search_step
    return max(setup.search_step, min(setup.search_bound, start))


def _snapshot(trainer) -> dict:
    engine = trainer.engine
    if engine.name == "deepspeed":
        return {k: v.detach().float().cpu().reshape(-1).clone() for k, v in engine.full_parameters().items()}
    return {k: v.detach().float().cpu().reshape(-1).clone() for k, v in engine.model.named_parameters()}


def one_step(config: str, overrides: list, batch_size: int, init: dict | None = None) -> dict:
    """(loss, grad norm, initial and final weights) of one step from `init` (or the seed's weights)."""
    with tempfile.TemporaryDirectory() as run_dir:
        cfg, trainer = build_trainer(config, overrides + [f"train.global_batch_size={batch_size}"], run_dir)
        before = _snapshot(trainer)
        if init is not None:
            assert all(torch.equal(before[k], init[k]) for k in init), "the two runs start from different weights"
        out = trainer.train_step(random_batch(trainer.arch, batch_size, seed=1))
        result = {"loss": float(out["loss"]), "grad_norm": float(out["grad_norm"]), "before": before,
                  "after": _snapshot(trainer), "precision": trainer.precision, "engine": trainer.engine.name}
        trainer.close()
        del trainer
    return result


def update_error(got: dict, want: dict) -> float:
    """||dW_got - dW_want|| / ||dW_want|| over all parameters."""
    diff = sum(float(((got["after"][k] - got["before"][k]) - (want["after"][k] - want["before"][k])).pow(2).sum())
               for k in want["after"])
    ref = sum(float((want["after"][k] - want["before"][k]).pow(2).sum()) for k in want["after"])
    return (diff / ref) ** 0.5 if ref else float("inf")


def bf16_vs_fp32(setup) -> dict:
    config, overrides = setup.models["B/16"]
    bf16 = one_step(config, overrides + ["train.precision=bf16"], setup.small_batch)
    fp32 = one_step(config, overrides + ["train.precision=fp32"], setup.small_batch, init=bf16["before"])
    release(torch.device(setup.device))
    loss_err = abs(bf16["loss"] - fp32["loss"]) / abs(fp32["loss"])
    norm_err = abs(bf16["grad_norm"] - fp32["grad_norm"]) / fp32["grad_norm"]
    update_err = update_error(bf16, fp32)
    return {"pass": loss_err <= BF16_LOSS_RTOL and norm_err <= BF16_NORM_RTOL and update_err <= BF16_UPDATE_RTOL,
            "loss_bf16": bf16["loss"], "loss_fp32": fp32["loss"], "loss_rel_error": loss_err,
            "grad_norm_rel_error": norm_err, "update_rel_error": update_err,
            "tolerance": {"loss": BF16_LOSS_RTOL, "grad_norm": BF16_NORM_RTOL, "update": BF16_UPDATE_RTOL}}


def deepspeed_vs_native(setup) -> dict:
    """One DeepSpeed ZeRO-2 bf16 step (one process) against the native engine's bf16 step."""
    config, overrides = setup.models["B/16"]
    precision = f"train.precision={setup.ds_precision}"
    native = one_step(config, overrides + [precision], setup.small_batch)
    ds = one_step(config, overrides + [precision, "parallel.engine=deepspeed", "parallel.zero_stage=2"],
                  setup.small_batch, init=native["before"])
    release(torch.device(setup.device))
    loss_err = abs(ds["loss"] - native["loss"]) / abs(native["loss"])
    update_err = update_error(ds, native)
    return {"pass": loss_err <= DS_LOSS_RTOL and update_err <= DS_UPDATE_RTOL, "precision": setup.ds_precision,
            "engine": ds["engine"], "loss_deepspeed": ds["loss"], "loss_native": native["loss"],
            "loss_rel_error": loss_err, "update_rel_error": update_err,
            "tolerance": {"loss": DS_LOSS_RTOL, "update": DS_UPDATE_RTOL}}
