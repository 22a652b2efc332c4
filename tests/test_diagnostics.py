"""Collapse and shortcut diagnostics: variance shares by hand, alarms on a collapsed and a healthy encoder."""

import pytest
import torch

from pipeline.diagnostics import alarms, diagnose, variance_shares
from pipeline.masks import MaskSampler
from pipeline.models.ijepa import build_ijepa
from pipeline.train import DIAG_MASK_STEP


def test_variance_shares_by_hand():
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(1, 16, 8, generator=g).expand(32, 16, 8)  # depends on the patch position only
    img = torch.randn(32, 1, 8, generator=g).expand(32, 16, 8)  # on the image only
    assert variance_shares(pos) == pytest.approx((1.0, 0.0), abs=1e-9)
    assert variance_shares(img) == pytest.approx((0.0, 1.0), abs=1e-9)
    p, i = variance_shares(pos + img)
    assert p + i == pytest.approx(1.0, abs=1e-9) and 0 < p < 1
    p, i = variance_shares(torch.randn(512, 64, 8, generator=g))  # noise: ~1/n and ~1/N
    assert p == pytest.approx(1 / 512, rel=0.3) and i == pytest.approx(1 / 64, rel=0.3)
    assert variance_shares(torch.ones(4, 9, 3)) == (0.0, 0.0)


@pytest.fixture
def model_and_batch(tiny_cfg):
    torch.manual_seed(0)
    model = build_ijepa(tiny_cfg)
    images = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    masks = MaskSampler(tiny_cfg.mask, model.encoder.grid_size, seed=0).sample(64, 0)
    return tiny_cfg, model, (images, *masks)


def test_random_init_is_healthy(model_and_batch):
    cfg, model, batch = model_and_batch
    d = diagnose(model, *batch)
    assert set(d) == {"rankme", "feature_std", "position_share", "image_share", "heldout_loss", "trivial_loss"}
    assert alarms(d, cfg.pretrain.collapse_std_min, cfg.pretrain.collapse_rank_min) == []
    assert d["rankme"] > 10 and d["feature_std"] > 0.05
    assert 0 < d["position_share"] < 1 and 0 < d["image_share"] < 1
    assert d["heldout_loss"] > 0 and d["trivial_loss"] > 0
    assert model.training  # diagnose restores the mode


def test_input_independent_encoder_raises_both_alarms(model_and_batch):
    """Zero patch embedding: every image gives the same tokens (bias + position), the collapse I-JEPA can fall
    into. Uncentred RankMe would still read the positional structure as rank; centred it is 1."""
    cfg, model, batch = model_and_batch
    with torch.no_grad():
        model.target_encoder.patch_embed.proj.weight.zero_()
    d = diagnose(model, *batch)
    found = alarms(d, cfg.pretrain.collapse_std_min, cfg.pretrain.collapse_rank_min)
    assert found[0].startswith("feature_std") and found[1].startswith("rankme")
    assert d["rankme"] == pytest.approx(1.0, abs=0.05) and d["feature_std"] < 1e-5
    assert d["image_share"] < 1e-6 and d["position_share"] == pytest.approx(1.0, abs=1e-5)


def test_feature_std_far_below_its_init_value_raises_the_alarm():
    """EMA momentum 0 on the demo: 0.012-0.02 against 0.09 at init, above the absolute floor 0.01."""
    ema0 = {"feature_std": 0.0135, "rankme": 25.0, "heldout_loss": 0.002, "trivial_loss": 0.003}
    assert alarms(ema0, 0.01, 2.0) == []
    found = alarms(ema0, 0.01, 2.0, std_init=0.089, std_drop=0.25)
    assert found == ["feature_std 0.0135 < 0.25 x its value at init (0.089)"]
    assert alarms({**ema0, "feature_std": 0.15}, 0.01, 2.0, std_init=0.089, std_drop=0.25) == []  # the preset
    assert alarms(ema0, 0.01, 2.0, std_init=0.089, std_drop=0.0) == []  # off
    collapsed = {**ema0, "feature_std": 0.001}  # below the floor: one message, not two
    assert alarms(collapsed, 0.01, 2.0, std_init=0.089, std_drop=0.25) == ["feature_std 0.001 < 0.01"]


