"""The engine seam (base.py) and the engines behind it.

    engine = build_engine(cfg, plan, device)   # plan: flip_scale.preflight.plan_run(cfg, world_size)

`parallel.engine: fsdp` is the native engine (native.py: FSDP2 + tensor + pipeline parallel);
`parallel.engine: deepspeed` is DeepSpeed ZeRO-1/2/3, data parallel only (deepspeed.py, which alone
imports deepspeed).
"""

from __future__ import annotations

from .base import Engine, StepResult


def build_engine(cfg, plan, device) -> Engine:
    """The engine `cfg.parallel.engine` names, built on the layout of `plan` (collective)."""
    if cfg.parallel.engine == "fsdp":
        from .native import NativeEngine

        return NativeEngine(cfg, plan, device)
    if cfg.parallel.engine == "deepspeed":
        from .deepspeed import DeepSpeedEngine

        return DeepSpeedEngine(cfg, plan, device)
    raise ValueError(f"parallel.engine={cfg.parallel.engine!r}: no such engine; valid: fsdp, deepspeed")


__all__ = ["Engine", "StepResult", "build_engine"]
