from .flip import FLIPModel, build_model, clamp_logit_scale_, count_parameters, lock_model
from .masking import masking_noise, sample_mask_noise, split_mask_noise, visible_count
from .registry import MODEL_SIZES, FlipArch, TowerArch, arch_from_config

__all__ = [
    "FLIPModel", "build_model", "clamp_logit_scale_", "count_parameters", "lock_model", "masking_noise", "sample_mask_noise",
    "split_mask_noise", "visible_count",
    "MODEL_SIZES", "FlipArch", "TowerArch", "arch_from_config",
]
