"""The per-rank memory model of README "Sizing tp / dp / pp" as numbers, and the choice it drives.

    estimate = memory_per_rank(cfg, dims, arch, params, local_batch)   bytes by kind, for one rank
    reduce_every_microbatch(cfg, dims, params)                         (bool, why): parallel.reduce_every_microbatch
    can_reduce_every_microbatch(cfg, dims)                             whether that option applies to the layout

State (bytes per rank): fp32 weights + gradients + AdamW's two moments, 16 P / (dp_shard tp pp)
(4 bytes, the weight alone, for a parameter that never trains: a locked tower, the EMA tower),
plus, when gradients are accumulated over micro-batches without a reduce-scatter each
(`set_requires_gradient_sync(False)` for all but the last, FSDP2's default way), the unsharded fp32
gradients of the rank's tensor-parallel piece of its stage, 4 P / (tp pp), held from the first
micro-batch's backward to the last; plus the gathered (unsharded) parameters in the compute dtype:
two blocks (the one computing and the one prefetched, over tp) and the larger tower's own unit
(its embeddings, norms and projection, gathered during all its blocks); under pipeline parallel
the whole stage (P / (tp pp)), which its schedule keeps gathered from forward to backward.

Activations (bytes per rank) of one micro-batch kept for the backward, in the compute dtype
(2 bytes under bf16, 4 in fp32): per transformer block and sample, s tokens, width h, MLP width m,
s (8 h + 2 m) elements (two layer-norm inputs and outputs, q, k, v, the attention output, the
MLP's GELU input and output; fused attention keeps no s x s matrix); a checkpointed block keeps its
input only (s h) and recomputes one block at a time in the backward; each tower adds its final
norm's input (s h), the vision tower the image (3 x image_size^2); tensor parallel with sequence
parallel divides the blocks' part by tp, except the inputs of the two column-parallel projections
(qkv and the MLP's first, 2 s h), which keep the gathered sequence on every rank. The loss adds
its fp32 logits and their log-softmax, 4 x local x global x 4 bytes. Under pipeline parallel a
stage holds its share of the blocks for the micro-batches in flight (1F1B: up to pp of them;
GPipe: all). MAE's decoder (loss.mae_weight > 0) adds its blocks over all 1 + L tokens (never
checkpointed), its final norm's input, and the prediction and its fp32 target (2 L 3 p^2).

`tests/test_memory_model.py` checks these figures on the CPU: the states against the bytes of the
parameters, gradients and moments after a step, the activations against the bytes autograd saves
(`torch.autograd.graph.saved_tensors_hooks`), in one process and per rank under dp_shard 2 and tp 2,
the unsharded term against the gradients FSDP2 holds between micro-batches.
"""

from __future__ import annotations

GIB = 2**30
# parallel.reduce_every_microbatch=auto reduce-scatters every micro-batch once the unsharded
# gradients would take more than this per rank (about L/16 and up at tp 1); below it the saved
# reduce-scatters are worth more than the memory.
UNSHARDED_GRAD_LIMIT = 1 * GIB


def accumulation_microbatches(cfg, dims) -> int:
    """Backward passes whose gradients add up before the optimizer step."""
    steps = cfg.optim.grad_accum_steps
    return steps * cfg.parallel.microbatches if dims.pp > 1 else steps


def unsharded_grad_bytes(params: int, dims) -> int:
    """fp32 gradients of this rank's tensor-parallel piece of its pipeline stage, unsharded."""
    return 4 * params // (dims.tp * dims.pp)


def can_reduce_every_microbatch(cfg, dims) -> bool:
    """Whether parallel.reduce_every_microbatch=true applies: the native engine without pipeline
    parallel (under pp the schedule holds a stage's gradients across its micro-batches by its own
    rule, and DeepSpeed accumulates by its own), so only there can the unsharded term be avoided."""
    return cfg.parallel.engine == "fsdp" and dims.pp <= 1


def reduce_every_microbatch(cfg, dims, params: int) -> tuple[bool, str]:
    """(reduce-scatter the gradients after every micro-batch?, why) for parallel.reduce_every_microbatch.

    Only the native engine without pipeline parallel accumulates by skipping the reduction (the
    pipeline schedules decide for themselves), and only with dp_shard > 1 does it cost memory."""
    setting = str(cfg.parallel.reduce_every_microbatch)
    if not can_reduce_every_microbatch(cfg, dims):
        return False, "the pipeline schedule / engine accumulates by its own rule"
    if cfg.optim.grad_accum_steps <= 1:
        return False, "one micro-batch per step"
    if dims.dp_shard <= 1:
        return False, "gradients are not sharded (dp_shard 1): nothing to save"
    if setting == "true":
        return True, "parallel.reduce_every_microbatch=true"
    if setting == "false":
        return False, "parallel.reduce_every_microbatch=false"
    unsharded = unsharded_grad_bytes(params, dims)
    if unsharded > UNSHARDED_GRAD_LIMIT:
        return True, (f"auto: the unsharded gradients would take {unsharded / GIB:.2f} GiB per rank "
                      f"(> {UNSHARDED_GRAD_LIMIT / GIB:g} GiB)")
    return False, (f"auto: the unsharded gradients take {unsharded / GIB:.2f} GiB per rank "
                   f"(<= {UNSHARDED_GRAD_LIMIT / GIB:g} GiB)")


