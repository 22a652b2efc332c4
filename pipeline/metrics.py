"""Label-free representation statistics: RankMe (Garrido et al., 2023) for collapse alarms and sweeps."""

from __future__ import annotations

import torch
from torch import Tensor


def rankme(z: Tensor, eps: float = 1e-7) -> float:
    """Effective rank exp(H(p)), p = singular values of z (N, D) normalised to sum 1. In [1, min(N, D)].

    A collapsed representation (all rows equal up to scale) scores 1; isotropic noise scores near min(N, D).
    """
    s = torch.linalg.svdvals(z.detach().float())
    p = s / (s.sum() + eps) + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))
