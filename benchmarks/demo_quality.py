"""Does a short I-JEPA pretraining beat random init on the embedded scenes? One process, no Ray, no MLflow.

    python benchmarks/demo_quality.py --steps 222 --set optim.ema=[0.98,1.0]
    python benchmarks/demo_quality.py --seeds 3 --random-seeds 5   # the preset against the random band
    python benchmarks/demo_quality.py --steps 444 --objects 1 2 --object-size 0.5 0.8 --object-depth 3.2 5.0

Renders the scenes once (cached as .npz under .cache/), pretrains with `pipeline.step.train_step` on
the demo preset (plus any `--set key=value` overrides, values in YAML), then fits a logistic-regression
probe (standardised features, L2, C=0.1) on mean-pooled features of the TARGET encoder, the CONTEXT
encoder and a random-init twin, for both views (last layer, last 4 layers), on two labels: the shape
class (8) and the object count (3..10); `shape_1pct` is the shape probe fit on 12 scenes a class only,
and `shape_share` the share of the features' variance the shape class explains (`class_share`).
The `--objects`, `--object-size` and `--object-depth` flags render the scenes with another `Layout`
(`benchmarks/scenes.py` checks its labels' honesty); with one object a scene the count probe is skipped.
Prints one JSON object. Probing the context encoder too tells whether a gap comes from the EMA lag of
the target or from what was learnt.

A diagnostic for tuning the demo preset. One run is one pretraining seed: differences of ~2 points are
within the noise of 800 validation scenes, and at 222 steps the seed alone moves the shape score by ~3
points, so compare settings with `--seeds` against `--random-seeds`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/demo_quality.py` from the root

import pipeline.data.scenes as scenes_module  # noqa: E402
from benchmarks.readouts import readout  # noqa: E402
from benchmarks.scenes import add_layout_args, layout_from_args  # noqa: E402
from pipeline.atomic import atomic_write  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data.scenes import ROOM, Layout, render_many  # noqa: E402
from pipeline.data.transforms import CROP_SCALE, IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from pipeline.diagnostics import diagnose  # noqa: E402
from pipeline.masks import MaskSampler  # noqa: E402
from pipeline.models.encoder import build_encoder  # noqa: E402
from pipeline.models.ijepa import build_ijepa  # noqa: E402
from pipeline.schedules import Schedules  # noqa: E402
from pipeline.step import build_optimizer, train_step  # noqa: E402
from pipeline.train import DIAG_MASK_STEP  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VAL_OFFSET = 1_000_000  # validation scene indices start here: disjoint from the training scenes
SUBSET_PER_CLASS = 12  # shape_1pct: the probe on 12 labelled scenes a class, as the pipeline's 1 % list


def cache_path(stem: str, suffix: str, layout: Layout = ROOM) -> Path:
    """.cache/<stem>_<hash><suffix>: the hash is of the generator's source and of `layout` if not the
    default, so an edit of scenes.py or another layout renders afresh instead of reusing the old scenes."""
    source = Path(scenes_module.__file__).read_bytes() + (b"" if layout == ROOM else repr(layout).encode())
    generator = hashlib.sha256(source).hexdigest()[:12]
    return ROOT / ".cache" / f"{stem}_{generator}{suffix}"


def scenes(seed: int, n_train: int, n_val: int, size: int, processes: int,
           layout: Layout = ROOM) -> dict[str, np.ndarray]:
    """Images (n, S, S, 3) uint8, shape labels and counts for train and val, cached on disk.

    Cached under `cache_path`, whose name follows the generator's source and the layout.
    """
    path = cache_path(f"demo_quality_{seed}_{n_train}_{n_val}_{size}", ".npz", layout)
    if not path.is_file():
        tr = render_many(seed, range(n_train), size, processes=processes, layout=layout)
        va = render_many(seed, range(VAL_OFFSET, VAL_OFFSET + n_val), size, processes=processes, layout=layout)
        arrays = dict(xtr=np.stack([s.image for s in tr]), xva=np.stack([s.image for s in va]),
                      ytr=[s.label for s in tr], yva=[s.label for s in va],
                      ctr=[s.count for s in tr], cva=[s.count for s in va])
        atomic_write(path, lambda tmp: np.savez(tmp, **arrays))  # two runs at once: neither reads a half file
    return dict(np.load(path))


def extra_scenes(seed: int, start: int, stop: int, size: int, processes: int, layout: Layout = ROOM) -> np.ndarray:
    """Images (stop - start, S, S, 3) uint8 of the unlabelled training scenes start..stop-1, cached on disk:
    more pretraining data than the probes' train set (whose scenes are 0..start-1)."""
    path = cache_path(f"demo_quality_extra_{seed}_{start}_{stop}_{size}", ".npy", layout)
    if not path.is_file():
        images = np.stack([s.image for s in render_many(seed, range(start, stop), size, processes=processes,
                                                        layout=layout)])
        atomic_write(path, lambda tmp: np.save(tmp, images))
    return np.load(path)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(n, S, S, 3) uint8 -> (n, 3, S, S) float, ImageNet-normalised."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def grey(images: np.ndarray) -> np.ndarray:
    """(n, S, S, 3) uint8 -> the same shape, every channel the luma (ITU-R 601): the colour cue removed."""
    y = images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return np.repeat(np.clip(y + 0.5, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)


VIEWS = ("last", "last4")
STD_VIEWS = ("std_last", "mean_std_last")  # --std: label-free readouts other than the paper's mean pooling
READOUT = {"last": "mean", "std_last": "std", "mean_std_last": "mean_std"}  # benchmarks/readouts.py's names


@torch.no_grad()
def pooled(encoder: torch.nn.Module, x: torch.Tensor, view: str) -> np.ndarray:
    """Features of the frozen encoder, one row per image: "last" (n, D) the last layer's patch tokens
    mean-pooled, "last4" (n, 4D) the last 4 layers' means concatenated (the paper's readouts);
    "std_last" (n, D) the last layer's per-channel std over the patches, "mean_std_last" (n, 2D) both."""
    if view not in VIEWS + STD_VIEWS:
        raise ValueError(f"view {view!r}: expected one of {VIEWS + STD_VIEWS}")
    encoder.eval()
    out = []
    for i in range(0, len(x), 200):
        layers = encoder.forward_layers(x[i:i + 200], 4)  # 4 x (b, N, D)
        if view == "last4":
            out.append(torch.cat([t.mean(1) for t in layers], 1))
        else:
            out.append(readout(layers[-1], READOUT[view]))
    return torch.cat(out).numpy()


def subset_rows(labels: np.ndarray, per_class: int) -> np.ndarray:
    """The first `per_class` rows of each class: the benchmark's "1 %" list (ImageNet-1 %'s ~12.8 a class)."""
    return np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)])


