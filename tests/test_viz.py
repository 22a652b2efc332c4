"""pipeline.viz: every picture is a valid, non-blank PNG written atomically, and the drawings are right."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from pipeline import viz
from pipeline.config import MASK_STRATEGIES
from pipeline.data.scenes import render_scene
from pipeline.errors import PipelineError
from pipeline.masks import MaskSampler
from pipeline.models.encoder import build_encoder


def _png(path, min_w=150, min_h=100) -> np.ndarray:
    """Open `path` with PIL, check it is a plausible non-blank picture, return RGB uint8 (H, W, 3)."""
    with Image.open(path) as im:
        assert im.format == "PNG"
        rgb = np.asarray(im.convert("RGB"))
    assert rgb.shape[1] >= min_w and rgb.shape[0] >= min_h, rgb.shape
    assert rgb.std() > 0, "blank picture"
    assert not list(path.parent.glob("*.tmp")), "temporary file left behind"
    return rgb


def _normalize(u8: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> ImageNet-normalized float (B, 3, H, W)."""
    x = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(viz.IMAGENET_MEAN)[:, None, None]) / torch.tensor(viz.IMAGENET_STD)[:, None, None]


@pytest.fixture(scope="module")
def scenes_u8() -> np.ndarray:
    return np.stack([render_scene(0, i, 32).image for i in range(4)])


def _has_color(rgb: np.ndarray, color: np.ndarray, tol: int = 2) -> int:
    """Number of pixels within `tol` (per channel) of the float colour `color` in [0, 1]."""
    target = np.round(color * 255).astype(int)
    return int((np.abs(rgb.astype(int) - target).max(-1) <= tol).sum())


# ------------------------------------------------------------------------------------------- images


def test_to_display_undoes_normalization(scenes_u8):
    want = scenes_u8.astype(np.float32) / 255
    np.testing.assert_allclose(viz.to_display(scenes_u8), want)
    np.testing.assert_allclose(viz.to_display(_normalize(scenes_u8)), want, atol=1e-5)
    with pytest.raises(PipelineError, match=r"\(B, 3, H, W\)"):
        viz.to_display(np.zeros((2, 32, 32, 3), np.float32))


# -------------------------------------------------------------------------------------------- masks


def test_mask_overlay_tints_exactly_the_masked_patches():
    grid, ps = (4, 4), 8
    gray = np.full((32, 32, 3), 0.5, np.float32)
    enc = np.array([0, 1, 5])
    pred = np.array([[10, 11], [15, 14]])  # two target blocks, disjoint from the context
    out = viz.mask_overlay(gray, enc, pred, grid)
    patches = out.reshape(4, ps, 4, ps, 3).transpose(0, 2, 1, 3, 4).reshape(16, ps * ps, 3)
    assert (np.ptp(patches, axis=1) == 0).all(), "each patch is one flat colour"
    colors = patches[:, 0]
    ctx = (1 - viz.CONTEXT_ALPHA) * 0.5 + viz.CONTEXT_ALPHA * np.array(viz.CONTEXT_COLOR)
    for i in range(16):
        if i in enc:
            np.testing.assert_allclose(colors[i], ctx, atol=1e-6)
        elif i in pred[0] or i in pred[1]:
            m = 0 if i in pred[0] else 1
            want = (1 - viz.TARGET_ALPHA) * 0.5 + viz.TARGET_ALPHA * np.array(viz.TARGET_COLORS[m])
            np.testing.assert_allclose(colors[i], want, atol=1e-6)
        else:
            np.testing.assert_array_equal(colors[i], 0.5)  # neither: untouched
    with pytest.raises(PipelineError, match="patch index 16"):
        viz.mask_overlay(gray, np.array([16]), pred, grid)
    with pytest.raises(PipelineError, match="does not divide"):
        viz.mask_overlay(gray, enc, pred, (5, 5))


def test_outline_of_a_block_is_its_perimeter():
    mask = np.zeros(16, bool)
    mask[[5, 6, 9, 10, 13, 14]] = True  # a 3x2 block (rows 1..3, cols 1..2)
    segs = viz._outline_segments(mask, (4, 4), (8, 8))
    assert len(segs) == 2 * (3 + 2)
    xs = [x for s in segs for x, _ in s]
    ys = [y for s in segs for _, y in s]
    assert (min(xs), max(xs), min(ys), max(ys)) == (7.5, 23.5, 7.5, 31.5)


