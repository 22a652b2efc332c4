"""Schedules: lr, weight decay and EMA momentum per step, as the official loop reads them."""

import math

import pytest

from pipeline.config import OptimConfig
from pipeline.schedules import Schedules, cosine, linear, warmup_cosine


def test_warmup_cosine_values():
    assert warmup_cosine(0, 10, 100, 2e-4, 1e-3, 1e-6) == pytest.approx(2e-4)
    assert warmup_cosine(5, 10, 100, 2e-4, 1e-3, 1e-6) == pytest.approx(6e-4)
    assert warmup_cosine(10, 10, 100, 2e-4, 1e-3, 1e-6) == pytest.approx(1e-3)
    assert warmup_cosine(55, 10, 100, 2e-4, 1e-3, 1e-6) == pytest.approx((1e-3 + 1e-6) / 2)
    assert warmup_cosine(100, 10, 100, 2e-4, 1e-3, 1e-6) == pytest.approx(1e-6)
    assert warmup_cosine(500, 10, 100, 2e-4, 1e-3, 1e-6) == pytest.approx(1e-6)
    assert warmup_cosine(0, 0, 100, 2e-4, 1e-3, 1e-6) == pytest.approx(1e-3)


def test_cosine_and_linear():
    assert cosine(0, 100, 0.04, 0.4) == pytest.approx(0.04)
    assert cosine(50, 100, 0.04, 0.4) == pytest.approx(0.22)
    assert cosine(100, 100, 0.04, 0.4) == pytest.approx(0.4)
    assert linear(0, 100, 0.996, 1.0) == pytest.approx(0.996)
    assert linear(50, 100, 0.996, 1.0) == pytest.approx(0.998)
    assert linear(100, 100, 0.996, 1.0) == pytest.approx(1.0)
    assert linear(200, 100, 0.996, 1.0) == pytest.approx(1.0)


def test_schedules_from_config_with_ipe_scale():
    s = Schedules(OptimConfig(warmup_epochs=2, ipe_scale=1.25), steps_per_epoch=8, epochs=10)
    assert s.total_steps == 100 and s.warmup_steps == 16
    assert s.lr(0) == pytest.approx(2e-4 + 8e-4 / 16) and s.lr(15) == pytest.approx(1e-3)
    # the run ends (80 steps) before the schedule does: lr stays above final, momentum below 1
    assert s.lr(80) > 1e-6 and s.momentum(80) == pytest.approx(0.996 + 0.004 * 0.8)
    assert s.wd(0) == pytest.approx(cosine(1, 100, 0.04, 0.4)) and s.wd(99) == pytest.approx(0.4)
    assert s.momentum(0) == pytest.approx(0.996)
    lrs = [s.lr(i) for i in range(15, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    assert not math.isnan(s.lr(10**6))


class _OfficialWarmupCosine:
    """The official ijepa `WarmupCosineSchedule.step` / `CosineWDSchedule.step` logic, written from its
    description: advance the counter, then compute (so the first iteration gets f(1))."""

    def __init__(self, warmup, start, ref, final, total, wd0, wd1):
        self.t, self.warmup, self.start, self.ref, self.final, self.total = 0, warmup, start, ref, final, total
        self.wd0, self.wd1 = wd0, wd1

    def step(self):
        self.t += 1
        if self.t < self.warmup:
            lr = self.start + self.t / max(1, self.warmup) * (self.ref - self.start)
        else:
            progress = (self.t - self.warmup) / max(1, self.total - self.warmup)
            lr = max(self.final, self.final + (self.ref - self.final) * 0.5 * (1 + math.cos(math.pi * progress)))
        progress = self.t / self.total
        wd = self.wd1 + (self.wd0 - self.wd1) * 0.5 * (1 + math.cos(math.pi * progress))
        return lr, wd


def test_schedules_match_the_official_order():
    """Iteration k of the official loop runs with lr/wd f(k + 1) and EMA momentum m(k): every step here too."""
    o = OptimConfig(warmup_epochs=2)
    s = Schedules(o, steps_per_epoch=10, epochs=6)
    ref = _OfficialWarmupCosine(s.warmup_steps, o.start_lr, o.lr, o.final_lr, s.total_steps,
                                o.weight_decay, o.final_weight_decay)
    momenta = (o.ema[0] + i * (o.ema[1] - o.ema[0]) / s.total_steps for i in range(s.total_steps + 1))
    for k in range(s.total_steps):
        lr, wd = ref.step()
        assert s.lr(k) == pytest.approx(lr, rel=1e-12) and s.wd(k) == pytest.approx(wd, rel=1e-12), k
        assert s.momentum(k) == pytest.approx(next(momenta), rel=1e-12), k
