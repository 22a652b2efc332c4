"""The I-JEPA module and one optimisation step: gradients, EMA, loss, schedules written, save/load."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline import regularizers as R
from pipeline.masks import MaskSampler
from pipeline.metrics import rankme
from pipeline.models.ijepa import build_ijepa, ema_update
from pipeline.models.io import load_encoder, save_encoder
from pipeline.schedules import Schedules
from pipeline.step import build_optimizer, param_groups, set_schedules, train_step


@pytest.fixture
def setup(tiny_cfg):
    tiny_cfg = tiny_cfg.replace(**{"optim.reg": "none", "optim.reg_on": "pooled"})  # the paper's objective
    torch.manual_seed(0)
    model = build_ijepa(tiny_cfg)
    grid = model.encoder.grid_size
    masks = MaskSampler(tiny_cfg.mask, grid, seed=0).sample(4, step=0)
    images = torch.randn(4, 3, tiny_cfg.data.image_size, tiny_cfg.data.image_size)
    return tiny_cfg, model, images, masks


def test_target_starts_as_copy_and_has_no_grad(setup):
    _, model, images, (me, mp) = setup
    for (n, p), q in zip(model.encoder.named_parameters(), model.target_encoder.parameters(), strict=True):
        assert torch.equal(p, q), n
        assert not q.requires_grad
    out = model(images, me, mp)
    out.loss.backward()
    assert all(p.grad is None for p in model.target_encoder.parameters())
    trained = [p for m in (model.encoder, model.predictor) for p in m.parameters() if p.requires_grad]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)


def test_loss_matches_reference(setup):
    _, model, images, (me, mp) = setup
    model.eval()
    out = model(images, me, mp)
    h = F.layer_norm(model.target_encoder(images), (model.encoder.embed_dim,))
    B, M, Kt = mp.shape
    tgt = torch.stack([torch.stack([h[b, mp[b, m]] for m in range(M)]) for b in range(B)])
    pred = model.predictor(model.encoder(images, me), me, mp)
    assert torch.allclose(out.loss, F.smooth_l1_loss(pred, tgt), atol=1e-6)
    model.loss_name = "l2"
    assert torch.allclose(model(images, me, mp).loss, F.mse_loss(pred, tgt), atol=1e-6)


def test_step_updates_lr_wd_and_ema_exactly(setup):
    cfg, model, images, (me, mp) = setup
    opt = build_optimizer(model, cfg.optim)
    assert {g["weight_decay"] for g in opt.param_groups} == {cfg.optim.weight_decay, 0.0}
    sched = Schedules(cfg.optim, steps_per_epoch=10, epochs=2)
    before_t = copy.deepcopy(model.target_encoder.state_dict())
    train_step(model, opt, sched, 3, images, me, mp)
    assert all(g["lr"] == pytest.approx(sched.lr(3)) for g in opt.param_groups)
    decayed = [g for g in opt.param_groups if not g.get("WD_exclude")]
    assert all(g["weight_decay"] == pytest.approx(sched.wd(3)) for g in decayed)
    m = sched.momentum(3)
    online = dict(model.encoder.named_parameters())
    for name, p in model.target_encoder.named_parameters():
        want = m * before_t[name] + (1 - m) * online[name].detach()
        assert torch.allclose(p, want, atol=1e-6), name


def test_a_few_steps_lower_the_loss(setup):
    cfg, model, images, (me, mp) = setup
    opt = build_optimizer(model, cfg.optim)
    sched = Schedules(cfg.optim.__class__(lr=3e-3, start_lr=3e-3, warmup_epochs=0), 20, 1)
    first = train_step(model, opt, sched, 0, images, me, mp).loss.item()
    for s in range(1, 20):
        last = train_step(model, opt, sched, s, images, me, mp).loss.item()
    assert last < 0.8 * first


def test_set_schedules_leaves_excluded_groups_at_zero(setup):
    cfg, model, _, _ = setup
    opt = build_optimizer(model, cfg.optim)
    sched = Schedules(cfg.optim, 10, 3)
    lr, wd = set_schedules(opt, sched, 25)
    assert lr == pytest.approx(sched.lr(25)) and wd == pytest.approx(sched.wd(25))
    assert [g["weight_decay"] for g in opt.param_groups if g.get("WD_exclude")] == [0.0, 0.0]


def test_ema_update_exact():
    torch.manual_seed(0)
    t = [torch.randn(3, 4), torch.randn(5)]
    o = [torch.randn(3, 4, requires_grad=True), torch.randn(5, requires_grad=True)]
    before = [x.clone() for x in t]
    m = 0.9
    ema_update(t, o, m)
    for a, b, c in zip(t, before, o, strict=True):
        torch.testing.assert_close(a, m * b + (1 - m) * c.detach(), rtol=1e-6, atol=1e-7)
    ema_update(t, o, 0.0)
    for a, c in zip(t, o, strict=True):
        torch.testing.assert_close(a, c.detach())
    same = [x.clone() for x in t]
    ema_update(t, [torch.zeros_like(x) for x in t], 1.0)
    for a, b in zip(t, same, strict=True):
        assert torch.equal(a, b)


def test_ema_update_on_modules():
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    ref = [m * 0.5 + (1 - 0.5) * n for m, n in zip(a.parameters(), b.parameters(), strict=True)]
    ema_update(a.parameters(), b.parameters(), 0.5)
    for p, r in zip(a.parameters(), ref, strict=True):
        torch.testing.assert_close(p.detach(), r.detach())
        assert p.grad is None
    with pytest.raises(ValueError):
        ema_update(list(a.parameters()), list(b.parameters())[:1], 0.5)


def test_param_groups():
    m = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    frozen = nn.Parameter(torch.zeros(2, 2), requires_grad=False)
    m.register_parameter("frozen", frozen)
    decay, no_decay = param_groups(m, 0.04)
    assert decay["weight_decay"] == 0.04 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(m[0].weight), id(m[2].weight)}
    assert len(no_decay["params"]) == 4
    assert all(p is not frozen for g in (decay, no_decay) for p in g["params"])
    torch.optim.AdamW([decay, no_decay], lr=1e-3)


def test_save_load_encoder_round_trip(setup, tmp_path):
    cfg, model, images, _ = setup
    out = save_encoder(model.target_encoder, cfg.model, cfg.data.image_size, tmp_path / "encoder")
    loaded = load_encoder(out)
    assert not any(p.requires_grad for p in loaded.parameters())
    model.target_encoder.eval()
    assert torch.equal(loaded(images), model.target_encoder(images))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_rankme_collapse_and_full_rank():
    torch.manual_seed(0)
    assert rankme(torch.ones(64, 16)) == pytest.approx(1.0, abs=1e-3)
    assert rankme(torch.randn(512, 16)) > 14.0


# ----------------------------------------------------------------------------------- regularisers


def twin(cfg, images, me, mp, step=5, **optim):
    """A model built as `setup` builds it (same seed, same weights), `optim` keys replaced; and its output."""
    torch.manual_seed(0)
    model = build_ijepa(cfg.replace(**{f"optim.{k}": v for k, v in optim.items()}))
    return model, model(images, me, mp, step=step)


def grads(module):
    return [p.grad for p in module.parameters() if p.requires_grad]


def test_reg_none_leaves_the_loss_bit_for_bit(setup):
    cfg, model, images, (me, mp) = setup
    assert (model.reg, cfg.optim.reg) == ("none", "none")
    out = model(images, me, mp, step=5)
    with torch.no_grad():  # the loss exactly as computed before regularisers existed
        tgt, _ = model.targets(images, mp)
        pred = model.predictor(model.encoder(images, keep_idx=me), me, mp)
        paper = F.smooth_l1_loss(pred.float(), tgt.float())
    assert torch.equal(out.loss.detach(), paper) and torch.equal(out.pred_loss, paper)
    assert out.reg_loss.item() == 0.0 and not out.pred_loss.requires_grad
    _, reg = twin(cfg, images, me, mp, reg="vicreg")
    assert torch.equal(reg.pred_loss, paper)  # the regulariser does not touch the prediction loss


@pytest.mark.parametrize("name", ["vicreg", "sigreg"])
def test_reg_adds_weighted_term_and_trains_the_encoder_only(setup, name):
    cfg, model, images, (me, mp) = setup
    reg_model, out = twin(cfg, images, me, mp, reg=name, reg_weight=2.5)
    assert (reg_model.reg, reg_model.reg_weight) == (name, 2.5)  # build_ijepa passes the option through
    assert torch.equal(out.loss.detach(), out.pred_loss + 2.5 * out.reg_loss)
    assert out.reg_loss > 0 and not out.reg_loss.requires_grad
    pooled = reg_model.encoder(images, keep_idx=me).mean(dim=1)
    assert torch.allclose(out.reg_loss, R.reg_loss(name, pooled, 5))  # context features, pooled, this step

    out.loss.backward()
    plain = model(images, me, mp, step=5)
    plain.loss.backward()
    enc_diff = [(a - b).abs().max() for a, b in zip(grads(reg_model.encoder), grads(model.encoder), strict=True)]
    enc_size = max(g.abs().max() for g in grads(model.encoder))
    assert max(enc_diff) > 1e-3 * enc_size  # the reg term reaches the context encoder
    for a, b in zip(grads(reg_model.predictor), grads(model.predictor), strict=True):
        assert torch.allclose(a, b, atol=1e-7)  # and nothing else
    assert all(p.grad is None for p in reg_model.target_encoder.parameters())


def test_reg_on_patches_sees_only_the_spread_within_each_image(setup):
    cfg, _, images, (me, mp) = setup
    reg_model, out = twin(cfg, images, me, mp, reg="vicreg", reg_on="patches")
    with torch.no_grad():
        ctx = reg_model.encoder(images, keep_idx=me)  # (B, Kc, D)
    centred = (ctx - ctx.mean(dim=1, keepdim=True)).reshape(-1, ctx.size(-1))
    assert torch.allclose(out.reg_loss, R.reg_loss("vicreg", centred, 5))
    # tokens that differ between images but not within one: no within-image spread, the variance hinge is maxed
    same = ctx.mean(dim=1, keepdim=True).expand_as(ctx)
    assert float(R.vicreg_variance(reg_model.reg_input(same))) == pytest.approx(1 - 1e-2, abs=1e-3)
    assert float(R.vicreg_variance(reg_model.reg_input(ctx))) < float(R.vicreg_variance(reg_model.reg_input(same)))
    with pytest.raises(ValueError, match="reg_on"):
        build_ijepa(cfg.replace(**{"optim.reg_on": "pooled"})).__class__(
            reg_model.encoder, reg_model.predictor, reg="vicreg", reg_on="tokens")


def test_train_step_seeds_sigreg_with_its_step(setup):
    cfg, _, images, (me, mp) = setup
    cfg = cfg.replace(**{"optim.reg": "sigreg"})
    sched = Schedules(cfg.optim, steps_per_epoch=10, epochs=2)

    def stepped(step):
        torch.manual_seed(0)
        model = build_ijepa(cfg)
        return train_step(model, build_optimizer(model, cfg.optim), sched, step, images, me, mp).reg_loss

    for step in (3, 4):
        assert torch.equal(stepped(step), twin(cfg, images, me, mp, step=step)[1].reg_loss)
    assert not torch.equal(stepped(3), stepped(4))  # fresh directions every step
