"""LR / weight-decay / EMA-momentum schedules as in the official I-JEPA code."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.config import OptimConfig


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, start_lr: float, ref_lr: float,
                  final_lr: float) -> float:
    """Linear start_lr -> ref_lr over warmup_steps, then cosine ref_lr -> final_lr until total_steps."""
    if step < warmup_steps:
        return start_lr + step / max(1, warmup_steps) * (ref_lr - start_lr)
    rest = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / rest)
    return final_lr + (ref_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine(step: int, total: int, start: float, end: float) -> float:
    """Cosine from start (step 0) to end (step >= total): weight decay 0.04 -> 0.4."""
    progress = min(1.0, step / max(1, total))
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def linear(step: int, total: int, start: float, end: float) -> float:
    """Linear from start to end over total steps, clamped: EMA momentum 0.996 -> 1.0."""
    return start + (end - start) * min(1.0, step / max(1, total))


@dataclass(frozen=True)
class Schedules:
    """All per-step schedules; total steps = ipe_scale * epochs * steps_per_epoch, as officially.

    `step` is the 0-based optimiser step. The official loop advances its lr and weight-decay schedulers
    BEFORE using them (`scheduler.step()` opens each iteration), so iteration k runs with f(k + 1); its EMA
    momentum comes from a generator read after the optimiser step, so iteration k uses m(k). Same here.
    """

    optim: OptimConfig
    steps_per_epoch: int
    epochs: int

    @property
    def total_steps(self) -> int:
        return int(self.optim.ipe_scale * self.epochs * self.steps_per_epoch)

    @property
    def warmup_steps(self) -> int:
        return int(self.optim.warmup_epochs * self.steps_per_epoch)

    def lr(self, step: int) -> float:
        o = self.optim
        return warmup_cosine(step + 1, self.warmup_steps, self.total_steps, o.start_lr, o.lr, o.final_lr)

    def wd(self, step: int) -> float:
        return cosine(step + 1, self.total_steps, self.optim.weight_decay, self.optim.final_weight_decay)

    def momentum(self, step: int) -> float:
        return linear(step, self.total_steps, *self.optim.ema)
