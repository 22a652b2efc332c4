"""Pictures of the pretrained encoder for people, not metrics: masks and DINO-style PCA feature maps.

For a fixed set of validation images (the first image of each of up to 8 classes, so reruns draw the
same pictures) it writes

    reports/masks.png            the configured masking strategy on those images
    reports/mask_strategies.png  every strategy of the paper's Table 6 on the same patch grid
    reports/pca_ijepa.png        PCA of the pretrained target encoder's patch features, as RGB
    reports/pca_random.png       the same for the random-init twin (what pretraining changed)

and logs them into the pretrain MLflow run as the child run "pictures".
"""

from __future__ import annotations

from pathlib import Path

import torch

from evals import common
from pipeline.config import Config
from pipeline.masks import MaskSampler

NAME = "pictures"
REPORT_DIR = "reports"
NUM_IMAGES = 8


def fixed_images(dataset, n: int = NUM_IMAGES) -> torch.Tensor:
    """The first item of each class (in class order, then further items) of an ImageNet-format split:
    (n, 3, S, S)."""
    first: dict[int, int] = {}
    for i, y in enumerate(dataset.targets):
        first.setdefault(int(y), i)
    chosen = [first[c] for c in sorted(first)][:n]
    chosen += [i for i in range(len(dataset)) if i not in chosen][: n - len(chosen)]
    return torch.stack([dataset[i][0] for i in chosen])


def draw(cfg: Config, encoders: dict, images: torch.Tensor, out_dir: Path) -> list[Path]:
    """All pictures for `images` (B, 3, S, S) and `encoders` {"ijepa": ..., "random": ...}."""
    from pipeline import viz

    grid = next(iter(encoders.values())).grid_size
    masks_enc, masks_pred = MaskSampler(cfg.mask, grid, cfg.pretrain.seed).sample(len(images), step=0)
    paths = [
        viz.mask_overlay_grid(images, masks_enc, masks_pred, grid, out_dir / "masks.png",
                              title=f"mask.strategy = {cfg.mask.strategy}: context (blue) and target blocks"),
        viz.mask_strategies_figure(cfg.mask, grid, out_dir / "mask_strategies.png", seed=cfg.pretrain.seed),
    ]
    for name, enc in encoders.items():
        paths.append(viz.pca_feature_map(enc.cpu(), images, out_dir / f"pca_{name}.png"))
    return paths


def run(cfg: Config, root: str | Path | None = None) -> list[Path]:
    """The pictures stage: draw, write under reports/, log the child run "pictures"."""
    from evals.linear import imagenet_splits
    from pipeline import tracking

    ctx = common.prepare(cfg, root)
    _, val = imagenet_splits(cfg, ctx.root)
    paths = draw(cfg, ctx.encoders, fixed_images(val), ctx.root / REPORT_DIR)
    tracking.connect(cfg.mlflow, ctx.root)
    with tracking.child_run(ctx.run_id, NAME, {"mask.strategy": cfg.mask.strategy, "images": NUM_IMAGES}):
        for p in paths:
            tracking.log_artifact(p)
    return paths
