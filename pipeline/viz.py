"""Pictures of a run: mask overlays, training curves, DINO-style PCA feature maps, depth, the eval table.

Every public function draws one matplotlib figure and writes it as a PNG, atomically (a temporary file
beside `path`, then a rename, so a reader never sees half a picture and an error leaves nothing behind),
and returns `Path(path)`. Figures are built with `matplotlib.figure.Figure`, never `pyplot`: the PNG is
rendered by the Agg canvas, with no global backend or figure registry, so this works headless and in
Ray workers. Nothing here talks to MLflow; stages log the files with `pipeline.tracking.log_artifact`.

Images come either normalized, float (B, 3, H, W) with the ImageNet mean/std (what the models see), or
as uint8 (B, H, W, 3) (what the data renders); see `to_display`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.collections import LineCollection
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from torch import Tensor

from pipeline.atomic import atomic_write
from pipeline.config import MASK_STRATEGIES, MaskConfig
from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from pipeline.errors import PipelineError
from pipeline.masks import MaskSampler

DPI = 110
CONTEXT_COLOR = to_rgb("#1f77b4")  # blue
# One colour per target block; none of them close to the context blue. Cycled when M > 8.
TARGET_COLORS = tuple(to_rgb(c) for c in ("#ff7f0e", "#d62728", "#2ca02c", "#e377c2", "#bcbd22",
                                          "#8c564b", "#9467bd", "#17becf"))
CONTEXT_ALPHA = 0.45
TARGET_ALPHA = 0.55


# ------------------------------------------------------------------------------------------- helpers


def _save(fig: Figure, path: str | Path) -> Path:
    """Write `fig` to `path` (.png) via a temporary file and a rename; no temporary file survives an error."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise PipelineError(f"picture path {path} must end in .png")
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))