def test_mask_overlay_grid_png_shows_context_and_targets(tiny_cfg, tmp_path):
    grid = (4, 4)
    const = np.full((3, 32, 32, 3), 128, np.uint8)
    enc, pred = MaskSampler(tiny_cfg.mask, grid, 0).sample(3, 0)
    path = viz.mask_overlay_grid(const, enc, pred, grid, tmp_path / "masks.png", title="t")
    rgb = _png(path)
    gray = 128 / 255
    ctx = (1 - viz.CONTEXT_ALPHA) * gray + viz.CONTEXT_ALPHA * np.array(viz.CONTEXT_COLOR)
    assert _has_color(rgb, ctx) > 100, "context tint missing from the picture"
    n_ctx = _has_color(rgb, ctx)
    n_plain = _has_color(rgb, np.full(3, gray))
    assert n_plain > n_ctx, "the plain images of the top row (and untouched patches) keep their grey"
    for m in range(pred.shape[1]):
        tgt = (1 - viz.TARGET_ALPHA) * gray + viz.TARGET_ALPHA * np.array(viz.TARGET_COLORS[m])
        assert _has_color(rgb, tgt, tol=4) > 0, f"target {m} colour missing"
    with pytest.raises(PipelineError, match=r"\(B, Kc\)"):
        viz.mask_overlay_grid(const, enc[:2], pred, grid, tmp_path / "bad.png")


def test_mask_overlay_grid_normalized_scenes(tiny_cfg, scenes_u8, tmp_path):
    enc, pred = MaskSampler(tiny_cfg.mask, (4, 4), 1).sample(4, 7)
    _png(viz.mask_overlay_grid(_normalize(scenes_u8), enc, pred, (4, 4), tmp_path / "sub" / "m.png"))


def test_mask_strategies_figure_every_strategy_even_if_min_keep_infeasible(tiny_cfg, tmp_path, monkeypatch):
    from dataclasses import replace

    cfg = replace(tiny_cfg.mask, min_keep=10)  # rasterized keeps 4 on a 4x4 grid: infeasible as given
    with pytest.raises(ValueError):
        MaskSampler(replace(cfg, strategy="rasterized"), (4, 4))
    figures, save = [], viz._save
    monkeypatch.setattr(viz, "_save", lambda fig, path: figures.append(fig) or save(fig, path))
    rgb = _png(viz.mask_strategies_figure(cfg, (4, 4), tmp_path / "strategies.png", n=3))
    assert rgb.shape[0] > rgb.shape[1] * 0.8, "one row per strategy: taller than a single row"
    (fig,) = figures
    assert len(fig.axes) == 3 * len(MASK_STRATEGIES)  # n = 3 samples in each row
    labels = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()]  # the first axes of each row
    assert [label.split("\n")[0] for label in labels] == list(MASK_STRATEGIES)  # every strategy once, in order
    rows = dict(zip(MASK_STRATEGIES, labels, strict=True))
    assert "(min_keep=1)" in rows["rasterized"] and "(min_keep=1)" not in rows["multiblock"]


# ------------------------------------------------------------------------------------------- curves


def _history(n: int = 60) -> pd.DataFrame:
    step = np.arange(n) * 5
    return pd.DataFrame({
        "step": step, "loss": np.exp(-step / 100) + 0.01, "lr": np.minimum(step / 50, 1) * 1e-3,
        "wd": 0.04 + step / 1000, "momentum": 0.996 + step * 1e-5, "target_std": np.linspace(0.3, 0.05, n),
        "rankme": np.linspace(40, 3, n), "images_per_s": np.full(n, 200.0), "note": ["x"] * n,
    })


def test_training_curves(tmp_path):
    h = _history()
    h.loc[3, "rankme"] = np.nan  # logged less often than the loss
    small = _png(viz.training_curves(h[["step", "loss"]], tmp_path / "one.png"))
    full = _png(viz.training_curves(h, tmp_path / "all.png", collapse_std_min=0.01, collapse_rank_min=2.0))
    assert full.shape[0] > small.shape[0] and full.shape[1] > small.shape[1], "one panel per present curve"
    red = np.array([214, 39, 40])  # matplotlib C3: the collapse alarm lines
    assert (np.abs(full.astype(int) - red).max(-1) <= 25).sum() > 50
    assert (np.abs(small.astype(int) - red).max(-1) <= 25).sum() == 0
    _png(viz.training_curves(h.iloc[:1], tmp_path / "first_step.png"))


def test_training_curves_draw_the_relative_std_alarm_on_the_feature_std_panel(tmp_path):
    h = _history().assign(feature_std=np.linspace(0.15, 0.02, 60))[["step", "loss", "feature_std"]]
    red = np.array([214, 39, 40])
    n_red = [(np.abs(_png(viz.training_curves(h, tmp_path / f"{i}.png", collapse_std_min=0.01,
                                               collapse_std_drop=drop)).astype(int) - red).max(-1) <= 25).sum()
             for i, drop in enumerate((None, 0.03))]
    assert n_red[1] > n_red[0] + 50, n_red  # a second (dotted) line at 0.03


