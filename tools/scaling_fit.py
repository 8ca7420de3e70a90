#!/usr/bin/env python
"""Fit L(C) = a C^-b + c to the last evaluation of each run against its training compute, find the
compute-optimal frontier, and say how much less compute a masked model needs to reach a target.

    python tools/scaling_fit.py runs/sweeps/flip_effect/* --out fit.png
    python tools/scaling_fit.py runs/sweeps/flip_effect/* --metric loss --out loss_fit.png
    python tools/scaling_fit.py runs/sweeps/flip_effect/* --target 0.6 --group-by model.mask_ratio
    python tools/scaling_fit.py runs/sizes/* --group-by model.name --fixed-c 0   # pure power law of the error

For an accuracy (--metric zero_shot_top1, the default; any eval.jsonl metric in [0, 1]) the law is
fitted to the error 1 - accuracy, as in "Reproducible scaling laws for contrastive language-image
learning"; for --metric loss to the last logged training loss (which is only comparable between
runs of one mask ratio: a masked run's loss is that of masked images). Compute is the training FLOPs
until the evaluated step (the model's own count, visible tokens only). The fit is numpy least
squares (a grid over c with a linear fit in log space, then Gauss-Newton; errors from the Jacobian).

Per group (default: per model.mask_ratio) it fits the law where the group has enough runs and
prints the compute the group needs to reach --target (default: the best value of the --reference
group, i.e. "what the unmasked model reached"), from its fit and from its own frontier interpolated
in log compute, and the speed-up against the reference group: FLIP's Fig. 1 question. A fit that
did not converge to a law (b's uncertainty above b, or c < 0) is marked UNRELIABLE and its compute
figures print as "-", as does a fitted compute more than 10x past the group's largest run. Where
the reference group's cheapest run already reaches the target, the frontier speed-up is not
determined (both computes are only upper bounds).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flip_scale.config import flatten_tree  # noqa: E402
from flip_scale.studies.fit import FitError, fit_power_law, frontier, interpolated_compute_for  # noqa: E402
from flip_scale.studies.grid import format_flops  # noqa: E402
from flip_scale.studies.plots import METRIC_LABELS, plot_fit, save_figure  # noqa: E402
from flip_scale.studies.runs import RunDirError, format_value, group_order, load_run  # noqa: E402

# A fit's compute for the target further than this past the group's largest run is not printed.
EXTRAPOLATION_LIMIT = 10.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tools/scaling_fit.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--metric", default="zero_shot_top1", help="zero_shot_top1 (default), another eval.jsonl "
                                                                   "accuracy, or loss")
    parser.add_argument("--group-by", default="model.mask_ratio", help="config key whose values form the groups "
                                                                       "compared (default model.mask_ratio)")
    parser.add_argument("--reference", help="the group the others are compared with (default: the value 0 of "
                                            "--group-by if present, else the first group)")
    parser.add_argument("--target", type=float, help="the accuracy or loss to reach (default: the reference "
                                                     "group's best)")
    parser.add_argument("--fixed-c", type=float, help="fix c (e.g. 0: the pure power law a C^-b)")
    parser.add_argument("--out", help="the plot, a .png (--svg adds an SVG)")
    parser.add_argument("--svg", action="store_true")
    args = parser.parse_args(argv)
    if args.out and not args.out.endswith(".png"):
        parser.error(f"--out {args.out}: plots are PNG (name it .png)")
    return args


def last_point(run, metric: str):
    """(compute, value) of the run's last evaluation (last training record for loss), or None."""
    source = run.metrics if metric == "loss" else run.evals
    records = [r for r in source if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
    if not records:
        return None
    step = records[-1]["step"]
    return run.samples_at(step) * run.flops_per_sample, float(records[-1][metric])


def main(argv=None) -> int:
    args = parse_args(argv)
    accuracy = args.metric != "loss"
    groups: dict = {}
    for path in args.run_dirs:
        try:
            run = load_run(path)
        except RunDirError as error:
            print(f"scaling_fit: {error}", file=sys.stderr)
            return 2
        point = last_point(run, args.metric)
        if point is None:
            print(f"note: {run.name}: no {args.metric} logged, left out")
            continue
        flat = flatten_tree(run.config)
        if args.group_by not in flat:
            print(f"scaling_fit: --group-by {args.group_by}: not a config key of {run.name}", file=sys.stderr)
            return 2
        groups.setdefault(format_value(flat[args.group_by]), []).append((*point, run.name))
    groups = {k: groups[k] for k in sorted(groups, key=group_order)}
    if not groups:
        print(f"scaling_fit: no run has {args.metric}", file=sys.stderr)
        return 2
    reference = args.reference or ("0" if "0" in groups else next(iter(groups)))
    if reference not in groups:
        print(f"scaling_fit: --reference {reference} is not a group; groups: {', '.join(groups)}", file=sys.stderr)
        return 2

    def as_fitted(value):  # what the law describes: the error of an accuracy, the loss itself
        return 1.0 - value if accuracy else value

    every = [p for points in groups.values() for p in points]
    what = f"error (1 - {args.metric})" if accuracy else args.metric
    print(f"{len(every)} runs, {args.metric} of the last evaluation against training compute, grouped by {args.group_by}")
    for name, points in groups.items():
        for compute, value, run_name in sorted(points):
            print(f"  {args.group_by}={name}  {run_name}: {format_flops(compute)}  {args.metric} {value:.4f}")

    on_frontier = frontier([p[0] for p in every], [as_fitted(p[1]) for p in every])
    print("compute-optimal frontier (no run reaches as good a value with as little compute): "
          + ", ".join(every[i][2] for i in on_frontier))

    fits = {}
    for name, points in groups.items():
        needed = 2 if args.fixed_c is not None else 3
        if len(points) < needed:
            print(f"fit {args.group_by}={name}: {len(points)} runs, too few for the law (need {needed})")
            continue
        try:
            fits[name] = fit_power_law([p[0] for p in points], [as_fitted(p[1]) for p in points], fixed_c=args.fixed_c)
        except FitError as error:
            print(f"fit {args.group_by}={name}: {error}")
            continue
        note = " (as many runs as parameters: exact, no uncertainty)" if len(points) == needed else ""
        doubts = fits[name].doubts()
        if doubts:
            note += f"; UNRELIABLE ({'; '.join(doubts)}): its compute figures are not printed"
        print(f"fit {args.group_by}={name}: {fits[name].describe(what)}{note}")

    best = (max if accuracy else min)(p[1] for p in groups[reference])
    target = args.target if args.target is not None else best
    print(f"target {args.metric} {target:.4f} ({'given' if args.target is not None else f'best of {args.group_by}={reference}'})")
    needs, far = {}, []
    for name, points in groups.items():
        interpolated = interpolated_compute_for([p[0] for p in points], [p[1] for p in points], target,
                                                lower_is_better=not accuracy)
        fitted = math.nan
        if name in fits and not fits[name].doubts():
            fitted = fits[name].compute_for(as_fitted(target))
            if math.isfinite(fitted) and fitted > EXTRAPOLATION_LIMIT * max(p[0] for p in points):
                fitted = math.nan  # far past the group's largest run: the law says nothing there
                far.append(name)
        cheapest = min(points)[1]
        already = cheapest >= target if accuracy else cheapest <= target
        needs[name] = (interpolated, fitted, already)
    if far:
        print(f"note: the fit of {', '.join(f'{args.group_by}={n}' for n in far)} reaches the target only past "
              f"{EXTRAPOLATION_LIMIT:g}x its largest run's compute: not printed")
    ref_interp, ref_fit, ref_already = needs[reference]
    for name, (interpolated, fitted, already) in needs.items():

        def ratio(ref, own):
            return f"{ref / own:.2f}x" if math.isfinite(ref) and math.isfinite(own) and own > 0 else "-"

        def flops(value):
            return format_flops(value) if math.isfinite(value) else ("not reached" if value == math.inf else "-")

        # Where a group's cheapest run already reaches the target, its compute is an upper bound: the
        # ratio to the reference is a lower bound, and nothing at all where the reference's is one too.
        bound = "at most " if already else ""
        if ref_already:
            frontier_ratio = "not determined (the reference's cheapest run already reaches the target)"
        else:
            frontier_ratio = ("at least " if already else "") + ratio(ref_interp, interpolated)
        print(f"  {args.group_by}={name}: needs {bound}{flops(interpolated)} (runs' frontier), {flops(fitted)} (fit); "
              f"speed-up over {args.group_by}={reference}: {frontier_ratio} (frontier), "
              f"{ratio(ref_fit, fitted)} (fit)")

    if args.out:
        plotted = {f"{args.group_by}={k}": ([p[0] for p in v], [p[1] for p in v]) for k, v in groups.items()}
        fitted_curves = {f"{args.group_by}={k}": fit for k, fit in fits.items()}
        frontier_points = [(every[i][0], every[i][1]) for i in on_frontier]
        fig = plot_fit(plotted, fitted_curves, frontier_points, METRIC_LABELS.get(args.metric, args.metric),
                       target=target, accuracy=accuracy)
        files = save_figure(fig, args.out, svg=args.svg)
        print("wrote " + ", ".join(map(str, files)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
