"""Zero-shot classification and retrieval: the public names of `flip_scale.evaluation`, and the
`flip-eval` entry point.

    flip-eval --checkpoint runs/tiny                      # the run's own eval data
    flip-eval --checkpoint exports/l16 --dataset /data/imagenet/val --classnames names.txt --templates openai
    torchrun --nproc_per_node 4 -m flip_scale.evaluate --checkpoint runs/g14 ... parallel.tp=2

`flip-eval --help` lists the options. Evaluation runs the model unmasked (eval mode) unless a mask
ratio is asked for (`mask_ratio=` / `--masked`: the training-time view of the images).
"""

from __future__ import annotations

import sys

from .evaluation import (  # noqa: F401 - re-exported
    FLIP_SHORT_TEMPLATES, OPENAI_IMAGENET_TEMPLATES, TEMPLATE_SETS, EvalGroup, build_zero_shot_classifier, caption_key,
    classifier_from_text_features, correct_at_k, describe, eval_mode, evaluation_mode, load_classnames,
    load_templates, lockstep_batches, log_values, recall_at_k, retrieval_hits, retrieval_recall, run_evaluation,
    run_retrieval, run_zero_shot, topk_correct, zero_shot_accuracy,
)
from .evaluation.cli import main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
