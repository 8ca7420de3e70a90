"""Evaluation: zero-shot classification and image-text retrieval, split over data-parallel ranks.

    templates.py    the FLIP (7) and OpenAI (80) ImageNet prompts; class-name and template files
    scoring.py      the arithmetic on features: classifier, correct@k, recall@k
    group.py        the data-parallel split in lockstep (padding, counts summed over ranks)
    datasets.py     image folders, `cls`-labelled shards, image-caption shards
    runner.py       a (sharded) model on those datasets; the configured evaluations
    checkpoint_eval.py  the weights of a checkpoint (flip_scale.checkpoint.sources), built on a layout and evaluated
    cli.py          `flip-eval`

`flip_scale.evaluate` re-exports the public names.
"""

from .checkpoint_eval import build_eval_model, evaluate_checkpoint
from .group import EvalGroup, lockstep_batches
from .runner import (
    build_zero_shot_classifier, describe, eval_mode, evaluation_mode, log_values, retrieval_recall, run_evaluation,
    run_retrieval, run_zero_shot, zero_shot_accuracy,
)
from .scoring import caption_key, classifier_from_text_features, correct_at_k, recall_at_k, retrieval_hits, topk_correct
from .templates import FLIP_SHORT_TEMPLATES, OPENAI_IMAGENET_TEMPLATES, TEMPLATE_SETS, load_classnames, load_templates

__all__ = [
    "EvalGroup", "FLIP_SHORT_TEMPLATES", "OPENAI_IMAGENET_TEMPLATES", "TEMPLATE_SETS",
    "build_eval_model", "build_zero_shot_classifier", "caption_key", "classifier_from_text_features", "correct_at_k", "describe",
    "eval_mode", "evaluate_checkpoint", "evaluation_mode", "load_classnames", "load_templates", "lockstep_batches", "log_values",
    "recall_at_k", "retrieval_hits", "retrieval_recall", "run_evaluation", "run_retrieval", "run_zero_shot",
    "topk_correct", "zero_shot_accuracy",
]
