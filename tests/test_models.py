"""Encoder / predictor: shapes, gradients, fixed pos-embed, presets, official checkpoints."""

import copy
import functools

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.errors import PipelineError
from pipeline.models.checkpoints import load_official_checkpoint
from pipeline.models.encoder import build_encoder, sincos_pos_embed_2d
from pipeline.models.predictor import Predictor, build_predictor
from pipeline.models.presets import ENCODER_PRESETS

torch.set_num_threads(1)


@functools.cache
def _tiny_base():
    torch.manual_seed(0)
    return build_encoder(ModelConfig(name="vit_tiny", patch_size=8, pred_depth=1, pred_emb_dim=32), 32)


def _tiny(depth_override: int | None = None):
    enc = copy.deepcopy(_tiny_base())
    if depth_override is not None:
        enc.blocks = enc.blocks[:depth_override]
    return enc


def _expected_params(dim: int, depth: int, mlp: float, patch: int) -> int:
    hidden = int(dim * mlp)
    block = 2 * 2 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + (dim * hidden + hidden) + (hidden * dim + dim)
    return 3 * patch * patch * dim + dim + depth * block + 2 * dim


@pytest.mark.parametrize("name", list(ENCODER_PRESETS))
@pytest.mark.parametrize("patch", [14, 16])
def test_every_preset_builds_on_meta(name, patch):
    cfg = ModelConfig(name=name, patch_size=patch)
    img = 224
    with torch.device("meta"):
        enc = build_encoder(cfg, img)
        pred = build_predictor(cfg, img)
    dim, depth, heads, mlp = ENCODER_PRESETS[name]
    assert enc.embed_dim == dim and len(enc.blocks) == depth
    assert enc.grid_size == (img // patch, img // patch) and enc.num_patches == (img // patch) ** 2
    assert enc.patch_size == patch
    trainable = sum(p.numel() for p in enc.parameters() if p.requires_grad)
    assert trainable == _expected_params(dim, depth, mlp, patch)
    assert not enc.pos_embed.requires_grad
    assert pred.predictor_proj.out_features == dim and len(pred.predictor_blocks) == cfg.pred_depth


def test_vit_huge_14_param_count():
    with torch.device("meta"):
        enc = build_encoder(ModelConfig(name="vit_huge", patch_size=14), 224)
    n = sum(p.numel() for p in enc.parameters() if p.requires_grad)
    assert 630e6 < n < 635e6  # ViT-H/14 without head: ~632M


def test_state_dict_names_are_official():
    enc = _tiny()
    keys = set(enc.state_dict())
    want = {"pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias"}
    for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
        want |= {f"blocks.{i}.{part}.{w}" for i in range(12) for w in ("weight", "bias")}
    assert keys == want


def test_sincos_pos_embed_fixed_and_matches_mae_formula():
    enc = _tiny()
    pe = sincos_pos_embed_2d(192, 4)
    assert torch.equal(enc.pos_embed[0], pe)
    assert not enc.pos_embed.requires_grad
    # position 0: sin(0)=0 in the sin halves, cos(0)=1 in the cos halves
    assert torch.equal(pe[0], torch.tensor(([0.0] * 48 + [1.0] * 48) * 2))
    # token 1 is (h=0, w=1): its first (w) half differs from token 0, its second (h) half does not
    assert torch.equal(pe[1, 96:], pe[0, 96:]) and not torch.equal(pe[1, :96], pe[0, :96])


def test_encoder_forward_shapes_and_keep_idx():
    enc = _tiny(depth_override=2).eval()
    x = torch.randn(2, 3, 32, 32)
    full = enc(x)
    assert full.shape == (2, 16, 192) and torch.isfinite(full).all()
    keep = torch.tensor([[0, 3, 5, 9, 15], [1, 2, 4, 8, 12]])
    part = enc(x, keep)
    assert part.shape == (2, 5, 192) and torch.isfinite(part).all()
    same = enc(x, torch.arange(16).expand(2, 16))
    torch.testing.assert_close(same, full)
    layers = enc.forward_layers(x, 2)
    assert len(layers) == 2 and all(t.shape == (2, 16, 192) for t in layers)
    torch.testing.assert_close(layers[-1], full)


def test_encoder_gradients():
    enc = _tiny(depth_override=2).train()
    out = enc(torch.randn(2, 3, 32, 32), torch.tensor([[0, 1, 2], [3, 4, 5]]))
    out.square().mean().backward()
    for name, p in enc.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name
    assert enc.pos_embed.grad is None


def test_init_is_the_official_one():
    """Official I-JEPA init: every linear and the patch conv trunc-normal(0.02) with zero bias; block l's
    attn.proj and mlp.fc2 weights divided by sqrt(2 l) (encoder and predictor)."""
    torch.manual_seed(0)
    enc = build_encoder(ModelConfig(name="vit_small", patch_size=8, pred_depth=4, pred_emb_dim=192), 64)
    conv = enc.patch_embed.proj
    assert torch.count_nonzero(conv.bias) == 0
    assert abs(conv.weight.std().item() - 0.02) < 0.001  # PyTorch's default: uniform, std ~ 0.012 here
    pred = Predictor(8, 384, 192, depth=4, num_heads=6)
    for blocks in (enc.blocks, pred.predictor_blocks):
        for layer, blk in enumerate(blocks, start=1):
            for w in (blk.attn.proj.weight, blk.mlp.fc2.weight):
                assert abs(w.std().item() / (0.02 / (2 * layer) ** 0.5) - 1) < 0.05, layer
            assert abs(blk.attn.qkv.weight.std().item() - 0.02) < 0.001
            assert torch.count_nonzero(blk.attn.qkv.bias) == 0


def test_predictor_shapes_and_gradients():
    torch.manual_seed(0)
    pred = Predictor(4, 192, 32, depth=2, num_heads=4)
    ctx = torch.randn(2, 6, 192, requires_grad=True)
    masks_enc = torch.tensor([[0, 1, 2, 3, 4, 5], [10, 11, 12, 13, 14, 15]])
    masks_pred = torch.tensor([[[6, 7, 8], [9, 10, 11], [12, 13, 14]], [[0, 1, 2], [3, 4, 5], [6, 7, 8]]])
    out = pred(ctx, masks_enc, masks_pred)
    assert out.shape == (2, 3, 3, 192) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0
    for name, p in pred.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert not pred.predictor_pos_embed.requires_grad


def test_predictor_blocks_are_independent():
    """Each target block is predicted from the context alone, not from other blocks' mask tokens."""
    torch.manual_seed(0)
    pred = Predictor(4, 64, 32, depth=1, num_heads=2).eval()
    ctx, me = torch.randn(1, 4, 64), torch.tensor([[0, 1, 2, 3]])
    both = pred(ctx, me, torch.tensor([[[5, 6], [10, 11]]]))
    one = pred(ctx, me, torch.tensor([[[5, 6]]]))
    torch.testing.assert_close(both[:, :1], one)


def _fake_official(tmp_path, enc, pred):
    path = tmp_path / "IN1K-vit.h.14-300e.pth.tar"
    torch.save({
        "encoder": {f"module.{k}": v for k, v in enc.state_dict().items()},
        "predictor": {f"module.{k}": v for k, v in pred.state_dict().items()},
        "target_encoder": {f"module.{k}": v for k, v in enc.state_dict().items()},
        "opt": {}, "scaler": None, "epoch": 300, "loss": 0.1, "batch_size": 2048, "world_size": 16, "lr": 1e-3,
    }, path)
    return path


def test_official_checkpoint_roundtrip(tmp_path):
    src = _tiny().eval()
    pred = Predictor(4, 192, 32, depth=1, num_heads=4)
    path = _fake_official(tmp_path, src, pred)
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(123)
    dst = build_encoder(ModelConfig(name="vit_tiny", patch_size=8), 32).eval()
    assert not torch.equal(dst.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
    sd = load_official_checkpoint(path)
    assert all(not k.startswith("module.") for k in sd)
    dst.load_state_dict(sd)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)
    p2 = Predictor(4, 192, 32, depth=1, num_heads=4)
    load_official_checkpoint(path, "predictor", model=p2)
    assert torch.equal(p2.mask_token, pred.mask_token)


def test_official_checkpoint_errors_are_one_line(tmp_path):
    path = _fake_official(tmp_path, _tiny(), Predictor(4, 192, 32, depth=1, num_heads=4))
    with torch.device("meta"):
        other = build_encoder(ModelConfig(name="vit_small", patch_size=8), 32)
    with pytest.raises(PipelineError) as e:
        load_official_checkpoint(path, model=other)
    msg = str(e.value)
    assert "\n" not in msg and "(1, 16, 192)" in msg and "(1, 16, 384)" in msg
    with pytest.raises(PipelineError) as e:
        load_official_checkpoint(path, which="nope")
    assert "\n" not in str(e.value) and "nope" in str(e.value)
    with pytest.raises(PipelineError):
        load_official_checkpoint(tmp_path / "missing.pth.tar")
    sd = {f"module.{k}": v for k, v in _tiny().state_dict().items() if k != "norm.bias"}
    torch.save({"target_encoder": sd}, tmp_path / "short.pth.tar")
    with pytest.raises(PipelineError) as e:
        load_official_checkpoint(tmp_path / "short.pth.tar", model=_tiny())
    assert "norm.bias" in str(e.value) and "\n" not in str(e.value)
