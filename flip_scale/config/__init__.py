"""Typed configuration: dataclasses, YAML recipes with `_base_:` inheritance, `key.sub=value` overrides.

Every recipe is resolved into one `Config` before anything is built. Unknown keys, wrong types and
out-of-range values are refused with a message that names the key, the value and what is valid.
An option with a fixed set of values is typed `Literal[...]`: its type is the list of choices.
This package imports nothing else of flip_scale (docs/design.md section 2); `checking.py` holds the
type checking of a tree against these dataclasses and the checks of values and their combinations.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .checking import (
    ConfigError, _build, _choice_message, _is_choice, check_attentive, check_locks, check_ranges, check_reconstruction,
    resolve_loss_parameters,
)


@dataclass
class TrainConfig:
    max_steps: int = 1000
    global_batch_size: int = 256
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast where supported
    log_every_steps: int = 10
    deterministic: bool = False
    # How long a collective may wait, after the first step, before the process group reports a hang
    # (and how long the per-rank watchdog lets a step take): long enough for the ranks' skew in a
    # checkpoint write. A dead or hung rank makes the others exit within it (flip_scale/watchdog.py).
    collective_timeout_minutes: float = 30
    collective_timeout_seconds: float = 0.0  # > 0: this many seconds instead of the minutes (tests)
    # Start-up, the first step (compilation, data workers, a resume's read), checkpoint saves and
    # evaluations skew the ranks more: they get this longer allowance.
    init_timeout_minutes: float = 60
    # Loss spikes (flip_scale/spikes.py): a step whose loss exceeds spike_factor x the median of the
    # last spike_window steps is written with the shard and key of every sample to RUN_DIR/spikes.jsonl
    # (0: off; on, it costs one all-reduce of the loss per step).
    spike_factor: float = 0.0
    spike_window: int = 50
    # --init-from loads only these towers ("visual", "text"); the others keep their initial weights
    # (LiT: a pre-trained image tower, a text tower from scratch). Empty: the whole model.
    init_from_parts: list = field(default_factory=list)


@dataclass
class ModelConfig:
    name: str = "tiny"  # registry name: tiny, B/16, L/16, H/14, G/14
    mask_ratio: float = 0.5
    # The token-removal strategy: random (FLIP) | attentive (A-CLIP: an EMA copy of the image tower,
    # run unmasked, scores the patches by its last block's CLS attention; models/attentive.py).
    masking: Literal["random", "attentive"] = "random"
    ema_decay: float = 0.999  # attentive: ema = decay * ema + (1 - decay) * online after every step
    attentive_keep_fraction: float = 0.5  # attentive: share of the visible patches chosen by score
    # Text token removal in training (FLIP Table 1c): 0 off; prioritized removes padding first.
    text_mask_ratio: float = 0.0
    text_masking: Literal["random", "prioritized"] = "random"
    # avg_patches (OpenCLIP pool_type=avg) | avg_all (FLIP's code) | cls
    vision_pool: Literal["avg_patches", "avg_all", "cls"] = "avg_patches"
    text_pad_mask: bool = False  # FLIP's code attends to padding; true masks it out
    text_causal: bool = False  # CLIP-style: causal mask + end-of-text pooling
    # OpenCLIP's ViT CLIP family (defaults: FLIP's). sincos: fixed 2-D table on the patches; learned:
    # a trained [1 + L, width] table, row 0 on the CLS token (OpenCLIP's positional_embedding).
    vision_pos_embed: Literal["sincos", "learned"] = "sincos"
    vision_ln_pre: bool = False  # a LayerNorm on the tokens before the image blocks (OpenCLIP's ln_pre)
    act: Literal["gelu", "quick_gelu"] = "gelu"  # the MLP activation of both towers
    # auto: first token (non-causal) / last non-padding token (causal); argmax: the position of the
    # highest token id (OpenCLIP's text pooling; its end-of-text token has the highest id)
    text_pool: Literal["auto", "argmax"] = "auto"
    image_size: Optional[int] = None  # None: the registry's size
    context_length: int = 32
    vocab_size: Optional[int] = None  # None: the registry's size; must be >= the tokenizer's
    # Architecture overrides (None: the registry's value for `name`).
    embed_dim: Optional[int] = None
    patch_size: Optional[int] = None
    vision_width: Optional[int] = None
    vision_layers: Optional[int] = None
    vision_heads: Optional[int] = None
    vision_mlp_dim: Optional[int] = None
    vision_mlp_ratio: Optional[float] = None  # MLP width int(vision width * ratio), as OpenCLIP (bigG: 4.9231)
    text_width: Optional[int] = None
    text_layers: Optional[int] = None
    text_heads: Optional[int] = None
    text_mlp_dim: Optional[int] = None
    norm_eps: float = 1e-6
    logit_scale_init: float = 2.659260036932778  # log(1 / 0.07)
    logit_scale_max: float = 4.605170185988092  # log(100)
    # The learnable logit bias of the sigmoid loss (SigLIP): None under loss.kind contrastive (no such
    # parameter); loss.kind sigmoid fills in -10 and, where logit_scale_init is still log(1/0.07),
    # log(10), as the SigLIP paper.
    logit_bias_init: Optional[float] = None
    # Locked towers (LiT, flip_scale/models/lock.py; OpenCLIP's --lock-image* / --lock-text* flags):
    # a locked tower's parameters are frozen; unlocked_blocks / unlocked_layers leave the last N of
    # OpenCLIP's groups trainable (1: the projection, 2: + the last block and final LayerNorm, ...);
    # the norm flags keep the unlocked groups' LayerNorms frozen too.
    lock_vision: bool = False
    lock_vision_unlocked_blocks: int = 0
    lock_vision_norm: bool = False
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0
    lock_text_freeze_layer_norm: bool = False
    # MAE's light decoder (models/decoder.py), built only when loss.mae_weight > 0; MAE's default
    # shape (8 blocks of width 512, 16 heads, MLP 4x).
    decoder_layers: int = 8
    decoder_width: int = 512
    decoder_heads: int = 16


@dataclass
class LossConfig:
    kind: Literal["contrastive", "sigmoid"] = "contrastive"  # sigmoid: SigLIP's pairwise loss
    # Exact global-batch contrast under micro-batching (two-pass feature cache). `per_microbatch`
    # contrasts each micro-batch alone: cheaper, but it changes the math.
    microbatch_contrast: Literal["exact", "per_microbatch"] = "exact"
    # > 0: add mae_weight x the MAE reconstruction loss of the removed patches (models/decoder.py;
    # FLIP Table 1f). 0: no decoder is built and checkpoints hold none.
    mae_weight: float = 0.0


@dataclass
class DataConfig:
    train_shards: Union[str, list] = "data/synthetic/train-{000000..000007}.tar"
    # A weighted mixture instead of train_shards: [{shards: PATTERN, weight: W, name: N}, ...]
    # (flip_scale/data/mixture.py); each row of a batch is drawn from a source with the weights.
    sources: list = field(default_factory=list)
    # Shards drawn with replacement (webdataset's resampled: each draw of a sample stream reads
    # shards chosen from (seed, draw, stream), flip_scale.data.shards.resampled_shards) instead of
    # per epoch, every shard once (the default: it sees every sample equally often). A source of
    # data.sources may say `resampled` for itself.
    resampled: bool = False
    # A sentencepiece model file, or `openclip` / `openclip:NAME`: OpenCLIP's BPE (49408 tokens; needs
    # pip install "flip_scale[openclip]"; flip_scale/data/openclip_tokenizer.py).
    tokenizer: str = "data/synthetic/tokenizer.model"
    synthetic: bool = False  # write synthetic shards + tokenizer if `train_shards` do not exist
    synthetic_dir: str = "data/synthetic"
    synthetic_train_samples: int = 4096
    synthetic_eval_samples: int = 512
    num_workers: int = 2
    # Sample streams the global batch is drawn from, the same under every layout (0: chosen from the
    # data: a divisor of the global batch with many divisors, at most the shard count and 64, so a
    # fresh run under every data-parallel size dividing it draws the same batches; a resumed run
    # keeps its checkpoint's). A run resumes sample for sample under any layout whose
    # data-parallel size divides it: give one with many divisors (e.g. 256) for runs that may grow.
    streams: int = 0
    shuffle_buffer: int = 1000
    max_bad_fraction: float = 0.05  # stop when more than this fraction of samples is unreadable
    bad_check_after: int = 200  # ... judged only after this many samples
    # A remote shard (pipe:, http(s)://) that fails while read is opened again this many times,
    # then counted as a bad shard and skipped.
    shard_retries: int = 2
    # Sample fields (tar member suffixes): images tried in this order; the caption is a field's
    # text ("txt") or a JSON member and a path in it ("json:caption", as img2dataset writes).
    image_keys: str = "jpg;jpeg;png;webp"
    caption_key: str = "txt"
    min_image_size: int = 0  # images with a side below this many pixels are skipped (counted)
    # Training images decoded and cropped by Pillow (default) or by torchvision.io's libjpeg-turbo and
    # torchvision's resized crop on uint8 tensors: ~1.9x less CPU per image, slightly other pixels
    # (needs torchvision; flip_scale/data/torchvision_decode.py).
    image_decoder: Literal["pillow", "torchvision"] = "pillow"
    crop_scale_min: float = 0.5
    crop_scale_max: float = 1.0
    hflip: bool = True
    mean: list = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list = field(default_factory=lambda: [0.229, 0.224, 0.225])


@dataclass
class OptimConfig:
    name: Literal["adamw"] = "adamw"
    lr: Optional[float] = None  # None: base_lr * global_batch_size / 256
    base_lr: float = 4e-6
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.2
    grad_clip: float = 1.0  # 0 disables clipping
    grad_accum_steps: int = 1
    # A step whose gradient norm is not finite never reaches the weights: it is skipped (the lr
    # schedule moves on), logged and counted; more than this many such steps in a row stop the run
    # with the weights and checkpoints untouched.
    max_nonfinite_steps: int = 3
    # Fused AdamW kernel where the device has one (auto); YAML's unquoted true/false are read as "true"/"false".
    fused: Literal["auto", "true", "false"] = "auto"


@dataclass
class ScheduleConfig:
    name: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr: float = 0.0


@dataclass
class ParallelConfig:
    # fsdp: the native engine (FSDP2 ZeRO-3 + tensor + pipeline parallel); deepspeed: DeepSpeed ZeRO
    # 1/2/3, data parallel only (flip_scale/engine/deepspeed.py; README "Choosing an engine").
    engine: Literal["fsdp", "deepspeed"] = "fsdp"
    dp_replicate: int = 1
    dp_shard: int = -1  # -1: whatever the world size leaves
    tp: int = 1
    pp: int = 1
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = "1f1b"
    # Pipeline micro-batches per step; 0 (not set): 2 x parallel.pp under pipeline parallel (logged), else 1.
    microbatches: int = 0
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    activation_checkpointing_every: int = 2  # selective: every k-th block
    activation_checkpointing_towers: Literal["both", "vision", "text"] = "both"  # the towers it applies to
    # torch.compile of every transformer block (after checkpointing, before sharding, as torchtitan);
    # meant for GPUs, where it fuses the norms, GELU and residual adds: measure before relying on it.
    compile: bool = False
    param_dtype: Literal["bf16", "fp32"] = "bf16"  # FSDP MixedPrecisionPolicy on GPU
    reduce_dtype: Literal["bf16", "fp32"] = "fp32"
    cpu_offload: bool = False  # fsdp: FSDP2's CPUOffloadPolicy (deepspeed: offload_optimizer / offload_params)
    # fsdp with optim.grad_accum_steps > 1: reduce-scatter the gradients after every micro-batch
    # (true) or only after the last, holding unsharded fp32 gradients in between (false); auto:
    # true once those would exceed 1 GiB per rank (parallel/memory.py).
    reduce_every_microbatch: Literal["auto", "true", "false"] = "auto"
    # --- parallel.engine: deepspeed (refused with the native engine where they would change nothing)
    zero_stage: Literal[1, 2, 3] = 2  # 1: optimizer states, 2: + gradients, 3: + parameters sharded
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"  # ZeRO-Offload / ZeRO-Infinity (DeepSpeed's CPU Adam)
    offload_params: Literal["none", "cpu", "nvme"] = "none"  # ZeRO-3 only
    nvme_path: str = ""  # a local NVMe directory, for offload_* = nvme
    # A DeepSpeed JSON merged on top of the config generated from these keys, for what they do not
    # model (ZeRO++ zero_hpz_partition_size / zero_quantized_weights / zero_quantized_gradients,
    # communication settings, bucket sizes); a key that contradicts this config is refused.
    deepspeed_config: str = ""


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    keep_last: int = 3
    keep_every: int = 0  # also keep every M-th step (0: none)
    async_save: bool = False
    # A save that fails (no space, permission, I/O error) is logged, `latest` keeps naming the
    # previous checkpoint, training goes on and the next save tries again; required: stop instead
    # (exit 1). More than max_failed_saves failures in a row stop the run too.
    required: bool = False
    max_failed_saves: int = 3


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    # Peak dense bf16 TFLOP/s of one accelerator, for the logged MFU (0: known GPUs by name, else no MFU).
    peak_tflops: float = 0.0


@dataclass
class EvalConfig:
    every_steps: int = 0  # 0: only at the end
    at_end: bool = True
    zero_shot_shards: Union[str, list] = ""  # shards whose samples carry `cls`, or an image folder root/<class>/*.jpg
    classnames: str = ""  # one per line; shards need it, a folder names its classes (sorted) unless given
    retrieval_shards: Union[str, list] = ""  # image-caption shards: image<->text recall@1/5/10
    templates: str = "flip_short"  # flip_short (7) | openai (80) | a path, one template per line with {}
    batch_size: int = 256
    max_samples: int = 0  # 0: all
    # Masked-view ensemble (FLIP Table 1d), reported beside the full-image numbers: 0 off, N >= 2
    # views whose image embedding is the mean of N masked views; ratio 0: 1 - 1/N (the views tile the image).
    masked_views: int = 0
    masked_view_ratio: float = 0.0


@dataclass
class Config:
    train: TrainConfig = field(default_factory=TrainConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: Union[str, Path]) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_yaml())
        os.replace(tmp, path)


CONFIG_DIR = Path(__file__).resolve().parent.parent.parent / "configs"


# ----------------------------------------------------------------------------- type checking


def _choice_fields(cls=None, prefix: str = "") -> dict:
    """dotted key -> the values its `Literal[...]` type allows, for every such field of `cls` (Config)."""
    cls = Config if cls is None else cls
    out = {}
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            out.update(_choice_fields(tp, f"{prefix}{name}."))
        elif typing.get_origin(tp) is Literal:
            out[f"{prefix}{name}"] = typing.get_args(tp)
    return out


# ----------------------------------------------------------------------------- YAML + overrides


def merge_trees(base: dict, update: dict) -> dict:
    """`update` over `base`, key by key into nested mappings (a recipe over its `_base_`); a new tree,
    the inputs are not changed (nested mappings that only `base` has are shared, not copied)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_trees(out[key], value)
        else:
            out[key] = value
    return out


