"""Anti-collapse regularisers on a batch of embeddings z (B, D); not part of I-JEPA as published.

    reg_loss(name, z, step) -> ()      "vicreg" | "sigreg"; pipeline.models.ijepa adds weight * it to the loss

Both read one embedding per image: the context encoder's output average-pooled over its kept tokens,
what C-JEPA (Mo & Tong 2024, arXiv 2410.19560) and LeJEPA (Balestriero & LeCun 2025, arXiv 2511.08544)
regularise. Both are computed in float32 with autocast off: the hinge's square root and SIGReg's
cos/sin of t * x lose too much in bf16.

VICReg (Bardes et al. 2022), its variance and covariance terms; the invariance term is I-JEPA's own
prediction loss. VICReg weighs invariance : variance : covariance as 25 : 25 : 1, so with the prediction
loss at weight 1, `vicreg = variance + COV_WEIGHT * covariance` with COV_WEIGHT = 1/25 keeps VICReg's
balance at `optim.reg_weight = 1`.

SIGReg (LeJEPA): z is projected on K random unit directions, and each 1-D projection x (B,) is tested
against N(0, 1) by the Epps-Pulley statistic

    EP(x) = B * integral over t of |phi_B(t) - exp(-t^2 / 2)|^2 w(t) dt,   phi_B(t) = mean_b exp(i t x_b)

with the weight w(t) = exp(-t^2 / 2), on [-T_MAX, T_MAX] by the trapezoid rule over KNOTS points of
[0, T_MAX] (the integrand is even, so the negative half doubles the weights), as LeJEPA's code does.
Multiplying by B makes the value batch-size free under the null: E[EP] = integral (1 - exp(-t^2)) w dt
~ 1.0 for Gaussian samples at any B, while a collapsed batch grows as B. SIGReg is the mean of EP over
the K directions. The directions are drawn from a generator seeded by the training step on z's device:
fresh each step (LeJEPA draws new ones every step), the same on every rank and on a rerun. Each rank
tests its own slice of the batch (LeJEPA all-reduces the characteristic functions instead).

Scale. At `optim.reg_weight = 1` SIGReg dominates: on the demo config at init (batch 32) the gradient
norm on the encoder is ~0.003 from the prediction loss, ~0.2 from vicreg and ~35 from sigreg (the pooled
features start with std ~0.17 and mean ~0.7 per dim, far from N(0, 1)). On the demo's 64 scenes of one
batch, the seed-0 init: 0.005 from the prediction loss, 122 from sigreg on the pooled features and 541 on
the centred patches (960 tokens; the statistic grows with its sample count). AdamW rescales each
parameter's step, so while one term's gradient dominates the weight hardly moves the encoder's updates.
LeJEPA's own example weighs SIGReg 0.02 against 0.98 of its invariance loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

VAR_EPS = 1e-4  # VICReg's epsilon inside the std
COV_WEIGHT = 1.0 / 25.0  # VICReg's covariance : variance weights, 1 : 25
SIGREG_DIRECTIONS = 256  # LeJEPA's default number of slices
T_MAX, KNOTS = 3.0, 17  # LeJEPA's quadrature: exp(-t^2/2) is 0.011 at t = 3
SIGREG_SEED = 0x5EED  # added to the step: the directions' generator seed


def vicreg_variance(z: Tensor) -> Tensor:
    """z (B, D) -> (): mean over dims of relu(1 - sqrt(var + eps)), the variance across the batch."""
    std = torch.sqrt(z.var(dim=0) + VAR_EPS)
    return torch.relu(1.0 - std).mean()


def vicreg_covariance(z: Tensor) -> Tensor:
    """z (B, D) -> (): sum of the squared off-diagonal entries of the covariance (D, D), divided by D."""
    B, D = z.shape
    zc = z - z.mean(dim=0)
    cov = (zc.T @ zc) / (B - 1)
    off = cov.square().sum() - cov.diagonal().square().sum()
    return off / D


def vicreg(z: Tensor, step: int = 0) -> Tensor:
    """z (B, D), B >= 2 -> (): variance + COV_WEIGHT * covariance. `step` is unused (no randomness)."""
    return vicreg_variance(z) + COV_WEIGHT * vicreg_covariance(z)


def _quadrature(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Knots t (KNOTS,) on [0, T_MAX], N(0, 1)'s characteristic function there, and the trapezoid weights
    times w(t), doubled for the negative half (KNOTS,)."""
    t = torch.linspace(0.0, T_MAX, KNOTS, device=device)
    phi = torch.exp(-t.square() / 2)
    dt = T_MAX / (KNOTS - 1)
    trap = torch.full((KNOTS,), 2 * dt, device=device)
    trap[[0, -1]] = dt  # t = 0 is shared by both halves; t = T_MAX is each half's end
    return t, phi, trap * phi


def epps_pulley(x: Tensor) -> Tensor:
    """x (B, K): K samples of B values -> (K,) the Epps-Pulley statistic of each against N(0, 1)."""
    t, phi, weights = _quadrature(x.device)
    xt = x.unsqueeze(-1) * t  # (B, K, KNOTS)
    err = (xt.cos().mean(0) - phi).square() + xt.sin().mean(0).square()  # (K, KNOTS)
    return (err @ weights) * x.size(0)


def directions(dim: int, step: int, device: torch.device, k: int = SIGREG_DIRECTIONS) -> Tensor:
    """(dim, k) unit columns, a function of (step, device type) only."""
    g = torch.Generator(device=device).manual_seed(SIGREG_SEED + step)
    a = torch.randn(dim, k, generator=g, device=device)
    return a / a.norm(dim=0, keepdim=True)


def sigreg(z: Tensor, step: int = 0) -> Tensor:
    """z (B, D) -> (): mean over SIGREG_DIRECTIONS random unit directions of the Epps-Pulley statistic of
    the projections z @ a (B,) against N(0, 1); the directions are those of `step`."""
    return epps_pulley(z @ directions(z.size(1), step, z.device)).mean()


BY_NAME: dict[str, Callable[[Tensor, int], Tensor]] = {"vicreg": vicreg, "sigreg": sigreg}


def reg_loss(name: str, z: Tensor, step: int = 0) -> Tensor:
    """The regulariser `name` (a key of BY_NAME) of z (B, D) at training step `step` -> () float32."""
    if name not in BY_NAME:
        raise ValueError(f"regulariser {name!r} is not allowed; expected one of {sorted(BY_NAME)}")
    with torch.autocast(z.device.type, enabled=False):
        return BY_NAME[name](z.float(), step)


def gaussian_floor() -> float:
    """E[EP] for N(0, 1) samples under this quadrature: sum of (1 - exp(-t^2)) times the weights (~1.0)."""
    t, _, weights = _quadrature(torch.device("cpu"))
    return float(((1 - torch.exp(-t.square())) * weights).sum())

