"""Power laws of a metric against compute, the compute-optimal frontier, and what masking saves.

The law is L(C) = a C^-b + c (loss, or error = 1 - accuracy as in "Reproducible scaling laws for
contrastive language-image learning"; c = 0 gives that paper's pure power law). It is fitted by
least squares in L with numpy alone: for each c of a grid below the smallest L, log(L - c) is a
straight line in log C (a linear fit gives a and b); the best c of the grid starts a damped
Gauss-Newton refinement of all three, and the covariance is s^2 (J^T J)^-1 from the Jacobian at the
optimum (s^2 = residual sum of squares / (n - parameters)). C is divided by its geometric mean
while fitting so that the numbers stay well scaled; `a` is reported for C in the caller's units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np


class FitError(ValueError):
    """Points a law cannot be fitted to (too few, not positive, not decreasing)."""


@dataclass
class PowerLawFit:
    a: float
    b: float
    c: float
    a_err: float
    b_err: float
    c_err: float  # 0 where c was fixed
    rss: float  # residual sum of squares
    points: int
    c_fixed: bool

    def __call__(self, compute):
        return self.a * np.power(np.asarray(compute, dtype=float), -self.b) + self.c

    def compute_for(self, target: float) -> float:
        """The compute at which the law reaches `target` (inf where it never does: target <= c)."""
        if target <= self.c or self.a <= 0 or self.b <= 0:
            return math.inf
        return ((target - self.c) / self.a) ** (-1.0 / self.b)

    def doubts(self) -> list[str]:
        """Why the fit is not to be trusted (empty where it may be): b no larger than its own
        uncertainty, or a negative floor c for an error or loss (both signs of a fit that did not
        converge to a law, e.g. on points that do not bend like one)."""
        reasons = []
        if not self.b > 0:
            reasons.append(f"b = {self.b:.3g} <= 0 (not decreasing)")
        elif math.isfinite(self.b_err) and self.b_err > self.b:
            reasons.append(f"b's uncertainty {self.b_err:.2g} exceeds b = {self.b:.3g}")
        if not self.c_fixed and self.c < 0:
            reasons.append(f"c = {self.c:.3g} < 0, below any error or loss")
        return reasons

    def describe(self, what: str = "L") -> str:
        c_text = f"c = {self.c:.4g} (fixed)" if self.c_fixed else f"c = {self.c:.4g} +- {self.c_err:.2g}"
        return (f"{what}(C) = a C^-b + c: a = {self.a:.4g} +- {self.a_err:.2g}, b = {self.b:.4g} +- {self.b_err:.2g}, "
                f"{c_text} ({self.points} points, rss {self.rss:.3g})")


def _linear_in_logs(x_log: np.ndarray, y: np.ndarray, c: float) -> tuple[float, float, float]:
    """(log a, b, rss) of log(y - c) = log a - b x_log, the rss taken in y."""
    slope, intercept = np.polyfit(x_log, np.log(y - c), 1)
    predicted = np.exp(intercept + slope * x_log) + c
    return float(intercept), float(-slope), float(np.sum((predicted - y) ** 2))


def fit_power_law(compute, values, fixed_c: Optional[float] = None, grid_points: int = 400,
                  iterations: int = 100) -> PowerLawFit:
    """Fit values = a compute^-b + c (c free, or `fixed_c`) to points of decreasing `values`."""
    x = np.asarray(compute, dtype=float)
    y = np.asarray(values, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise FitError(f"compute and values must be two lists of the same length, got {x.shape} and {y.shape}")
    free = 2 if fixed_c is not None else 3
    if len(x) < free:
        raise FitError(f"{len(x)} points cannot fix {free} parameters (a, b{', c' if free == 3 else ''}): need "
                       f"at least {free}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and np.all(x > 0)):
        raise FitError("compute must be positive and every value finite")
    scale = float(np.exp(np.mean(np.log(x))))
    x_log = np.log(x / scale)
    if np.ptp(x_log) == 0:
        raise FitError("every point has the same compute: a law in compute needs points at several")

    if fixed_c is not None:
        if np.any(y <= fixed_c):
            raise FitError(f"with c fixed at {fixed_c} every value must be above it (min {y.min():.4g})")
        log_a, b, _ = _linear_in_logs(x_log, y, fixed_c)
        params = np.array([log_a, b])
    else:
        spread = float(np.ptp(y)) or abs(float(y.min())) or 1.0
        candidates = float(y.min()) - spread * np.geomspace(1e-4, 100.0, grid_points)
        best = min((_linear_in_logs(x_log, y, c) + (c,) for c in candidates), key=lambda t: t[2])
        params = np.array([best[0], best[1], best[3]])

    def model(p):
        c = fixed_c if fixed_c is not None else p[2]
        return np.exp(p[0] - p[1] * x_log) + c

    def jacobian(p):
        power = np.exp(p[0] - p[1] * x_log)
        columns = [power, -power * x_log]
        if fixed_c is None:
            columns.append(np.ones_like(x_log))
        return np.stack(columns, axis=1)

    rss = float(np.sum((model(params) - y) ** 2))
    damping = 1e-3
    for _ in range(iterations):  # Levenberg-Marquardt steps on (log a, b[, c])
        jac = jacobian(params)
        residual = y - model(params)
        normal = jac.T @ jac
        step = np.linalg.solve(normal + damping * np.diag(np.diag(normal) + 1e-12), jac.T @ residual)
        trial = params + step
        trial_rss = float(np.sum((model(trial) - y) ** 2))
        if trial_rss < rss:
            converged = rss - trial_rss <= 1e-14 * max(rss, 1e-300)
            params, rss, damping = trial, trial_rss, damping / 10
            if converged:
                break
        else:
            damping *= 10
            if damping > 1e10:
                break

    jac = jacobian(params)
    dof = len(x) - free
    sigma2 = rss / dof if dof > 0 else math.nan
    try:
        cov = np.linalg.inv(jac.T @ jac) * sigma2
    except np.linalg.LinAlgError:
        cov = np.full((free, free), math.nan)
    # Back to C in the caller's units: a = exp(log a) scale^b; its error by the delta method.
    log_a, b = float(params[0]), float(params[1])
    try:
        a = math.exp(log_a) * scale**b
    except OverflowError:
        raise FitError(f"the fit did not converge to a law (b = {b:.3g}, log a = {log_a:.3g} out of range): the "
                       f"points do not fall like a C^-b + c") from None
    if not (math.isfinite(a) and math.isfinite(b) and all(map(math.isfinite, params))):
        raise FitError("the fit did not converge to a law (a parameter is not finite): the points do not fall like "
                       "a C^-b + c")
    grad = np.array([a, a * math.log(scale)] + ([0.0] if free == 3 else []))  # d a / d (log a, b, c)
    a_err = math.sqrt(max(float(grad @ cov @ grad), 0.0)) if np.all(np.isfinite(cov)) else math.nan
    b_err = math.sqrt(max(float(cov[1, 1]), 0.0)) if math.isfinite(cov[1, 1]) else math.nan
    if free == 3:
        c = float(params[2])
        c_err = math.sqrt(max(float(cov[2, 2]), 0.0)) if math.isfinite(cov[2, 2]) else math.nan
    else:
        c, c_err = float(fixed_c), 0.0
    return PowerLawFit(a=a, b=b, c=c, a_err=a_err, b_err=b_err, c_err=c_err, rss=rss, points=len(x),
                       c_fixed=fixed_c is not None)


def frontier(compute, values, lower_is_better: bool = True) -> list[int]:
    """Indices of the points on the compute-optimal frontier (the lower envelope for a loss, the
    upper one with `lower_is_better=False`): no other point has at most their compute and a value
    at least as good with one of the two strictly better. Ordered by compute."""
    x = [float(v) for v in compute]
    y = [float(v) if lower_is_better else -float(v) for v in values]
    order = sorted(range(len(x)), key=lambda i: (x[i], y[i]))
    kept, best = [], math.inf
    for i in order:
        if y[i] < best:
            kept.append(i)
            best = y[i]
    return kept


def interpolated_compute_for(compute, values, target: float, lower_is_better: bool = True) -> float:
    """The compute at which a group's frontier first reaches `target`, interpolated linearly in
    log compute between its points (inf where none reaches it; the first point's compute where the
    first already does: no run was cheaper, so nothing is claimed below it)."""
    indices = frontier(compute, values, lower_is_better)
    points = [(float(compute[i]), float(values[i])) for i in indices]

    def reached(value: float) -> bool:
        return value <= target if lower_is_better else value >= target

    for k, (x, y) in enumerate(points):
        if reached(y):
            if k == 0:
                return x
            x0, y0 = points[k - 1]
            share = (target - y0) / (y - y0) if y != y0 else 1.0
            return math.exp(math.log(x0) + share * (math.log(x) - math.log(x0)))
    return math.inf