def resolve_config_path(path: Union[str, Path]) -> Path:
    """A recipe path as given, else relative to the package's `configs/` folder."""
    path = Path(path)
    if path.exists():
        return path
    for candidate in (CONFIG_DIR / path, CONFIG_DIR / path.name, CONFIG_DIR / f"{path}.yaml"):
        if candidate.exists():
            return candidate
    available = ", ".join(sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))) if CONFIG_DIR.exists() else "none"
    raise ConfigError(f"config file '{path}' not found (recipes in {CONFIG_DIR}: {available})")


def load_yaml_tree(path: Union[str, Path], _seen: Optional[set] = None) -> dict:
    """Read a recipe and its `_base_` chain (a path or a list of paths, relative to the file)."""
    path = resolve_config_path(path)
    seen = set() if _seen is None else _seen
    real = path.resolve()
    if real in seen:
        raise ConfigError(f"_base_ cycle: {path} includes itself")
    seen = seen | {real}
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of sections, got {type(data).__name__}")
    bases = data.pop("_base_", None)
    if bases is None:
        return data
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else list(bases):
        base_path = (path.parent / base) if not Path(base).is_absolute() else Path(base)
        if not base_path.exists():
            base_path = resolve_config_path(base)
        merged = merge_trees(merged, load_yaml_tree(base_path, seen))
    return merge_trees(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.sub=value (e.g. train.max_steps=100)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has no key")
    value = yaml.safe_load(raw) if raw.strip() != "" else ""
    return key.split("."), value


def apply_overrides(tree: dict, overrides) -> dict:
    tree = merge_trees({}, tree)
    for text in overrides or []:
        parts, value = parse_override(text)
        node = tree
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return tree


def validate(cfg: Config) -> Config:
    # A Config built in code (not through config_from_dict) has not met `_coerce`: check its choices.
    for dotted, options in _choice_fields().items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if not _is_choice(value, options):
            raise ConfigError(_choice_message(dotted, value, options))
    resolve_loss_parameters(cfg, ModelConfig.logit_scale_init)
    check_locks(cfg)
    check_ranges(cfg)
    check_reconstruction(cfg)
    check_attentive(cfg)
    if cfg.parallel.microbatches == 0:
        # Resolved here, so that every part (and the saved config.yaml) sees the number that runs.
        cfg.parallel.microbatches = 2 * cfg.parallel.pp if cfg.parallel.pp > 1 else 1
        cfg.parallel.microbatches_from_default = cfg.parallel.pp > 1
    return cfg


def config_from_dict(tree: dict) -> Config:
    return validate(_build(Config, tree, ""))


def flatten_tree(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: the dotted keys of a config tree (as overrides name them)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten_tree(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def load_config(path: Union[str, Path, None] = None, overrides=None) -> Config:
    """Load a recipe (default `configs/tiny.yaml`), apply `key.sub=value` overrides, validate."""
    tree = load_yaml_tree(path if path is not None else CONFIG_DIR / "tiny.yaml")
    tree = apply_overrides(tree, overrides)
    return config_from_dict(tree)


def collective_timeouts(cfg: Config) -> tuple[float, float]:
    """(seconds before the first step has finished and during saves / evaluations, seconds after):
    train.init_timeout_minutes (at least the short one) and train.collective_timeout_seconds, else
    train.collective_timeout_minutes."""
    short = cfg.train.collective_timeout_seconds or cfg.train.collective_timeout_minutes * 60
    return max(cfg.train.init_timeout_minutes * 60, short), short


def effective_lr(cfg: Config) -> float:
    """Peak learning rate: `optim.lr` if set, else the linear scaling rule base_lr x batch / 256."""
    if cfg.optim.lr is not None:
        return cfg.optim.lr
    return cfg.optim.base_lr * cfg.train.global_batch_size / 256