def class_share(x: np.ndarray, y: np.ndarray) -> float:
    """Share of the standardised features' (n, D) total variance that the class means explain: the R^2 of
    regressing every feature on the one-hot label. Near 0: the label is a small direction among the
    features' variation, which few labels cannot find (a full-label probe still may). Labels unrelated to
    the features score about (C - 1) / n for C classes (0.003 for 8 classes on 2,400 scenes)."""
    z = (x - x.mean(0)) / np.maximum(x.std(0), 1e-8)
    means = np.zeros_like(z)
    for c in np.unique(y):
        means[y == c] = z[y == c].mean(0)
    return round(float((means**2).sum() / (z**2).sum()), 4)


def logistic_top1(a: np.ndarray, ya: np.ndarray, b: np.ndarray, yb: np.ndarray) -> float:
    """Top-1 (%) on (b, yb) of a logistic regression (standardised features, L2, C=0.1) fit on (a, ya)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000, C=0.1)).fit(a, ya)
    return round(100 * clf.score(b, yb), 2)


def probe(encoder: torch.nn.Module, xtr: torch.Tensor, xva: torch.Tensor, d: dict,
          views: tuple[str, ...] = VIEWS) -> dict[str, float]:
    out = {}
    for view in views:
        a, b = pooled(encoder, xtr, view), pooled(encoder, xva, view)
        for task, ya, yb in (("shape", d["ytr"], d["yva"]), ("count", d["ctr"], d["cva"])):
            if len(np.unique(ya)) > 1:  # one object a scene (--objects 1 1): no count to probe
                out[f"{task}.{view}"] = logistic_top1(a, ya, b, yb)
        few = subset_rows(d["ytr"], SUBSET_PER_CLASS)
        out[f"shape_1pct.{view}"] = logistic_top1(a[few], d["ytr"][few], b, d["yva"])
        out[f"shape_share.{view}"] = class_share(a, d["ytr"])
    return out


def pretrain(cfg, xtr: torch.Tensor, steps: int, at: dict[int, callable] | None = None,
             epoch_size: int | None = None,
             model_hook: callable | None = None) -> tuple[torch.nn.Module, dict[str, float]]:
    """I-JEPA on `xtr` (n, 3, S, S) for `steps` rounded to whole epochs; (model, timing and final loss).

    `epoch_size` (default len(xtr)) sets the schedules' epoch (the batches are drawn with replacement):
    more scenes at the same epoch size keep the schedules step for step. `at` maps step counts to
    callbacks `fn(model)` run after that many steps (a learning curve on one schedule); their time is not
    counted in `train_s`. `model_hook(model)`, if given, may alter the freshly built model before training
    (benchmarks/collapse_alarms.py removes its stop-gradient).
    """
    import torchvision.transforms.v2 as T

    S, B = cfg.data.image_size, cfg.pretrain.batch_size
    aug = T.Compose([T.RandomResizedCrop(S, scale=CROP_SCALE, antialias=True), T.RandomHorizontalFlip()])
    torch.manual_seed(cfg.pretrain.seed)
    model = build_ijepa(cfg)
    if model_hook is not None:
        model_hook(model)
    sampler = MaskSampler(cfg.mask, model.encoder.grid_size, seed=cfg.pretrain.seed)
    steps_per_epoch = (epoch_size or len(xtr)) // B
    sched = Schedules(cfg.optim, steps_per_epoch, max(1, round(steps / steps_per_epoch)))
    opt = build_optimizer(model, cfg.optim)
    model.train()
    t0, losses, paused = time.perf_counter(), [], 0.0
    for step in range(sched.total_steps):
        idx = torch.randint(0, len(xtr), (B,))
        masks_enc, masks_pred = sampler.sample(B, step)
        out = train_step(model, opt, sched, step, torch.stack([aug(xtr[i]) for i in idx]), masks_enc, masks_pred)
        losses.append(out.loss.item())
        if at and step + 1 in at:
            t_cb = time.perf_counter()
            with torch.random.fork_rng(devices=[]):
                at[step + 1](model)
            model.train()
            paused += time.perf_counter() - t_cb
    wall = time.perf_counter() - t0 - paused
    return model, {"steps": sched.total_steps, "train_s": round(wall, 1),
                   "images_per_s": round(sched.total_steps * B / wall, 1),
                   "final_loss": round(float(np.mean(losses[-10:])), 4)}


def diagnostics(model: torch.nn.Module, cfg, xva: torch.Tensor, n: int = 256) -> dict[str, float]:
    """`pipeline.diagnostics.diagnose` on the first n val scenes with fixed masks, rounded."""
    masks = MaskSampler(cfg.mask, model.encoder.grid_size, seed=cfg.pretrain.seed).sample(n, DIAG_MASK_STEP)
    return {k: round(v, 4) for k, v in diagnose(model, xva[:n], *masks).items()}


def band(runs: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """`probe` results of several encoders -> {figure: {mean, std, min, max}}."""
    return {f: {"mean": round(float(np.mean(v)), 2), "std": round(float(np.std(v, ddof=1)), 2) if len(v) > 1 else 0.0,
                "min": min(v), "max": max(v)}
            for f in runs[0] for v in [[r[f] for r in runs]]}


def random_band(cfg, xtr: torch.Tensor, xva: torch.Tensor, d: dict, k: int,
                views: tuple[str, ...] = VIEWS) -> dict[str, dict[str, float]]:
    """{figure: {mean, std, min, max}} over `k` random-init encoders (seeds pretrain.seed + 2 ...)."""
    runs = []
    for i in range(k):
        torch.manual_seed(cfg.pretrain.seed + 2 + i)
        runs.append(probe(build_encoder(cfg.model, cfg.data.image_size), xtr, xva, d, views))
    return band(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=222,
                    help="pretraining steps (rounded to whole epochs); 0: probe random inits only")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a params override")
    ap.add_argument("--train", type=int, default=2400)
    ap.add_argument("--val", type=int, default=800)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pretrain-scenes", type=int, default=0, metavar="N",
                    help="pretrain on N scenes (the probes' --train scenes plus unlabelled ones up to N); "
                         "0: on the --train scenes, as the pipeline does")
    ap.add_argument("--seeds", type=int, default=1, metavar="N",
                    help="pretrain N times (pretrain.seed, +1, ...): every run, and the band of the target's figures; "
                         "at the demo's 222 steps the seed moves the scores as much as any setting")
    ap.add_argument("--random-seeds", type=int, default=0, metavar="K",
                    help="also probe K more random inits (seeds pretrain.seed+2..): mean, std, min and max of "
                         "each figure, the band a pretrained score has to leave to count as a gain")
    ap.add_argument("--curve", type=int, nargs="*", default=[], metavar="STEP",
                    help="also probe the target encoder after these steps of the first seed's schedule "
                         "(where does the early dip end?)")
    ap.add_argument("--grey", action="store_true",
                    help="also probe the count on grey-level images (target and random encoders), where the "
                         "colour-diversity cue of benchmarks/count_cues.py is gone")
    ap.add_argument("--std", action="store_true",
                    help="also probe the last layer's per-channel std over the patches (std_last, mean_std_last): "
                         "label-free readouts that the paper's mean pooling discards, to compare with a random init")
    add_layout_args(ap)
    args = ap.parse_args()
    layout = layout_from_args(args)
    views = VIEWS + (STD_VIEWS if args.std else ())
    if 0 < args.pretrain_scenes < args.train:
        ap.error(f"--pretrain-scenes {args.pretrain_scenes}: expected 0 or at least --train ({args.train})")
    torch.set_num_threads(args.threads)
    over = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    cfg = load_config(ROOT / "params.yaml").replace(**over)
    S = cfg.data.image_size
    d = scenes(cfg.data.synthetic.seed, args.train, args.val, S, cfg.data.synthetic.processes, layout)
    xtr, xva = to_tensor(d["xtr"]), to_tensor(d["xva"])
    xpre = xtr
    if args.pretrain_scenes > args.train:
        more = extra_scenes(cfg.data.synthetic.seed, args.train, args.pretrain_scenes, S, cfg.data.synthetic.processes,
                            layout)
        xpre = torch.cat([xtr, to_tensor(more)])

    torch.manual_seed(cfg.pretrain.seed + 1)
    random_encoder = build_encoder(cfg.model, S)
    result = {"overrides": over}
    if layout != ROOM:
        result["layout"] = dataclasses.asdict(layout)
    if args.steps > 0:
        runs = []
        for i in range(args.seeds):
            seed_cfg = cfg.replace(**{"pretrain.seed": cfg.pretrain.seed + i})
            curve: dict[int, dict[str, float]] = {}
            at = {k: (lambda mdl, k=k, c=curve, sc=seed_cfg: c.__setitem__(
                      k, {**probe(mdl.target_encoder, xtr, xva, d, views), **diagnostics(mdl, sc, xva)}))
                  for k in (args.curve if i == 0 else [])}
            m, stats = pretrain(seed_cfg, xpre, args.steps, at, epoch_size=len(xtr))
            if curve:
                stats["curve"] = curve
            if i == 0:
                model = m  # the first seed's: the one the --grey probe reads
            runs.append({"seed": seed_cfg.pretrain.seed, **stats, "target": probe(m.target_encoder, xtr, xva, d, views),
                         "context": probe(m.encoder, xtr, xva, d, views), "diagnostics": diagnostics(m, seed_cfg, xva)})
        result.update({k: v for k, v in runs[0].items() if k != "seed"})
        if args.seeds > 1:
            result["seeds"] = runs
            result["target_band"] = band([r["target"] for r in runs])
    result["random"] = probe(random_encoder, xtr, xva, d, views)
    torch.manual_seed(cfg.pretrain.seed + 1)  # the same encoder weights as random_encoder, plus a predictor
    result["random_diagnostics"] = diagnostics(build_ijepa(cfg), cfg, xva)
    if args.random_seeds:
        result["random_band"] = random_band(cfg, xtr, xva, d, args.random_seeds, views)
    if args.grey and args.steps > 0:
        gtr, gva = to_tensor(grey(d["xtr"])), to_tensor(grey(d["xva"]))
        result["grey"] = {"target": probe(model.target_encoder, gtr, gva, d),
                          "random": probe(random_encoder, gtr, gva, d)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