def test_training_curves_errors(tmp_path):
    with pytest.raises(PipelineError, match="lack 'step'"):
        viz.training_curves(pd.DataFrame({"loss": [1.0]}), tmp_path / "a.png")
    with pytest.raises(PipelineError, match="hold no curve"):
        viz.training_curves(pd.DataFrame({"step": [0], "note": ["x"]}), tmp_path / "b.png")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------- PCA


def test_pca_rgb_separates_planted_structure():
    torch.manual_seed(0)
    B, gh, gw, D = 2, 4, 4, 32
    direction = torch.randn(D)
    sign = torch.ones(B, gh * gw)
    sign[:, : gh * gw // 2] = -1  # top half of every image on one side
    tokens = sign[..., None] * direction * 5 + 0.01 * torch.randn(B, gh * gw, D)
    maps, var = viz.pca_rgb(tokens, (gh, gw))
    assert maps.shape == (B, gh, gw, 3) and maps.min() >= 0 and maps.max() <= 1
    assert var[0] > 0.99 and np.all(np.diff(var) <= 0)
    red = maps[..., 0]
    top, bottom = red[:, : gh // 2], red[:, gh // 2:]
    assert abs(top.mean() - bottom.mean()) > 0.95, "first component splits the planted halves"
    np.testing.assert_array_equal(viz.pca_rgb(tokens, (gh, gw))[0], maps)  # deterministic
    one, _ = viz.pca_rgb(tokens, (gh, gw), n_components=1)
    assert (one[..., 1:] == 0).all()
    with pytest.raises(PipelineError, match="n_components = 4"):
        viz.pca_rgb(tokens, (gh, gw), n_components=4)
    with pytest.raises(PipelineError, match="do not fill"):
        viz.pca_rgb(tokens, (3, 3))


def test_pca_feature_map_random_encoder(tiny_cfg, scenes_u8, tmp_path):
    torch.manual_seed(0)
    encoder = build_encoder(tiny_cfg.model, 32)
    encoder.train()
    _png(viz.pca_feature_map(encoder, _normalize(scenes_u8), tmp_path / "pca.png"))
    assert encoder.training, "the encoder's mode is restored"
    assert all(p.grad is None for p in encoder.parameters())


# -------------------------------------------------------------------------------------- depth, table


def test_depth_panel(scenes_u8, tmp_path):
    gt = np.stack([render_scene(0, i, 32).depth for i in range(4)])
    gt[0, :4, :4] = 0  # NYU-style holes
    pred = gt + 0.3
    _png(viz.depth_panel(_normalize(scenes_u8), torch.from_numpy(pred), gt, tmp_path / "depth.png"))
    with pytest.raises(PipelineError, match=r"expected both \(B, H, W\)"):
        viz.depth_panel(scenes_u8, pred[:2], gt, tmp_path / "bad.png")


def test_table_image(tmp_path):
    df = pd.DataFrame({"eval": ["linear", "clevr_count", "nyu_depth"], "metric": ["top1", "acc", "rmse"],
                       "value": [0.4123456, 0.5, float("nan")]})
    rgb = _png(viz.table_image(df, tmp_path / "table.png", title="Evaluation"), min_h=80)
    bigger = _png(viz.table_image(pd.concat([df] * 4), tmp_path / "table4.png"), min_h=80)
    assert bigger.shape[0] > rgb.shape[0], "height grows with the rows"
    assert viz._fmt(0.4123456) == "0.4123" and viz._fmt(float("nan")) == "-" and viz._fmt(1e-5) == "1.00e-05"
    with pytest.raises(PipelineError, match="no columns"):
        viz.table_image(pd.DataFrame(), tmp_path / "empty.png")


# ------------------------------------------------------------------------------------------- saving


def test_failed_write_leaves_no_tmp_and_keeps_old_file(tmp_path, monkeypatch):
    df = pd.DataFrame({"a": [1.0]})
    path = viz.table_image(df, tmp_path / "t.png")
    before = path.read_bytes()

    def broken(self, fname, **kw):
        with open(fname, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        viz.table_image(pd.DataFrame({"a": [2.0]}), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.png"]
    assert path.read_bytes() == before
    with pytest.raises(PipelineError, match=r"must end in \.png"):
        viz.table_image(df, tmp_path / "t.jpg")
