"""Evaluate the weights of a checkpoint: build the model of a config on its layout, load the
weights, run the configured evaluations. `flip-eval` and the unmask tool's report both use it."""

from __future__ import annotations

from typing import Mapping, Optional

from ..runtime import autocast_for
from ..checkpoint import CheckpointSource, load_weights
from .group import EvalGroup
from .runner import run_evaluation


def build_eval_model(cfg, proc):
    """The model of `cfg` on the layout of `cfg.parallel` over this process group -> (model, its
    parts to load weights into, dims). Under pipeline parallel the model is the stages behind the
    one-model interface of `PipelineEvalModel`."""
    from ..parallel import build_model_parts
    from ..parallel.pipeline import PipelineEvalModel
    from ..preflight import plan_run

    plan = plan_run(cfg, proc.world_size, training=False)
    plan.dims.build_mesh(proc.device.type)
    parts, pipe = build_model_parts(cfg, plan.dims, proc.device)
    model = parts[0] if pipe is None else PipelineEvalModel(pipe, plan.arch)
    return model, parts, plan.dims


def evaluate_checkpoint(source: CheckpointSource, cfg, proc, mask_ratio: Optional[float] = None, *,
                        views: Optional[Mapping[str, Optional[float]]] = None) -> dict:
    """Build the model of `cfg`, load `source`'s weights, run the configured evaluations (collective).

    `mask_ratio`: evaluate with that fraction of the patches removed (None: unmasked). `views`
    (name -> mask ratio or None) evaluates several views with the one model and returns
    {name: results}; without it the results of the one view are returned."""
    from ..data import build_tokenizer
    from ..models import arch_from_config

    model, parts, dims = build_eval_model(cfg, proc)
    # A consolidated file is read by rank 0 alone and handed out shard by shard (not under pp,
    # where each rank loads only its stages' tensors).
    load_weights(source, parts, broadcast_from_rank0=proc.world_size > 1 and not dims.pp_enabled,
                 whole_model=not dims.pp_enabled)
    tokenizer = build_tokenizer(cfg.data.tokenizer, context_length=arch_from_config(cfg.model).context_length)
    group = EvalGroup.from_dims(dims)
    wanted = dict(views) if views is not None else {"": mask_ratio}
    results = {}
    with autocast_for(cfg, proc.device):  # train.precision, as the trainer's own evaluations
        for name, ratio in wanted.items():
            results[name] = run_evaluation(model, tokenizer, cfg, proc.device, group, ratio or None, cfg.train.seed)
    return results if views is not None else results[""]