def _numpy(x: Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def to_display(images: Tensor | np.ndarray) -> np.ndarray:
    """Images as float (B, H, W, 3) in [0, 1].

    uint8 input is (B, H, W, 3) in 0..255; float input is (B, 3, H, W) normalized with the ImageNet
    mean/std, which is undone here.
    """
    x = _numpy(images)
    if x.ndim != 4:
        raise PipelineError(f"images of shape {tuple(x.shape)}: expected (B, 3, H, W) float or (B, H, W, 3) uint8")
    if x.dtype == np.uint8:
        if x.shape[-1] != 3:
            raise PipelineError(f"uint8 images of shape {tuple(x.shape)}: expected (B, H, W, 3)")
        return x.astype(np.float32) / 255.0
    if x.shape[1] != 3:
        raise PipelineError(f"float images of shape {tuple(x.shape)}: expected normalized (B, 3, H, W)")
    x = x.transpose(0, 2, 3, 1) * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def _patch_size(image_hw: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
    (H, W), (gh, gw) = image_hw, grid
    if gh < 1 or gw < 1 or H % gh or W % gw:
        raise PipelineError(f"patch grid {tuple(grid)} does not divide images of {H}x{W} pixels")
    return H // gh, W // gw


def _index_mask(idx: np.ndarray, n: int, what: str) -> np.ndarray:
    """Patch indices (K,) -> bool (n,)."""
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        bad = idx[(idx < 0) | (idx >= n)][0]
        raise PipelineError(f"{what} holds patch index {bad}; allowed 0..{n - 1} for this grid")
    out = np.zeros(n, bool)
    out[idx] = True
    return out


def _blank_axis(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)


def _image_grid(rows: int, cols: int, *, top: float, bottom: float, label_w: float = 0.45,
                extra_right: float = 0.0, min_w: float = 6.8, cell: float = 1.6, gap: float = 0.06,
                row_gap: float = 0.06) -> tuple[Figure, np.ndarray]:
    """A figure of rows x cols square image cells, laid out in inches (all arguments are inches).

    The cells are centred and the figure is at least `min_w` wide, so that one or two columns still
    leave room for the title and the legend; `label_w` is room for row labels on the left,
    `extra_right` room for colour bars on the right.
    """
    grid_w = cols * cell + (cols - 1) * gap
    grid_h = rows * cell + (rows - 1) * row_gap
    fig_w = max(min_w, label_w + grid_w + extra_right + 0.1)
    left = max(label_w, (fig_w - extra_right - grid_w) / 2)
    fig_h = top + grid_h + bottom
    fig = Figure(figsize=(fig_w, fig_h))
    axes = fig.subplots(rows, cols, squeeze=False)
    fig.subplots_adjust(left=left / fig_w, right=(left + grid_w) / fig_w, top=1 - top / fig_h,
                        bottom=bottom / fig_h, wspace=gap / cell, hspace=row_gap / cell)
    return fig, axes


# --------------------------------------------------------------------------------------------- masks


def mask_overlay(image: np.ndarray, enc: np.ndarray, pred: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """One image with its masks tinted: image float (H, W, 3) in [0, 1], enc (Kc,), pred (M, Kt) patch
    indices (row-major on `grid`) -> float (H, W, 3).

    Context patches are blended with CONTEXT_COLOR, target block m with TARGET_COLORS[m] (later blocks on
    top where targets overlap); patches in neither keep their pixels exactly.
    """
    gh, gw = grid
    ph, pw = _patch_size(image.shape[:2], grid)
    n = gh * gw

    def up(mask: np.ndarray) -> np.ndarray:  # (n,) patches -> (H, W, 1) pixels
        return np.kron(mask.reshape(gh, gw), np.ones((ph, pw), bool))[..., None]

    out = image.astype(np.float32).copy()
    ctx = up(_index_mask(enc, n, "masks_enc"))
    out = np.where(ctx, (1 - CONTEXT_ALPHA) * out + CONTEXT_ALPHA * np.array(CONTEXT_COLOR), out)
    for m, block in enumerate(np.asarray(pred).reshape(len(pred), -1)):
        color = np.array(TARGET_COLORS[m % len(TARGET_COLORS)])
        tgt = up(_index_mask(block, n, f"masks_pred block {m}"))
        out = np.where(tgt, (1 - TARGET_ALPHA) * out + TARGET_ALPHA * color, out)
    return out.astype(np.float32)


def _outline_segments(mask: np.ndarray, grid: tuple[int, int], patch: tuple[int, int]) -> list:
    """Pixel-space line segments along the outer edges of the patches in bool mask (n,)."""
    gh, gw = grid
    ph, pw = patch
    m = np.pad(mask.reshape(gh, gw), 1)
    segs = []
    for r, c in zip(*np.nonzero(m[1:-1, 1:-1]), strict=True):
        y0, y1, x0, x1 = r * ph - 0.5, (r + 1) * ph - 0.5, c * pw - 0.5, (c + 1) * pw - 0.5
        if not m[r, c + 1]:
            segs.append([(x0, y0), (x1, y0)])
        if not m[r + 2, c + 1]:
            segs.append([(x0, y1), (x1, y1)])
        if not m[r + 1, c]:
            segs.append([(x0, y0), (x0, y1)])
        if not m[r + 1, c + 2]:
            segs.append([(x1, y0), (x1, y1)])
    return segs


def _draw_masks(ax, image: np.ndarray, enc: np.ndarray, pred: np.ndarray, grid: tuple[int, int]) -> None:
    """The tinted image plus each target block outlined in its colour."""
    ax.imshow(mask_overlay(image, enc, pred, grid), interpolation="nearest")
    patch = _patch_size(image.shape[:2], grid)
    n = grid[0] * grid[1]
    for m, block in enumerate(np.asarray(pred).reshape(len(pred), -1)):
        segs = _outline_segments(_index_mask(block, n, "masks_pred"), grid, patch)
        ax.add_collection(LineCollection(segs, colors=[TARGET_COLORS[m % len(TARGET_COLORS)]], linewidths=1.6))
    _blank_axis(ax)


def _mask_legend(fig: Figure, num_blocks: int) -> None:
    handles = [Patch(facecolor=CONTEXT_COLOR, alpha=CONTEXT_ALPHA + 0.2, label="context (encoder input)")]
    handles += [Patch(facecolor=TARGET_COLORS[m % len(TARGET_COLORS)], label=f"target {m + 1}")
                for m in range(num_blocks)]
    handles.append(Patch(facecolor="white", edgecolor="0.5", label="neither (dropped)"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=8, frameon=False)


def mask_overlay_grid(images: Tensor | np.ndarray, masks_enc: Tensor, masks_pred: Tensor, grid: tuple[int, int],
                      path: str | Path, title: str = "") -> Path:
    """One column per image: the image above, the same image with its masks below.

    images: normalized float (B, 3, H, W) or uint8 (B, H, W, 3); masks_enc (B, Kc) and masks_pred
    (B, M, Kt): patch indices on the (gh, gw) `grid`, as `MaskSampler.sample` returns them. Context
    patches are tinted blue; each target block is tinted and outlined in its own colour (legend below).
    """
    imgs = to_display(images)
    enc, pred = _numpy(masks_enc), _numpy(masks_pred)
    B = len(imgs)
    if enc.ndim != 2 or pred.ndim != 3 or len(enc) != B or len(pred) != B:
        raise PipelineError(f"masks of shapes {tuple(enc.shape)} and {tuple(pred.shape)} for {B} images: "
                            "expected (B, Kc) and (B, M, Kt)")
    fig, axes = _image_grid(2, B, top=0.5, bottom=0.6)
    for b in range(B):
        axes[0, b].imshow(imgs[b], interpolation="nearest")
        _blank_axis(axes[0, b])
        _draw_masks(axes[1, b], imgs[b], enc[b], pred[b], grid)
    axes[0, 0].set_ylabel("image", fontsize=9)
    axes[1, 0].set_ylabel("masks", fontsize=9)
    _mask_legend(fig, pred.shape[1])
    fig.suptitle(title or f"I-JEPA masks on a {grid[0]}x{grid[1]} patch grid", fontsize=10)
    return _save(fig, path)


def _feasible(cfg: MaskConfig, grid: tuple[int, int], n: int, seed: int) -> tuple[MaskConfig, Tensor, Tensor]:
    """Sample `cfg` on `grid`; if its min_keep is infeasible for this strategy/grid, retry with min_keep=1."""
    try:
        return cfg, *MaskSampler(cfg, grid, seed).sample(n, 0)
    except ValueError:
        cfg = replace(cfg, min_keep=1)
        return cfg, *MaskSampler(cfg, grid, seed).sample(n, 0)


def mask_strategies_figure(cfg: MaskConfig, grid: tuple[int, int], path: str | Path, n: int = 4,
                           seed: int = 0) -> Path:
    """One row per strategy in MASK_STRATEGIES, `n` samples each, drawn on a plain patch grid.

    Every strategy uses `cfg` with only `strategy` changed; where `cfg.min_keep` is infeasible for a
    strategy on this grid it drops to 1 for that row (the row label says so).
    """
    gh, gw = int(grid[0]), int(grid[1])
    ps = max(4, 64 // max(gh, gw))  # pixels per patch: cells big enough to see
    canvas = np.full((gh * ps, gw * ps, 3), 0.93, np.float32)
    canvas[::ps, :] = canvas[:, ::ps] = 0.8  # faint patch lines
    plain = canvas[None].repeat(n, 0)
    S = len(MASK_STRATEGIES)
    fig, axes = _image_grid(S, n, top=0.45, bottom=0.6, label_w=1.2)
    most_blocks = 1
    for i, strategy in enumerate(MASK_STRATEGIES):
        used, enc, pred = _feasible(replace(cfg, strategy=strategy), (gh, gw), n, seed)
        most_blocks = max(most_blocks, pred.shape[1])
        for b in range(n):
            _draw_masks(axes[i, b], plain[b], enc[b].numpy(), pred[b].numpy(), (gh, gw))
        note = "" if used.min_keep == cfg.min_keep else "\n(min_keep=1)"
        axes[i, 0].set_ylabel(f"{strategy}\nM={pred.shape[1]}, Kc={enc.shape[1]}{note}", fontsize=8)
    _mask_legend(fig, most_blocks)
    fig.suptitle(f"Masking strategies on a {gh}x{gw} patch grid (seed {seed})", fontsize=10)
    return _save(fig, path)


# -------------------------------------------------------------------------------------------- curves

CURVE_LABELS = {
    "loss": "loss (log scale)",
    "pred_loss": "prediction loss (without the regulariser)",
    "reg_loss": "regulariser loss (optim.reg)",
    "lr": "learning rate",
    "wd": "weight decay",
    "momentum": "EMA momentum (target encoder)",
    "target_std": "target feature std, training batch",
    "rankme": "RankMe, centred, held-out (collapse if low)",
    "feature_std": "pooled feature std, held-out (collapse if low)",
    "position_share": "variance share of patch position",
    "image_share": "variance share of the image",
    "heldout_loss": "held-out loss",
    "trivial_loss": "context-mean predictor's loss",
    "images_per_s": "throughput (images / s)",
}


def _redundant(history: pd.DataFrame, col: str) -> bool:
    """Without a regulariser, pred_loss repeats loss and reg_loss is 0: no panel for them."""
    if col == "pred_loss" and "loss" in history.columns:
        return bool(history["pred_loss"].equals(history["loss"]))
    return col == "reg_loss" and bool((history["reg_loss"].fillna(0) == 0).all())


def training_curves(history: pd.DataFrame, path: str | Path, *, collapse_std_min: float | None = None,
                    collapse_rank_min: float | None = None, collapse_std_drop: float | None = None,
                    title: str = "") -> Path:
    """One panel per curve against `step`: the columns of CURVE_LABELS that are present, in that order,
    then any other numeric column. Loss is log-scaled (when positive) with a moving average over long
    runs; `collapse_std_min` / `collapse_rank_min` (PretrainConfig's alarms) are dashed red lines on the
    feature_std / rankme panels, and `collapse_std_drop` (the relative alarm's level: collapse_std_drop x
    the init's feature std) a dotted one on the feature_std panel.
    """
    if "step" not in history.columns:
        raise PipelineError(f"history columns {list(history.columns)} lack 'step'")
    others = [c for c in history.columns if c != "step" and c not in CURVE_LABELS
              and pd.api.types.is_numeric_dtype(history[c])]
    cols = [c for c in CURVE_LABELS if c in history.columns and not _redundant(history, c)] + others
    if not cols:
        raise PipelineError(f"history columns {list(history.columns)} hold no curve; expected any of "
                            f"{list(CURVE_LABELS)}")
    thresholds = {"feature_std": collapse_std_min, "rankme": collapse_rank_min}
    ncol = min(3, len(cols))
    nrow = math.ceil(len(cols) / ncol)
    # Fixed margins in inches rather than a layout engine: constrained layout doubles the drawing time.
    panel_w, panel_h, gap_w, gap_h, left, right, top, bottom = 3.4, 2.0, 0.75, 0.75, 0.7, 0.2, 0.75, 0.45
    fig_w = left + right + ncol * panel_w + (ncol - 1) * gap_w
    fig_h = top + bottom + nrow * panel_h + (nrow - 1) * gap_h
    fig = Figure(figsize=(fig_w, fig_h))
    axes = fig.subplots(nrow, ncol, squeeze=False).ravel()
    fig.subplots_adjust(left=left / fig_w, right=1 - right / fig_w, top=1 - top / fig_h, bottom=bottom / fig_h,
                        wspace=gap_w / panel_w, hspace=gap_h / panel_h)
    for ax, col in zip(axes, cols, strict=False):
        d = history[["step", col]].dropna().sort_values("step")
        x, y = d["step"].to_numpy(float), d[col].to_numpy(float)
        ax.plot(x, y, lw=1.2, color="C0", alpha=0.45 if col == "loss" and len(y) >= 50 else 1.0, label=col)
        if col == "loss" and len(y) >= 50:
            window = max(5, len(y) // 25)
            ax.plot(x, pd.Series(y).rolling(window, center=True, min_periods=1).mean(), lw=1.6, color="C0",
                    label=f"moving average ({window})")
            ax.legend(fontsize=7, loc="upper right")
        if col == "loss" and len(y) and (y > 0).all():
            ax.set_yscale("log")
        alarm_lines = [(thresholds.get(col), "--", "collapse alarm")]
        if col == "feature_std":
            alarm_lines.append((collapse_std_drop, ":", "collapse alarm, relative to init"))
        alarm_lines = [line for line in alarm_lines if line[0] is not None]
        for level, style, name in alarm_lines:
            ax.axhline(level, ls=style, color="C3", lw=1.2, label=f"{name} ({level:.3g})")
        if alarm_lines:
            ax.legend(fontsize=7, loc="best")
        ax.set_title(CURVE_LABELS.get(col, col), fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(which="both", labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(cols):]:
        ax.set_visible(False)
    fig.suptitle(title or "Pretraining curves", fontsize=11, y=1 - 0.12 / fig_h, va="top")
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------- PCA


def pca_rgb(tokens: Tensor, grid: tuple[int, int], n_components: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Patch tokens (B, N, D) -> (maps float (B, gh, gw, 3) in [0, 1], explained variance ratio (k,)).

    One PCA over all B*N patches together (exact SVD of the centred tokens, signs fixed so each
    component's largest loading is positive: deterministic). Each component is min-max scaled over all
    images to one colour channel; with k < 3 components the remaining channels stay 0.
    """
    if not 1 <= n_components <= 3:
        raise PipelineError(f"n_components = {n_components}; allowed 1, 2 or 3 (RGB channels)")
    B, N, D = tokens.shape
    gh, gw = grid
    if N != gh * gw:
        raise PipelineError(f"{N} patch tokens do not fill the {gh}x{gw} patch grid")
    x = tokens.detach().float().cpu().reshape(B * N, D)
    x = x - x.mean(0)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    k = min(n_components, vh.shape[0])
    v = vh[:k]
    v = v * torch.sign(v.gather(1, v.abs().argmax(1, keepdim=True)))
    proj = x @ v.T  # (B*N, k)
    lo, hi = proj.min(0).values, proj.max(0).values
    proj = (proj - lo) / (hi - lo).clamp_min(1e-12)
    rgb = torch.zeros(B * N, 3)
    rgb[:, :k] = proj
    var = (s**2) / (s**2).sum().clamp_min(1e-12)
    return rgb.reshape(B, gh, gw, 3).numpy(), var[:k].numpy()


@torch.no_grad()
def pca_feature_map(encoder: torch.nn.Module, images: Tensor, path: str | Path, n_components: int = 3) -> Path:
    """The DINO-style picture: each image above the PCA of its patch features as an RGB map.

    encoder: a `pipeline.models.encoder.Encoder` (run in eval mode without grad; its mode is restored);
    images: normalized float (B, 3, H, W). Tokens (B, N, D) -> `pca_rgb`. No foreground thresholding
    (DINOv2 keeps patches above a threshold on the first component): the sign and meaning of that
    component is arbitrary for a new model and the scenes have no single background class, so the
    threshold would need hand-tuning per checkpoint; the full map is shown instead.
    """
    was_training = encoder.training
    encoder.eval()
    try:
        device = next(encoder.parameters()).device
        tokens = encoder(images.to(device))
    finally:
        encoder.train(was_training)
    grid = tuple(getattr(encoder, "grid_size", (int(math.isqrt(tokens.shape[1])),) * 2))
    maps, var = pca_rgb(tokens, grid, n_components)
    imgs = to_display(images)
    B = len(imgs)
    H, W = imgs.shape[1:3]
    fig, axes = _image_grid(2, B, top=0.65, bottom=0.1)
    for b in range(B):
        axes[0, b].imshow(imgs[b], interpolation="nearest")
        axes[1, b].imshow(maps[b], interpolation="nearest", extent=(-0.5, W - 0.5, H - 0.5, -0.5))
        _blank_axis(axes[0, b])
        _blank_axis(axes[1, b])
    axes[0, 0].set_ylabel("image", fontsize=9)
    axes[1, 0].set_ylabel("patch PCA", fontsize=9)
    channels = "RGB"[: len(var)]
    explained = ", ".join(f"{c}={100 * v:.0f}%" for c, v in zip(channels, var, strict=True))
    fig.suptitle(f"PCA of patch features ({grid[0]}x{grid[1]} patches, one PCA over all images)\n"
                 f"components -> {channels}; variance explained {explained}", fontsize=9)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------- depth


def depth_panel(images: Tensor | np.ndarray, pred: np.ndarray | Tensor, gt: np.ndarray | Tensor, path: str | Path,
                max_depth: float = 10.0) -> Path:
    """Columns per image; rows image / ground truth / prediction / |error|.

    images normalized float (B, 3, H, W) (or uint8 (B, H, W, 3)); pred, gt (B, H, W) in metres. Ground
    truth and prediction share one colour scale 0..max_depth; the error has its own 0..max scale over
    the panel. Pixels with gt <= 0 or not finite (NYU's holes) are left out of the error (grey).
    """
    imgs = to_display(images)
    p, g = _numpy(pred).astype(np.float32), _numpy(gt).astype(np.float32)
    if p.shape != g.shape or p.ndim != 3 or len(p) != len(imgs):
        raise PipelineError(f"depth pred {tuple(p.shape)} and gt {tuple(g.shape)} for {len(imgs)} images: "
                            "expected both (B, H, W)")
    valid = np.isfinite(g) & (g > 0)
    err = np.where(valid, np.abs(p - g), np.nan)
    emax = float(np.nanmax(err)) if valid.any() else 1.0
    B = len(imgs)
    fig, axes = _image_grid(4, B, top=0.45, bottom=0.1, extra_right=1.0, row_gap=0.3, min_w=5.0)
    depth_kw = {"cmap": "viridis_r", "vmin": 0.0, "vmax": max_depth, "interpolation": "nearest"}
    for b in range(B):
        axes[0, b].imshow(imgs[b], interpolation="nearest")
        im_d = axes[1, b].imshow(np.where(valid[b], g[b], np.nan), **depth_kw)
        axes[2, b].imshow(p[b], **depth_kw)
        im_e = axes[3, b].imshow(err[b], cmap="magma", vmin=0.0, vmax=max(emax, 1e-6), interpolation="nearest")
        rmse = float(np.sqrt(np.nanmean(err[b] ** 2))) if valid[b].any() else float("nan")
        axes[3, b].set_title(f"RMSE {rmse:.2f} m", fontsize=8)
        for r in range(4):
            _blank_axis(axes[r, b])
            axes[r, b].set_facecolor("0.6")
    for r, name in enumerate(("image", "ground truth", "prediction", "|error|")):
        axes[r, 0].set_ylabel(name, fontsize=9)
    # Colour bars beside the rows they explain: depth for gt + prediction, error for the last row.
    right = axes[0, -1].get_position().x1 + 0.15 / fig.get_figwidth()
    width = 0.12 / fig.get_figwidth()
    gt_box, pred_box, err_box = (axes[r, -1].get_position() for r in (1, 2, 3))
    cax_d = fig.add_axes((right, pred_box.y0, width, gt_box.y1 - pred_box.y0))
    fig.colorbar(im_d, cax=cax_d).set_label("depth (m)", fontsize=8)
    cax_e = fig.add_axes((right, err_box.y0, width, err_box.height))
    fig.colorbar(im_e, cax=cax_e).set_label("|error| (m)", fontsize=8)
    for cax in (cax_d, cax_e):
        cax.tick_params(labelsize=7)
    fig.suptitle("Depth: ground truth vs prediction", fontsize=10)
    return _save(fig, path)


# --------------------------------------------------------------------------------------------- table


def _fmt(v: object) -> str:
    if isinstance(v, (float, np.floating)):
        if not np.isfinite(v):
            return "-"
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.2e}"
    return str(v)


def table_image(df: pd.DataFrame, path: str | Path, title: str = "", columns: Sequence[str] | None = None) -> Path:
    """The table `df` (optionally only `columns`) rendered as a PNG: bold header, banded rows, numbers to
    4 significant digits, NaN as "-". A non-default index becomes the first column."""
    if columns is not None:
        df = df[list(columns)]
    if not isinstance(df.index, pd.RangeIndex):
        df = df.reset_index()
    if df.shape[1] == 0:
        raise PipelineError("table_image: the table has no columns")
    cells = [[_fmt(v) for v in row] for row in df.itertuples(index=False)] or [["(empty)"] + [""] * (df.shape[1] - 1)]
    header = [str(c) for c in df.columns]
    widths = [max(len(s) for s in [h] + [r[j] for r in cells]) for j, h in enumerate(header)]
    fig_w = min(24.0, max(4.0, 0.085 * sum(w + 3 for w in widths) + 0.4))
    row_h, top = 0.32, (0.6 if title else 0.1)  # inches
    fig_h = row_h * (len(cells) + 1) + top + 0.1
    fig = Figure(figsize=(fig_w, fig_h))
    ax = fig.add_axes((0.02, 0.1 / fig_h, 0.96, 1 - (top + 0.1) / fig_h))
    ax.axis("off")
    table = ax.table(cellText=cells, colLabels=header, bbox=(0, 0, 1, 1), cellLoc="center",
                     colWidths=[(w + 3) / sum(v + 3 for v in widths) for w in widths])
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    for (r, _c), cell in table.get_celld().items():
        cell.set_edgecolor("0.75")
        if r == 0:
            cell.set_facecolor("0.85")
            cell.set_text_props(weight="bold")
        elif r % 2 == 0:
            cell.set_facecolor("0.96")
    if title:
        fig.suptitle(title, fontsize=11, y=1 - 0.15 / fig_h, va="top")
    return _save(fig, path)
