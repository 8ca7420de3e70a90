"""Unmasked tuning (FLIP paper section 4.1 / A.1): continue a masked pre-training briefly with mask
ratio 0.

    plan.py  the tuning config from a checkpoint's: schedule in samples, lr, the memory rule (no torch
             at import: a login node can plan)
    cli.py   `tools/unmask_tune.py`: the plan run as a training run, the run directory's records, the
             report

The planning names are imported here; the tool's (`main`, `parse_args`, `evaluate_source`) on first
use, so that `import flip_scale.unmask.plan` does not import torch through the trainer.
"""

from .plan import (
    DEFAULT_OVERLAY, FULL_AC_COVERS, MAX_FRACTION_OF_PRETRAINING, MAX_WARMUP_FRACTION, MEMORY_MODES, PAPER_LR_RATIO,
    PAPER_SAMPLES, PAPER_WARMUP_SAMPLES, TuningPlan, format_report, memory_plan, plan_tuning, token_growth,
)

_CLI_NAMES = ("EPILOG", "RECORD_FILE", "REPORT_FILE", "evaluate_source", "main", "parse_args")

__all__ = [
    "DEFAULT_OVERLAY", "FULL_AC_COVERS", "MAX_FRACTION_OF_PRETRAINING", "MAX_WARMUP_FRACTION", "MEMORY_MODES",
    "PAPER_LR_RATIO", "PAPER_SAMPLES", "PAPER_WARMUP_SAMPLES", "TuningPlan", "format_report", "memory_plan",
    "plan_tuning", "token_growth",
    "EPILOG", "RECORD_FILE", "REPORT_FILE", "evaluate_source", "main", "parse_args",  # _CLI_NAMES
]


def __getattr__(name: str):
    if name in _CLI_NAMES:
        from . import cli

        return getattr(cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
