"""Is a margin real? The paired comparison of two encoders scored on the same test items.

Both encoders' probes predict the same val images, so their top-1 hits are paired: the noise of the
difference is that of the items on which they disagree, not of two independent accuracies (on 800
images and ~20 % accuracy an independent comparison would need ~4 points; a paired one often less).

    paired_margin(hits_a, hits_b)  # the demo's linear probe, I-JEPA vs random init
    -> {"margin": 1.75, "ci95_low": -1.09, "ci95_high": 4.59, "p_value": 0.26, "n": 800}

`margin` is top-1(a) - top-1(b) in points; the 95 % interval is the normal approximation of the mean
paired difference; `p_value` is the two-sided exact McNemar test (a binomial test on the discordant
items): p > 0.05 means the margin is within what the choice of val images alone would produce.
`paired_errors` does the same for a per-image error (depth AbsRel): margin = mean error of b minus
that of a (positive: a is better), and the sign test on the images where they differ (the same
binomial test).
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

HITS = "hits"  # the key under which a probe result carries its per-item top-1 hits (n,) bool
ERRORS = "abs_rel_per_image"  # ... and a depth result its per-image AbsRel (n,)


def mcnemar_p(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: `a_only` items right under a alone, `b_only` under b alone."""
    n, k = a_only + b_only, min(a_only, b_only)
    if n == 0:
        return 1.0
    term = total = 1  # C(n, 0); exact integers, then one division
    for i in range(1, k + 1):
        term = term * (n - i + 1) // i
        total += term
    return min(1.0, 2 * total / 2**n)


def _paired(d: Tensor) -> dict[str, float]:
    """Per-item differences d (n,), positive where a did better -> mean, its 95 % interval (normal
    approximation), the two-sided binomial p on the items where d != 0, n."""
    n = len(d)
    margin = d.mean().item()
    half = 1.959964 * d.std().item() / math.sqrt(n) if n > 1 else math.nan
    return {"margin": margin, "ci95_low": margin - half, "ci95_high": margin + half,
            "p_value": mcnemar_p(int((d > 0).sum()), int((d < 0).sum())), "n": n}


def _check(a: Tensor, b: Tensor, what: str) -> None:
    if a.shape != b.shape or len(a) == 0:
        raise ValueError(f"paired {what} must have the same non-zero length; got {len(a)} and {len(b)}")


def paired_margin(hits_a: Tensor, hits_b: Tensor) -> dict[str, float]:
    """hits (n,) bool for the same n items -> margin a - b (points), its 95 % interval, McNemar p, n."""
    a, b = hits_a.bool().flatten(), hits_b.bool().flatten()
    _check(a, b, "hits")
    return _paired(100 * (a.double() - b.double()))  # McNemar: the binomial test on the discordant items


def paired_errors(err_a: Tensor, err_b: Tensor) -> dict[str, float]:
    """Per-item errors (n,) of a and b on the same items -> margin mean(b - a) (positive: a better), its
    95 % interval, the two-sided sign-test p-value, n."""
    a, b = err_a.double().flatten(), err_b.double().flatten()
    _check(a, b, "errors")
    return _paired(b - a)


PER_ITEM = {HITS: ("top1", paired_margin), ERRORS: ("abs_rel", paired_errors)}  # key -> (figure, test)


def pair_up(results: dict[str, Any], a: str = "ijepa", b: str = "random") -> dict[str, Any]:
    """Take the per-item leaves (`PER_ITEM`'s keys) out of results[a] and results[b] (same nesting) and
    return their paired comparison under that nesting and the figure's name:
    {"last": {"top1": {...}}} or {"count_all": {"last": {"top1": {...}}}}. Mutates `results`."""

    def walk(x: dict[str, Any], y: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key in list(x):
            if key in PER_ITEM:
                figure, test = PER_ITEM[key]
                out[figure] = test(x.pop(key), y.pop(key))
            elif isinstance(x[key], dict):
                sub = walk(x[key], y[key])
                if sub:
                    out[key] = sub
        return out

    return walk(results[a], results[b])
