"""Is a margin real? The paired comparison of two encoders scored on the same test items.

Both encoders' probes predict the same val images, so their top-1 hits are paired: the noise of the
difference is that of the items on which they disagree, not of two independent accuracies (on 800
images and ~20 % accuracy an independent comparison would need ~4 points; a paired one often less).

    paired_margin(hits_a, hits_b)
    -> {"margin": 1.75, "ci95_low": -0.9, "ci95_high": 4.4, "p_value": 0.21, "n": 800}

`margin` is top-1(a) - top-1(b) in points; the 95 % interval is the normal approximation of the mean
paired difference; `p_value` is the two-sided exact McNemar test (a binomial test on the discordant
items): p > 0.05 means the margin is within what the choice of val images alone would produce.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

HITS = "hits"  # the key under which a probe result carries its per-item top-1 hits (n,) bool


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


def paired_margin(hits_a: Tensor, hits_b: Tensor) -> dict[str, float]:
    """hits (n,) bool for the same n items -> margin a - b (points), its 95 % interval, McNemar p, n."""
    a, b = hits_a.bool().flatten(), hits_b.bool().flatten()
    if a.shape != b.shape or len(a) == 0:
        raise ValueError(f"paired hits must have the same non-zero length; got {len(a)} and {len(b)}")
    d = a.double() - b.double()
    n = len(d)
    margin = 100 * d.mean().item()
    half = 100 * 1.959964 * d.std().item() / math.sqrt(n) if n > 1 else math.nan
    return {"margin": margin, "ci95_low": margin - half, "ci95_high": margin + half,
            "p_value": mcnemar_p(int((a & ~b).sum()), int((b & ~a).sum())), "n": n}


def pair_up(results: dict[str, Any], a: str = "ijepa", b: str = "random") -> dict[str, Any]:
    """Take the `HITS` leaves out of results[a] and results[b] (same nesting) and return their paired
    comparison with that nesting: {"last": {...}} or {"count_all": {"last": {...}}}. Mutates `results`."""

    def walk(x: dict[str, Any], y: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key in list(x):
            if key == HITS:
                out.update(paired_margin(x.pop(HITS), y.pop(HITS)))
            elif isinstance(x[key], dict):
                sub = walk(x[key], y[key])
                if sub:
                    out[key] = sub
        return out

    return walk(results[a], results[b])
