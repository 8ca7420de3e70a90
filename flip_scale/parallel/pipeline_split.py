"""Pipeline stages of a FLIP model: the balanced split and the stage modules.

A CLIP model has two towers, so a pipeline stage holds a contiguous slice of the image blocks AND a
contiguous slice of the text blocks (either may be empty, never both) and passes both hidden states
on. Stage 0 also holds the embeddings (patch embedding + masking + CLS; token embedding +
positions); the last stage pools, projects, normalises and holds the temperature.

The split balances the estimated forward FLOPs per stage. Image blocks are costed at the visible
token count (1 + int(L * (1 - mask_ratio))), not at the full patch count: at 50% masking an image
block of ViT-H/14 costs about 6x a text block, at 0% about 12x, so where the towers' blocks go
depends on the mask ratio. A dynamic programme over (image blocks, text blocks) already placed
finds the smallest possible cost of the slowest stage (the pipeline's step time). Blocks are
coarse, so the exact optimum is often a lopsided split (ViT-H/14 over 4 stages: image/text blocks
7+12, 9+0, 8+6, 8+6) that beats an even one (8+6 x 4) by 0.2%, less than the estimate's own error.
So every split whose slowest stage is within `tolerance` (1%) of the optimum (and no slower than
cutting each tower evenly) counts as balanced, and among those the programme picks the one with the most even parameter memory (least sum of
squared parameter counts per stage), which also keeps the two towers advancing together.

Stage I/O (`FLIPStage.forward`):

    stage 0        (images [b,3,H,W], tokens [b,T][, mask_noise [b,L] or [b,L+T] (text masking)])
    0 < s < last   (image hidden [b,N,Wv], text hidden [b,T,Wt][, tokens [b,T]])
    not last       -> (image hidden, text hidden[, tokens])
    last           -> one tensor [b, 2*D + 1] (float32):
                      [L2-normalised image features | L2-normalised text features | log temperature]

The tokens travel with the hidden states only when the text tower needs them after its
embedding (`text_pad_mask` for the attention mask, `text_causal` or `text_pool=argmax` for the pooling). The
text hidden state and the tokens passed on have the kept length K = int(T (1 - text_mask_ratio))
under text masking. The last stage returns one tensor rather than a tuple because the pipeline schedule merges the
micro-batch outputs along dim 0 and splits the target (the cached gradient) the same way; a 0-d
temperature could do neither. Every row carries the same temperature; `split_stage_output` undoes
the packing.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flip_scale.models.flip import clamp_logit_scale_
from flip_scale.models.masking import split_mask_noise, visible_count

log = logging.getLogger("flip_scale.parallel")


# ----------------------------------------------------------------------------- cost model


def block_forward_flops(width: int, mlp_dim: int, tokens: int) -> int:
    """Forward FLOPs of one transformer block on one sample (a multiply-add is 2 FLOPs).

    qkv + out-projection 8*t*w^2, MLP 4*t*w*mlp, the two attention matmuls 4*t^2*w; with mlp = 4w
    this is t * (24 w^2 + 4 t w).
    """
    return 8 * tokens * width * width + 4 * tokens * width * mlp_dim + 4 * tokens * tokens * width


def block_parameters(width: int, mlp_dim: int) -> int:
    """Parameters of one transformer block (fused qkv, out-projection, MLP, two LayerNorms)."""
    return 4 * width * width + 4 * width + 2 * width * mlp_dim + mlp_dim + width + 4 * width


def image_tokens(arch, mask_ratio: float) -> int:
    """Tokens an image block sees: CLS + the visible patches."""
    return 1 + visible_count(arch.num_patches, mask_ratio)


def _costs(arch, mask_ratio: float) -> tuple[int, int, int, int]:
    """(image block, text block, stage-0 extra, last-stage extra) forward FLOPs per sample."""
    image_block = block_forward_flops(arch.vision.width, arch.vision.mlp_dim, image_tokens(arch, mask_ratio))
    text_block = block_forward_flops(arch.text.width, arch.text.mlp_dim, arch.context_length)
    # The patch embedding runs on every patch, before the masking; the token lookup is free.
    first_extra = 2 * arch.num_patches * arch.vision.width * 3 * arch.patch_size**2
    last_extra = 2 * arch.embed_dim * (arch.vision.width + arch.text.width)
    return image_block, text_block, first_extra, last_extra


# ----------------------------------------------------------------------------- the split


@dataclass(frozen=True)
class StageSpec:
    """What pipeline stage `index` of `num_stages` holds: blocks [start, stop) of each tower."""

    index: int
    num_stages: int
    vision_blocks: tuple[int, int]
    text_blocks: tuple[int, int]
    flops: int  # estimated forward FLOPs of one sample through this stage

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    @property
    def vision_range(self) -> range:
        return range(*self.vision_blocks)

    @property
    def text_range(self) -> range:
        return range(*self.text_blocks)

    def describe(self) -> str:
        def blocks(r: range) -> str:
            return "-" if len(r) == 0 else (f"{r.start}" if len(r) == 1 else f"{r.start}-{r.stop - 1}")

        extras = ([" + embeddings"] if self.is_first else []) + ([" + heads/temperature"] if self.is_last else [])
        return (
            f"stage {self.index}: image blocks {blocks(self.vision_range)} ({len(self.vision_range)}), "
            f"text blocks {blocks(self.text_range)} ({len(self.text_range)}){''.join(extras)}, "
            f"{self.flops / 1e9:.3g} GFLOPs/sample"
        )


def _specs_from_counts(arch, mask_ratio: float, counts: list[tuple[int, int]]) -> list[StageSpec]:
    image_block, text_block, first_extra, last_extra = _costs(arch, mask_ratio)
    specs, v, t = [], 0, 0
    num_stages = len(counts)
    for index, (a, b) in enumerate(counts):
        flops = a * image_block + b * text_block
        flops += (first_extra if index == 0 else 0) + (last_extra if index == num_stages - 1 else 0)
        specs.append(StageSpec(index, num_stages, (v, v + a), (t, t + b), int(flops)))
        v, t = v + a, t + b
    return specs


def _check_stage_count(arch, num_stages: int) -> None:
    total = arch.vision.layers + arch.text.layers
    if num_stages < 1:
        raise ValueError(f"a pipeline needs at least one stage, got num_stages={num_stages}")
    if num_stages > total:
        raise ValueError(
            f"cannot split {arch.vision.layers} image blocks + {arch.text.layers} text blocks = {total} blocks over "
            f"{num_stages} pipeline stages: every stage must hold at least one block; use at most {total} stages "
            f"(stages = parallel.pp, or 2 x parallel.pp with interleaved_1f1b)"
        )


def naive_split(arch, mask_ratio: float, num_stages: int) -> list[StageSpec]:
    """Each tower cut into `num_stages` near-equal pieces, the first stages taking the remainder.

    The baseline the balanced split is measured against; it can leave a stage without blocks.
    """
    _check_stage_count(arch, num_stages)
    vision = [len(part) for part in np.array_split(np.arange(arch.vision.layers), num_stages)]
    text = [len(part) for part in np.array_split(np.arange(arch.text.layers), num_stages)]
    return _specs_from_counts(arch, mask_ratio, list(zip(vision, text)))


def split_stages(arch, mask_ratio: float, num_stages: int, tolerance: float = 0.01,
                 verbose: bool = True) -> list[StageSpec]:
    """Balance the blocks of both towers over `num_stages` stages by estimated forward FLOPs.

    `arch` is a `FlipArch`; `mask_ratio` is the training mask ratio (the visible token count sets an
    image block's cost). The slowest stage costs at most (1 + tolerance) x the best possible; among
    such splits, the one with the most even parameter counts. Deterministic: every rank computes
    the same split.
    """
    _check_stage_count(arch, num_stages)
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    nv, nt = arch.vision.layers, arch.text.layers
    image_block, text_block, first_extra, last_extra = _costs(arch, mask_ratio)
    unit = float(image_block + text_block)  # keep the numbers O(1)
    image_params = block_parameters(arch.vision.width, arch.vision.mlp_dim)
    text_params = block_parameters(arch.text.width, arch.text.mlp_dim)
    first_params = 3 * arch.patch_size**2 * arch.vision.width + arch.vocab_size * arch.text.width
    param_unit = float(image_params + text_params)

    def stage_cost(index: int, a: int, b: int) -> float:
        extra = (first_extra if index == 0 else 0) + (last_extra if index == num_stages - 1 else 0)
        return (a * image_block + b * text_block + extra) / unit

    def stage_params_squared(index: int, a: int, b: int) -> float:
        return ((a * image_params + b * text_params + (first_params if index == 0 else 0)) / param_unit) ** 2

    # best[i, t]: the objective over the stages placed so far, holding the first i image blocks and t
    # text blocks. Pass 1 minimises the slowest stage; pass 2, among the stages no slower than the
    # bound, the sum of squared parameter counts.
    def run(bottleneck: Optional[float]):
        best = np.full((nv + 1, nt + 1), np.inf)
        best[0, 0] = 0.0
        choices = []
        for index in range(num_stages):
            new = np.full_like(best, np.inf)
            pick_a = np.zeros(best.shape, dtype=np.int64)
            pick_b = np.zeros(best.shape, dtype=np.int64)
            for a in range(nv + 1):
                for b in range(nt + 1):
                    if a + b == 0:
                        continue
                    cost = stage_cost(index, a, b)
                    if bottleneck is not None and cost > bottleneck:
                        continue
                    before = best[: nv + 1 - a, : nt + 1 - b]
                    if bottleneck is None:
                        candidate = np.maximum(before, cost)
                    else:
                        candidate = before + stage_params_squared(index, a, b)
                    target = new[a:, b:]
                    better = candidate < target
                    target[better] = candidate[better]
                    pick_a[a:, b:][better] = a
                    pick_b[a:, b:][better] = b
            best = new
            choices.append((pick_a, pick_b))
        return best[nv, nt], choices

    bottleneck, _ = run(None)
    bound = bottleneck * (1 + tolerance)
    even = naive_split(arch, mask_ratio, num_stages)
    if all(len(s.vision_range) + len(s.text_range) > 0 for s in even):
        # Never slower than cutting each tower evenly.
        bound = min(bound, max(s.flops for s in even) / unit)
    _, choices = run(bound * (1 + 1e-12))
    counts, i, t = [], nv, nt
    for pick_a, pick_b in reversed(choices):
        a, b = int(pick_a[i, t]), int(pick_b[i, t])
        counts.append((a, b))
        i, t = i - a, t - b
    if (i, t) != (0, 0):  # cannot happen: the bottleneck pass found this endpoint reachable
        raise RuntimeError(f"pipeline split failed to place every block (left: {i} image, {t} text)")
    specs = _specs_from_counts(arch, mask_ratio, counts[::-1])
    if verbose:
        log.info(describe_split(specs, arch, mask_ratio))
    return specs


def describe_split(specs: list[StageSpec], arch, mask_ratio: float) -> str:
    total = sum(s.flops for s in specs)
    lines = [
        f"pipeline split of {arch.vision.layers} image + {arch.text.layers} text blocks over {len(specs)} stages "
        f"(mask_ratio {mask_ratio}: {image_tokens(arch, mask_ratio)} image tokens, {arch.context_length} text tokens; "
        f"slowest stage {max(s.flops for s in specs) / (total / len(specs)):.3f}x the mean)"
    ]
    lines += [f"  {s.describe()} ({100 * s.flops / total:.1f}%)" for s in specs]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- stage modules


class FLIPStage(nn.Module):
    """One pipeline stage of a FLIP model (see the module docstring for its inputs and outputs).

    Children keep the whole model's names (`visual`, `text`, `logit_scale`), so state-dict keys
    are those of `FLIPModel` and a checkpoint re-shards across pipeline layouts. The towers are
    called as modules (not their `embed`/`head` methods) so that FSDP's hooks on them run.
    """

    def __init__(self, visual: nn.Module, text: nn.Module, logit_scale: Optional[nn.Parameter], spec: StageSpec,
                 pass_tokens: bool, logit_scale_max: Optional[float] = None,
                 logit_bias: Optional[nn.Parameter] = None, has_logit_bias: bool = False):
        super().__init__()
        self.visual = visual
        self.text = text
        if logit_scale is not None:
            self.logit_scale = logit_scale
        if logit_bias is not None:  # the sigmoid loss's bias, beside the temperature on the last stage
            self.logit_bias = logit_bias
        # Columns of loss parameters in the last stage's output: [log temperature] or [.., bias].
        self.loss_width = 2 if has_logit_bias else 1
        self.spec = spec
        self.pass_tokens = pass_tokens
        self.embed_dim = visual.arch.embed_dim
        self.logit_scale_max = logit_scale_max

    def clamp_logit_scale(self) -> None:
        """Keep the temperature in [0, log 100] (a no-op on stages that do not hold it)."""
        clamp_logit_scale_(self)

    def forward(self, *inputs: torch.Tensor):
        if self.spec.is_first:
            images, tokens = inputs[0], inputs[1]
            mask_noise = inputs[2] if len(inputs) > 2 else None
            image_in = text_in = None
            image_noise, text_noise = split_mask_noise(mask_noise, self.visual.arch.num_patches,
                                                       self.visual.arch.context_length)
            image_x = self.visual(images, image_noise)
            text_x = self.text(tokens, mask_noise=text_noise)
            if self.pass_tokens:  # the later stages see the tokens the text blocks see
                tokens = self.text.keep(tokens, text_noise)[0]
        else:
            image_in, text_in = inputs[0], inputs[1]
            tokens = inputs[2] if self.pass_tokens else None
            image_x = self.visual(image_in)
            text_x = self.text(tokens, text_in)
        if self.spec.is_last:
            image_features = F.normalize(image_x, dim=-1).float()
            text_features = F.normalize(text_x, dim=-1).float()
            scalars = [self.logit_scale.reshape(1)] + ([self.logit_bias.reshape(1)] if self.loss_width == 2 else [])
            log_temperature = torch.cat(scalars).float().expand(image_features.shape[0], self.loss_width)
            return torch.cat([image_features, text_features, log_temperature], dim=1)
        # A tower without blocks on this stage hands its input back; the schedule needs an output
        # tensor of its own (it sends it, then detaches it in place after the backward).
        if image_x is image_in:
            image_x = image_x.clone()
        if text_x is text_in:
            text_x = text_x.clone()
        outputs = (image_x, text_x)
        if self.pass_tokens:
            outputs += (tokens.clone(),)
        return outputs


def split_stage_output(output: torch.Tensor, embed_dim: int):
    """The last stage's packed [b, 2D+1] output -> (image features, text features, log temperature);
    with the sigmoid loss's bias [b, 2D+2] -> (.., .., [log temperature, bias])."""
    scalars = output[0, 2 * embed_dim] if output.shape[1] == 2 * embed_dim + 1 else output[0, 2 * embed_dim:]
    return output[:, :embed_dim], output[:, embed_dim : 2 * embed_dim], scalars


def build_stage_module(model: nn.Module, spec: StageSpec, copy_model: bool = True) -> FLIPStage:
    """The part of `model` (a `FLIPModel`, best on the meta device) that stage `spec` holds.

    With `copy_model` (default) the model is deep-copied first (free on the meta device), so several
    stages can be cut from one model; otherwise `model` itself is taken apart.
    """
    visual, text = model.visual, model.text
    if spec.vision_blocks[1] > len(visual.blocks) or spec.text_blocks[1] > len(text.blocks):
        raise ValueError(
            f"stage {spec.index} holds image blocks {spec.vision_blocks} and text blocks {spec.text_blocks}, but the "
            f"model has {len(visual.blocks)} image and {len(text.blocks)} text blocks; split the same architecture"
        )
    if copy_model:
        model = copy.deepcopy(model)
    visual, text = model.visual, model.text
    for tower, keep in ((visual, spec.vision_range), (text, spec.text_range)):
        for name in list(tower.blocks.keys()):
            if int(name) not in keep:
                del tower.blocks[name]
    if not spec.is_first:
        visual.patch_embed = None
        visual.cls_token = None
        visual.pos_embed = None
        visual.ln_pre = None
        text.token_embedding = None
        text.pos_embed = None
    if not spec.is_last:
        visual.ln_post = None
        visual.proj = None
        text.ln_final = None
        text.proj = None
    return FLIPStage(
        visual, text, model.logit_scale if spec.is_last else None, spec,
        pass_tokens=bool(text.pad_mask or text.causal or text.pool == "argmax"), logit_scale_max=getattr(model, "logit_scale_max", None),
        logit_bias=getattr(model, "logit_bias", None) if spec.is_last else None,
        has_logit_bias=getattr(model, "logit_bias", None) is not None,
    )


def stage_state_dict(full_state_dict: dict, stage: nn.Module) -> dict:
    """The entries of a whole-model state dict that `stage` holds (to initialise or load a stage)."""
    keys = set(stage.state_dict().keys())
    return {key: value for key, value in full_state_dict.items() if key in keys}
