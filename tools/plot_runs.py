#!/usr/bin/env python
"""Plot runs against each other: training loss, zero-shot accuracy, retrieval against samples seen,
training compute (FLOPs from the model's own count, visible tokens only) or wall-clock; one curve
per run, labelled by the config keys that differ between the runs (read from their config.yaml).

    python tools/plot_runs.py runs/tiny runs/tiny_mask75 --out runs.png
    python tools/plot_runs.py runs/sweeps/flip_effect/* --x time --y zero_shot_top1 --out top1_time.png
    python tools/plot_runs.py runs/a runs/b --x flops --y loss,zero_shot_top1 --smooth 0.6 --svg --out cmp.png
    python tools/plot_runs.py runs/a runs/b --out cmp.png --table cmp.html --size 1200x500
    python tools/plot_runs.py runs/sweeps/flip_effect/* --final-by model.mask_ratio --x time --y zero_shot_top1 \
        --out flip_effect_time.png        # each run's final accuracy, one curve per mask ratio

--y takes metric names of metrics.jsonl (loss, lr, logit_scale, grad_norm, ...) or eval.jsonl
(zero_shot_top1, zero_shot_top5, retrieval_i2t_r1, retrieval_t2i_r1, ...), comma-separated: one
panel each. A run whose metrics.jsonl is missing or half written is plotted up to its last complete
line, and the figure and the table say so. The summary table (--table, .html or .png; default
FIG_summary.html) lists each run's steps, samples, compute, time and final numbers.
Wall-clock is the time of the logged intervals (each one's samples / images_per_s): the final
checkpoint and final evaluation (and start-up) left out; periodic saves and evaluations inside the
run, and the first step, included.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flip_scale.studies.plots import plot_finals, plot_runs, save_figure, summary_text, write_summary  # noqa: E402
from flip_scale.studies.runs import AXES, RunDirError, load_run, run_labels  # noqa: E402


def _size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match or min(int(match.group(1)), int(match.group(2))) < 50:
        raise argparse.ArgumentTypeError(f"--size {text!r}: give WIDTHxHEIGHT in pixels, each >= 50, e.g. 1000x400")
    return int(match.group(1)), int(match.group(2))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tools/plot_runs.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="flip-train run directories")
    parser.add_argument("--out", required=True, help="the figure, a .png")
    parser.add_argument("--x", default="samples", choices=AXES, help="x axis (default samples)")
    parser.add_argument("--y", default="loss,zero_shot_top1", help="metric(s), comma-separated (default "
                                                                  "loss,zero_shot_top1)")
    parser.add_argument("--smooth", type=float, default=0.0, help="EMA smoothing of the training loss, in [0, 1)")
    parser.add_argument("--size", type=_size, default=None, help="WIDTHxHEIGHT in pixels (default 500 per panel x 400)")
    parser.add_argument("--dpi", type=int, default=100)
    parser.add_argument("--log-x", action="store_true", help="logarithmic x axis (the default for --x flops)")
    parser.add_argument("--svg", action="store_true", help="write an SVG beside the PNG")
    parser.add_argument("--final-by", metavar="KEY", help="plot each run's final value as one point and join the "
                                                          "runs of one value of KEY (e.g. model.mask_ratio)")
    parser.add_argument("--table", help="summary table (.html or .png; default: FIG_summary.html)")
    args = parser.parse_args(argv)
    if not args.out.endswith(".png"):
        parser.error(f"--out {args.out}: plots are PNG (name it .png; --svg adds an SVG)")
    if not 0.0 <= args.smooth < 1.0:
        parser.error(f"--smooth must be in [0, 1), got {args.smooth}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    runs = []
    for path in args.run_dirs:
        try:
            runs.append(load_run(path))
        except RunDirError as error:
            print(f"plot_runs: {error}", file=sys.stderr)
            return 2
    metrics = [m.strip() for m in args.y.split(",") if m.strip()]
    size = args.size or (500 * len(metrics), 400)
    labels = run_labels(runs)
    log_x = True if args.log_x else None
    if args.final_by:
        try:
            fig = plot_finals(runs, args.x, metrics, args.final_by, size=size, dpi=args.dpi, log_x=log_x)
        except ValueError as error:
            print(f"plot_runs: --final-by: {error}", file=sys.stderr)
            return 2
    else:
        fig = plot_runs(runs, args.x, metrics, size=size, dpi=args.dpi, smoothing=args.smooth, log_x=log_x,
                        labels=labels)
    files = save_figure(fig, args.out, svg=args.svg, dpi=args.dpi)
    table = write_summary(runs, args.table or str(Path(args.out).with_suffix("")) + "_summary.html", labels)
    print(summary_text(runs, labels))
    for run in runs:
        for note in run.notes:
            print(f"note: {run.name}: {note}")
    print("wrote " + ", ".join(str(f) for f in [*files, table]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