def test_a_trivial_task_raises_the_shortcut_alarm():
    healthy = {"feature_std": 0.2, "rankme": 30.0, "heldout_loss": 0.3, "trivial_loss": 0.45}
    assert alarms(healthy, 0.01, 2.0) == []
    trivial = {**healthy, "heldout_loss": 0.05, "trivial_loss": 0.04}  # the demo preset after ~200 steps
    assert alarms(trivial, 0.01, 2.0, armed=True) == ["held-out loss 0.05 >= context-mean guess 0.04"]
    assert alarms(trivial, 0.01, 2.0) == []  # an untrained predictor loses to the guess: not an alarm yet


def test_trivial_loss_is_the_context_mean_guess(model_and_batch):
    """When every patch of an image has the same target, the context mean predicts it exactly."""
    _, model, (images, masks_enc, masks_pred) = model_and_batch
    assert diagnose(model, images, masks_enc, masks_pred)["trivial_loss"] > 0.05
    with torch.no_grad():
        model.target_encoder.pos_embed.zero_()
    flat = torch.randn(64, 3, 1, 1).expand_as(images).contiguous()  # one colour per image: patches alike
    d = diagnose(model, flat, masks_enc, masks_pred)
    assert d["trivial_loss"] < 1e-6 and d["heldout_loss"] > 1e-3


def _train(cfg, images, steps, stop_gradient):
    """`steps` of `pipeline.step.train_step` on `images`, no regulariser. With the stop-gradient: the preset's
    EMA teacher. Without: the targets come from the context encoder with their gradient and the teacher
    copies it (EMA momentum 0), what the EMA and the stop-gradient exist to prevent."""
    from pipeline.models.ijepa import select_targets
    from pipeline.schedules import Schedules
    from pipeline.step import build_optimizer, train_step

    cfg = cfg.replace(**{"optim.reg": "none", **({} if stop_gradient else {"optim.ema": [0.0, 0.0]})})
    torch.manual_seed(0)
    model = build_ijepa(cfg)
    if not stop_gradient:
        model.targets = lambda x, masks_pred: select_targets(model.encoder(x), masks_pred)
    sampler = MaskSampler(cfg.mask, model.encoder.grid_size, seed=0)
    opt, sched = build_optimizer(model, cfg.optim), Schedules(cfg.optim, steps // 4, 4)  # warmup: the first quarter
    for step in range(steps):
        idx = torch.randint(0, len(images), (16,), generator=torch.Generator().manual_seed(step))
        train_step(model, opt, sched, step, images[idx], *sampler.sample(16, step))
    return model


def test_training_without_stop_gradient_trips_the_collapse_alarm(tiny_cfg):
    """The deliberately collapsing run: with the gradient flowing into the targets, the encoder maps every
    image to (nearly) one vector within 80 steps and the feature-std alarm fires; the same steps
    with the stop-gradient and the EMA teacher leave the alarms silent."""
    g = torch.Generator().manual_seed(1)
    images, held_out = torch.randn(256, 3, 32, 32, generator=g), torch.randn(64, 3, 32, 32, generator=g)
    p = tiny_cfg.pretrain
    collapsing, stable = _train(tiny_cfg, images, 80, False), _train(tiny_cfg, images, 80, True)
    masks = MaskSampler(tiny_cfg.mask, stable.encoder.grid_size, seed=0).sample(64, DIAG_MASK_STEP)
    collapsed, healthy = diagnose(collapsing, held_out, *masks), diagnose(stable, held_out, *masks)
    assert alarms(collapsed, p.collapse_std_min, p.collapse_rank_min)[0].startswith("feature_std")
    assert alarms(healthy, p.collapse_std_min, p.collapse_rank_min) == []
    assert collapsed["feature_std"] < healthy["feature_std"] / 4, (collapsed, healthy)  # measured 0.0056 vs 0.040
