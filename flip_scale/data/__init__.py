"""Data pipeline: webdataset shards -> augmented images + tokens, split by data-parallel rank.

`data` knows no model: it gets the data-parallel rank and size as numbers (docs/design.md section 2);
evaluation datasets live in flip_scale.evaluation.
"""

from .loader import TrainLoader, TrainStream, build_train_loader
from .shards import DataError, assign_shards, expand_shards, read_tar_samples
from .synthetic import class_names, ensure_synthetic_data, write_synthetic_dataset
from .openclip_tokenizer import OpenClipTokenizer, TokenizerError, is_openclip
from .tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, Tokenizer, build_tokenizer, train_tokenizer
from .transforms import EvalTransform, TrainTransform, build_eval_transform, build_train_transform

__all__ = [
    "BOS_ID", "EOS_ID", "PAD_ID", "UNK_ID",
    "DataError",
    "EvalTransform",
    "OpenClipTokenizer", "Tokenizer", "TokenizerError",
    "TrainLoader", "TrainStream", "TrainTransform",
    "assign_shards",
    "build_eval_transform", "build_tokenizer", "build_train_loader", "build_train_transform",
    "class_names",
    "ensure_synthetic_data",
    "expand_shards",
    "is_openclip",
    "read_tar_samples",
    "train_tokenizer",
    "write_synthetic_dataset",
]
