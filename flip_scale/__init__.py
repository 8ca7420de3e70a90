"""flip_scale: FLIP (masked CLIP) training at scale."""

__version__ = "0.1.0"
