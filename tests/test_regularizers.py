"""Anti-collapse regularisers: reference values, collapse penalised, the Gaussian at SIGReg's floor, gradients
on a nearly collapsed batch, determinism in the step."""

import math

import numpy as np
import pytest
import torch

from pipeline import config
from pipeline import regularizers as R

NAMES = sorted(R.BY_NAME)


def gaussian(b=256, d=64, seed=0):
    return torch.randn(b, d, generator=torch.Generator().manual_seed(seed))


def collapsed(b=256, d=64, seed=0):
    """Every row the same vector."""
    return gaussian(1, d, seed).expand(b, d).contiguous()


def rank_one(b=256, d=64, seed=0):
    """Rows on one line through 0: u_b * v."""
    return gaussian(b, 1, seed) * gaussian(1, d, seed + 1)


def test_names_agree_with_the_config():
    assert set(config.REGULARIZERS) == {"none", *R.BY_NAME}
    with pytest.raises(ValueError, match="'barlow'"):
        R.reg_loss("barlow", gaussian())


def test_vicreg_matches_a_numpy_reference():
    z = gaussian(32, 8) * torch.linspace(0.2, 2.0, 8)  # some dims under the hinge, some over
    x = z.double().numpy()
    var = np.maximum(0.0, 1 - np.sqrt(x.var(axis=0, ddof=1) + 1e-4)).mean()
    c = np.cov(x, rowvar=False)
    cov = (c**2).sum() - (np.diag(c) ** 2).sum()
    assert R.vicreg_variance(z).item() == pytest.approx(var, rel=1e-5)
    assert R.vicreg_covariance(z).item() == pytest.approx(cov / 8, rel=1e-5)
    assert R.reg_loss("vicreg", z).item() == pytest.approx(var + cov / 8 / 25, rel=1e-5)


def test_epps_pulley_matches_the_full_trapezoid_on_minus_t_to_t():
    x = gaussian(50, 3) * 1.3 + 0.2
    t = np.linspace(-3.0, 3.0, 33)  # the same knots, both halves
    xt = x.double().numpy()[:, :, None] * t  # (B, K, 33)
    ecf = np.exp(1j * xt).mean(axis=0)
    integrand = np.abs(ecf - np.exp(-(t**2) / 2)) ** 2 * np.exp(-(t**2) / 2)
    want = 50 * np.trapezoid(integrand, t, axis=-1)
    assert np.allclose(R.epps_pulley(x).double().numpy(), want, rtol=1e-4)


def test_gaussian_floor_is_the_null_expectation():
    # E[B |phi_B(t) - phi(t)|^2] = 1 - exp(-t^2) for N(0, 1) samples; integrated against exp(-t^2 / 2) on [-3, 3].
    exact = (math.sqrt(2 * math.pi) * math.erf(3 / math.sqrt(2))
             - math.sqrt(2 * math.pi / 3) * math.erf(3 * math.sqrt(1.5)))
    assert R.gaussian_floor() == pytest.approx(exact, abs=2e-3)


@pytest.mark.parametrize("name", NAMES)
def test_collapse_is_penalised_far_more_than_an_isotropic_gaussian(name):
    spread = R.reg_loss(name, gaussian()).item()
    for bad in (collapsed(), rank_one(), torch.zeros(256, 64)):
        assert R.reg_loss(name, bad).item() > 10 * spread


def test_sigreg_puts_the_standard_gaussian_at_its_floor():
    floor = R.gaussian_floor()
    for b in (64, 1024):  # batch-size free under the null
        values = [R.sigreg(gaussian(b, 32, seed), step=seed).item() for seed in range(4)]
        assert np.mean(values) == pytest.approx(floor, rel=0.25), values
    z = gaussian(1024, 32)
    g = R.sigreg(z).item()
    for other in (2 * z, 0.5 * z, z + 0.5, z.abs()):  # wrong scale, shifted, skewed
        assert R.sigreg(other).item() > 20 * g


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("centre", [0.0, 1.0])
def test_gradients_are_finite_and_nonzero_on_a_nearly_collapsed_batch(name, centre):
    z = (centre + 1e-3 * gaussian(64, 32)).requires_grad_()
    R.reg_loss(name, z, step=3).backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_in_the_step(name):
    z = rank_one(64, 32) + 0.1 * gaussian(64, 32, seed=5)
    assert torch.equal(R.reg_loss(name, z, step=7), R.reg_loss(name, z, step=7))
    if name == "sigreg":  # fresh directions every step
        assert not torch.equal(R.directions(32, 7, z.device), R.directions(32, 8, z.device))
        assert R.reg_loss(name, z, step=7) != R.reg_loss(name, z, step=8)
    d = R.directions(32, 7, torch.device("cpu"))
    assert d.shape == (32, R.SIGREG_DIRECTIONS) and torch.allclose(d.norm(dim=0), torch.ones(R.SIGREG_DIRECTIONS))


def test_float32_under_autocast():
    z = gaussian(32, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for name in NAMES:
            assert R.reg_loss(name, z).dtype == torch.float32