def keeps_unsharded_grads(cfg, dims, params: int) -> bool:
    """Whether the layout holds the unsharded fp32 gradients between micro-batches."""
    if cfg.parallel.engine != "fsdp" or dims.dp_shard <= 1 or accumulation_microbatches(cfg, dims) <= 1:
        return False
    return not reduce_every_microbatch(cfg, dims, params)[0]


def _checkpointed(pcfg, tower: str, index: int) -> bool:
    if pcfg.activation_checkpointing == "none" or pcfg.activation_checkpointing_towers not in ("both", tower):
        return False
    return pcfg.activation_checkpointing == "full" or (index + 1) % pcfg.activation_checkpointing_every == 0


def _block_elements(tokens: int, width: int, mlp: int) -> int:
    return tokens * (8 * width + 2 * mlp)


def decoder_elements_per_sample(model_cfg, arch, tp: int = 1) -> float:
    """Elements one sample keeps for the backward of MAE's decoder on one rank (module docstring)."""
    tokens, width = 1 + arch.num_patches, model_cfg.decoder_width
    full = _block_elements(tokens, width, 4 * width)
    gathered = 2 * tokens * width
    split = (full - gathered) / tp + gathered if tp > 1 else full
    return model_cfg.decoder_layers * split + tokens * width + 2 * arch.num_patches * 3 * arch.patch_size ** 2


def activation_elements_per_sample(pcfg, arch, visible: int, blocks_share: float = 1.0,
                                   tp: int = 1) -> tuple[float, int]:
    """(elements one sample keeps for the backward on one rank, elements of the one checkpointed
    block recomputed at a time in the backward, on one rank) (module docstring). Under tensor +
    sequence parallel the blocks' activations split over the tp ranks but for the inputs of the two
    column-parallel projections (qkv, the MLP's first), which keep the gathered sequence; the image
    and each tower's final norm input are whole on every rank."""
    kept, recompute = 3.0 * arch.image_size ** 2, 0  # the image, input of the patch embedding
    towers = (("vision", 1 + visible, arch.vision), ("text", arch.context_length, arch.text))
    for name, tokens, tower in towers:
        kept += tokens * tower.width * blocks_share  # the tower's final norm input (the last block's output)
        full = _block_elements(tokens, tower.width, tower.mlp_dim)
        gathered = 2 * tokens * tower.width  # the column-parallel projections' inputs
        split = (full - gathered) / tp + gathered if tp > 1 else full
        for index in range(tower.layers):
            if _checkpointed(pcfg, name, index):
                kept += tokens * tower.width * blocks_share / tp
                recompute = max(recompute, split)
            else:
                kept += split * blocks_share
    return kept, int(recompute)


def memory_per_rank(cfg, dims, arch, params: int, local_batch: int, precision: str, visible: int,
                    block_params: int = 0, root_params: int = 0, frozen_params: int = 0) -> dict:
    """Bytes one rank holds at its peak, by kind (module docstring): states, unsharded_grads,
    gathered_params, activations (of which recompute: the checkpointed block being recomputed),
    loss, total. `frozen_params` (of `params`: locked towers, an EMA tower) hold their weights only."""
    pcfg = cfg.parallel
    compute_bytes = 2 if precision == "bf16" else 4
    shard_over = dims.dp_shard * dims.tp * dims.pp
    trained = params - frozen_params
    states = (16 * trained + 4 * frozen_params) / shard_over
    if pcfg.engine == "deepspeed":  # ZeRO-1 shards the moments, 2 the gradients too, 3 the weights too
        stage, dp = pcfg.zero_stage, dims.dp_size
        weights = params * 4 * (1 / dp if stage >= 3 else 1)
        states = trained * (12 / dp + 4 * (1 / dp if stage >= 2 else 1)) + weights
    unsharded = unsharded_grad_bytes(params, dims) if keeps_unsharded_grads(cfg, dims, params) else 0
    gathered = 0
    if dims.fsdp_enabled and dims.dp_shard > 1:
        if dims.pp > 1:  # a stage keeps all its parameters gathered from its forward to its backward
            gathered = params * compute_bytes / (dims.tp * dims.pp)
        else:  # two blocks, and the tower's own unit (embeddings, norms, projection) during its blocks
            gathered = (2 * block_params / dims.tp + root_params) * compute_bytes
    if dims.pp > 1:
        micro = max(1, local_batch // accumulation_microbatches(cfg, dims))
        in_flight = accumulation_microbatches(cfg, dims)
        if pcfg.pp_schedule != "gpipe":
            in_flight = min(in_flight, dims.pp)
        samples, share = micro * in_flight, 1.0 / dims.pp
    else:
        samples, share = max(1, local_batch // cfg.optim.grad_accum_steps), 1.0
    kept, recompute = activation_elements_per_sample(pcfg, arch, visible, share, dims.tp)
    if getattr(cfg.loss, "mae_weight", 0) > 0:
        kept += decoder_elements_per_sample(cfg.model, arch, dims.tp)
    recompute_bytes = samples * recompute * compute_bytes
    activations = samples * kept * compute_bytes + recompute_bytes
    loss = 4 * local_batch * local_batch * dims.dp_size * 4
    total = states + unsharded + gathered + activations + loss
    return {"states": int(states), "unsharded_grads": int(unsharded), "gathered_params": int(gathered),
            "activations": int(activations), "recompute": int(recompute_bytes), "loss": int(loss),
            "total": int(total)}
