"""The per-worker pretraining loop: one process per Ray worker (or alone, for tests and benchmarks).

Nothing here imports Ray. `pipeline.launch` runs `train_worker` inside a TorchTrainer, which has set up
`torch.distributed` (gloo on CPU, nccl on GPU); the loop reads rank and world size from it, so the same
function runs alone in a test.

Data order, a function of (seed, epoch, step) only. Each epoch is a seeded permutation of the dataset,
cut into global batches of `pretrain.batch_size` (the tail that does not fill one is dropped); rank r
takes the r-th slice of `batch_size / world` images of every global batch. So the images of a global
step do not depend on the number of workers, and resuming at step k mid-epoch is exact: the loader
starts at batch k of the same permutation. (DistributedSampler would shard by striding instead and
cannot start mid-epoch.)

Masks: sampled per GLOBAL step, `MaskSampler.sample(batch_size, step)` for the whole global batch, and
each rank keeps its slice; this runs in the DataLoader's collate function (in its worker processes when
`data.num_workers > 0`), which learns the step from the batch sampler. The masks are therefore the same
whatever the number of Ray workers or DataLoader workers.

Steps are counted from 1: "step k" is the k-th optimiser step; metrics, checkpoints and errors use it.
Checkpoints (`CHECKPOINT_FILE` in a directory handed to `report`) hold the whole IJEPA state dict
(encoder, predictor, target encoder), the optimiser, the step, the RNG states and the logged history.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.config import Config
from pipeline.diagnostics import DIAG_COLUMNS, alarms, diagnose
from pipeline.errors import PipelineError
from pipeline.masks import MaskSampler
from pipeline.models.ijepa import IJEPA, build_ijepa
from pipeline.progress import progress
from pipeline.schedules import Schedules
from pipeline.step import autocast, build_optimizer, train_step

CHECKPOINT_FILE = "state.pt"
# Every log row has all columns; the diagnostics ones are NaN except every `pretrain.diag_every` steps.
# loss = pred_loss + optim.reg_weight * reg_loss (reg_loss 0 and pred_loss = loss when optim.reg is none).
CURVE_COLUMNS = ("step", "loss", "pred_loss", "reg_loss", "lr", "wd", "momentum", "target_std", "images_per_s",
                 *DIAG_COLUMNS)
DIAG_MASK_STEP = 2**40  # the diagnostics batch's masks: MaskSampler.sample(n, DIAG_MASK_STEP), never a training step
NO_BAD_STEP = 2**62


class Tracker(Protocol):
    """Rank 0's metric sink (an MLflow run in `pipeline.launch`)."""

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def tag(self, key: str, value: str) -> None: ...


# Called by EVERY rank at the same steps (Ray's report is a barrier); the directory only on rank 0.
ReportFn = Callable[[dict[str, Any], Path | None], None]
# (model, epochs done) -> metrics for that epoch's report, e.g. a sweep's probe score. Rank 0 only.
EpochEndFn = Callable[[IJEPA, int], dict[str, float]]


# ---------------------------------------------------------------------------------------------- data


class RandomImages(Dataset):
    """`n` fixed Gaussian images (3, S, S), seeded: a stand-in dataset for tests and benchmarks."""

    def __init__(self, n: int, image_size: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, image_size, image_size, generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i]


def pretrain_dataset(cfg: Config, root: str | Path) -> Dataset:
    """The pretraining images: ImageNet-format train split (the synthetic export by default), labels ignored."""
    from pipeline.data import ImageNetFolder, dataset_paths, train_transform  # lazy: torchvision, file lists

    return ImageNetFolder(dataset_paths(cfg.data, Path(root)).imagenet, "train",
                          train_transform(cfg.data.image_size), on_corrupt=cfg.data.on_corrupt)


def heldout_images(cfg: Config, root: str | Path) -> Tensor | None:
    """The diagnostics batch: `pretrain.diag_images` val images (n, 3, S, S), a fixed seeded choice, eval
    transform; None when diagnostics are off or the data has no val split."""
    from pipeline.data import ImageNetFolder, dataset_paths, eval_transform  # lazy: torchvision, file lists

    n = cfg.pretrain.diag_images
    if n == 0:
        return None
    try:
        val = ImageNetFolder(dataset_paths(cfg.data, Path(root)).imagenet, "val", eval_transform(cfg.data.image_size),
                             on_corrupt=cfg.data.on_corrupt)
    except PipelineError:
        return None
    return fixed_batch(val, n, cfg.pretrain.seed)


def fixed_batch(dataset: Dataset, n: int, seed: int) -> Tensor:
    """min(n, len) images (k, 3, S, S) of `dataset` (items: image or (image, label)), a seeded choice."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + 7919))  # type: ignore[arg-type]
    items = [dataset[int(i)] for i in order[:n]]
    return torch.stack([x[0] if isinstance(x, (tuple, list)) else x for x in items])


def steps_per_epoch(num_images: int, batch_size: int) -> int:
    if num_images < batch_size:
        raise PipelineError(f"pretrain.batch_size = {batch_size} is larger than the {num_images} training "
                            "images; lower it or add images")
    return num_images // batch_size


def epoch_order(num_images: int, seed: int, epoch: int) -> Tensor:
    """The permutation of epoch `epoch`: (num_images,) int64, the same on every rank."""
    return torch.randperm(num_images, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


class StepBatches(Sampler):
    """Yields, for global steps [first, last) of one epoch, this rank's [(step, index), ...] slice."""

    def __init__(self, order: Tensor, epoch_start_step: int, first: int, last: int, global_batch: int,
                 rank: int, world: int):
        self.order, self.start, self.first, self.last = order, epoch_start_step, first, last
        self.G, self.b, self.rank = global_batch, global_batch // world, rank

    def __len__(self) -> int:
        return self.last - self.first

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.first, self.last):
            lo = (step - self.start) * self.G + self.rank * self.b
            yield [(step, int(i)) for i in self.order[lo:lo + self.b]]


class StepItems(Dataset):
    """Indexed by (step, i): returns (image, step). Dataset items may be (image, label): label dropped."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:
        step, i = key
        item = self.dataset[i]
        return (item[0] if isinstance(item, (tuple, list)) else item), step


class MaskCollate:
    """Collate (image, step) items -> images (b, 3, S, S), masks_enc (b, Kc), masks_pred (b, M, Kt), step.

    The masks are this rank's rows of the global step's masks, `sample(global_batch, step)`.
    """

    def __init__(self, collator: MaskSampler, global_batch: int, rank: int, world: int):
        self.collator, self.G, self.b, self.rank = collator, global_batch, global_batch // world, rank

    def __call__(self, items: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor, Tensor, int]:
        step = items[0][1]
        masks_enc, masks_pred = self.collator.sample(self.G, step)
        rows = slice(self.rank * self.b, (self.rank + 1) * self.b)
        return torch.stack([x for x, _ in items]), masks_enc[rows], masks_pred[rows], step


# ----------------------------------------------------------------------------------------- checkpoints


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(directory: Path, model: IJEPA, opt: torch.optim.Optimizer, step: int,
                    history: list[dict[str, float]], extra: dict[str, Any]) -> Path:
    path = Path(directory) / CHECKPOINT_FILE
    torch.save({"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(), "rng": rng_state(),
                "history": history, **extra}, path)
    return path


def load_checkpoint(directory: str | Path) -> dict[str, Any]:
    """The state saved by `save_checkpoint` (on the CPU)."""
    path = Path(directory) / CHECKPOINT_FILE
    if not path.is_file():
        raise PipelineError(f"{path}: no such checkpoint file; expected a folder written by the pretrain loop")
    return torch.load(path, map_location="cpu", weights_only=False)


# ---------------------------------------------------------------------------------------------- loop


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(x: Tensor, op: Any = None) -> Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
    return x


def train_worker(cfg: Config, dataset: Dataset, report: ReportFn, *, restore: dict[str, Any] | None = None,
                 tracker: Tracker | None = None, max_epochs: int | None = None,
                 device: torch.device | None = None, epoch_end: EpochEndFn | None = None,
                 heldout: Tensor | None = None) -> dict[str, Any]:
    """Pretrain from `restore` (a `load_checkpoint` dict) or from scratch; return the final report.

    Rank 0 runs `pipeline.diagnostics.diagnose` every `pretrain.diag_every` steps (and at the last) on
    `heldout` (n, 3, S, S), the held-out diagnostics batch, or, when it is None, on a fixed batch of the
    training set; the collapse alarm reads those figures. `pretrain.diag_images = 0` turns them off.

    Schedules span `cfg.pretrain.epochs`; `max_epochs` stops earlier (a Tune trial's budget). `report`
    gets metrics at every checkpoint (with the checkpoint directory on rank 0) and at every epoch end
    (`epoch`, `epoch_loss`, `rankme`: what a sweep compares). The last report has `finished: True`, or
    `nan_step` when the loss stopped being finite (no checkpoint is written then: the last good one stays).
    Not `done`: Ray Tune reserves that key and ends a trial at once on `done: True`, while its trainer is
    still wrapping up (a sweep trial's controller then died inside `fit()`).
    `epoch_end(model, epoch)` (a sweep's probe score) runs on rank 0 after each full epoch; its metrics join
    that epoch's report and rank 0's tracker (the other ranks wait in the report's barrier).
    """
    p = cfg.pretrain
    rank, world = _world()
    if p.batch_size % world:
        raise PipelineError(f"pretrain.batch_size = {p.batch_size} does not split over ray.num_workers = {world}; "
                            "use a multiple of it")
    device = device or torch.device("cpu")
    spe = steps_per_epoch(len(dataset), p.batch_size)  # type: ignore[arg-type]
    sched = Schedules(cfg.optim, spe, p.epochs)
    total = spe * p.epochs
    stop = total if max_epochs is None else min(total, spe * max_epochs)

    torch.manual_seed(p.seed)  # identical init on every rank (DDP broadcasts rank 0's anyway)
    model = build_ijepa(cfg).to(device).train()
    opt = build_optimizer(model, cfg.optim)
    step, history, wall0, epoch_loss_restored = 0, [], 0.0, 0.0
    if restore is not None:
        model.load_state_dict(restore["model"])
        opt.load_state_dict(restore["optimizer"])
        set_rng_state(restore["rng"])
        step, history, wall0 = restore["step"], list(restore["history"]), restore.get("wall_s", 0.0)
        epoch_loss_restored = restore.get("epoch_loss", 0.0)
    start_step = step
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)

    collator = MaskSampler(cfg.mask, model.encoder.grid_size, p.seed)
    collate = MaskCollate(collator, p.batch_size, rank, world)
    diag_batch = None
    if rank == 0 and p.diag_images > 0:
        images = heldout if heldout is not None else fixed_batch(dataset, p.diag_images, p.seed)
        diag_batch = (images.to(device), *(m.to(device) for m in collator.sample(len(images), DIAG_MASK_STEP)))
    items = StepItems(dataset)
    bad_step = torch.full((), NO_BAD_STEP, dtype=torch.int64, device=device)
    epoch_loss = torch.full((), epoch_loss_restored, device=device)  # sum of this epoch's losses (this rank)
    t_start, t_log, step_log = time.perf_counter(), time.perf_counter(), step
    collapse_tagged = False
    bar = progress(desc="pretrain", total=stop - step) if rank == 0 else None

    def check_finite() -> int | None:
        """The first step whose loss was not finite, on any rank (one all-reduce), else None."""
        found = int(_all_reduce(bad_step.clone(), dist.ReduceOp.MIN if dist.is_initialized() else None))
        return None if found == NO_BAD_STEP else found

    def summary() -> dict[str, Any]:
        """The final report: it travels with the last checkpoint (Ray keeps a checkpoint's metrics)."""
        elapsed = time.perf_counter() - t_start
        if bar is not None:
            bar.close()
        return {"step": step, "steps_total": total, "wall_s": wall0 + elapsed, "resumed_from": start_step,
                "images_per_s": (step - start_step) * p.batch_size / max(1e-9, elapsed),
                "final_loss": history[-1]["loss"] if history else float("nan"), "finished": True}

    def checkpoint(metrics: dict[str, Any]) -> None:
        _checkpoint(report, rank, model, opt, step, history,
                    {"wall_s": wall0 + time.perf_counter() - t_start, "epoch_loss": float(epoch_loss)}, metrics)

    while step < stop:
        epoch = step // spe
        epoch_start = epoch * spe
        last_of_epoch = min(epoch_start + spe, stop)
        sampler = StepBatches(epoch_order(len(items), p.seed, epoch), epoch_start, step, last_of_epoch,
                              p.batch_size, rank, world)
        loader = DataLoader(items, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.data.num_workers,
                            pin_memory=device.type == "cuda")
        for images, masks_enc, masks_pred, s in loader:
            assert s == step, f"loader step {s} != loop step {step}"
            images, masks_enc, masks_pred = (t.to(device, non_blocking=True) for t in (images, masks_enc, masks_pred))
            out = train_step(net, opt, sched, step, images, masks_enc, masks_pred, p.bf16, cfg.optim.grad_clip)
            step += 1
            # Record the first non-finite step without a host sync; read at log and checkpoint steps.
            bad_step = torch.where(torch.isfinite(out.loss) | (bad_step < NO_BAD_STEP), bad_step, step)
            epoch_loss += out.loss
            if bar is not None:
                bar.update(1)
            is_log = step % p.log_every == 0 or step == stop
            is_ckpt = step % p.checkpoint_every == 0 or step == stop
            if is_log or is_ckpt:
                nan_at = check_finite()
                if nan_at is not None:
                    stopped = {"step": step, "nan_step": nan_at, "finished": False}
                    report(stopped, None)
                    return stopped
            is_diag = p.diag_images > 0 and (step % p.diag_every == 0 or step == stop)
            if is_log or is_diag:
                stats = _all_reduce(torch.stack([out.loss.float(), out.pred_loss.float(), out.reg_loss.float(),
                                                 out.target_std.float()])) / world
                loss, pred_loss, reg_loss, target_std = stats.tolist()  # one host sync
                now = time.perf_counter()
                row = {"step": step, "loss": loss, "pred_loss": pred_loss, "reg_loss": reg_loss,
                       "lr": sched.lr(step - 1), "wd": sched.wd(step - 1),
                       "momentum": sched.momentum(step - 1), "target_std": target_std,
                       "images_per_s": (step - step_log) * p.batch_size / max(1e-9, now - t_log),
                       **dict.fromkeys(DIAG_COLUMNS, float("nan"))}
                if diag_batch is not None and is_diag:
                    with torch.random.fork_rng(devices=[]), autocast(device, p.bf16):
                        row.update(diagnose(model, *diag_batch))
                t_log, step_log = time.perf_counter(), step  # the diagnostics' time is not training time
                history.append(row)
                if rank == 0:
                    if tracker is not None:
                        tracker.log({k: v for k, v in row.items() if k != "step" and v == v}, step)  # no NaN
                    if bar is not None:
                        bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.0f}")
                    if is_diag and diag_batch is not None:
                        collapse_tagged = _collapse_alarm(cfg, row, tracker, collapse_tagged,
                                                          _beaten_guess(history[:-1]))
            metrics: dict[str, Any] = {}
            if step == epoch_start + spe:  # a full epoch ended: what a sweep compares
                epoch_mean = float(_all_reduce(epoch_loss.clone()) / (world * spe))
                diags = [r["rankme"] for r in history if r["rankme"] == r["rankme"]]
                metrics = {"epoch": epoch + 1, "epoch_loss": epoch_mean, "rankme": diags[-1] if diags else float("nan")}
                epoch_loss.zero_()
                if epoch_end is not None and rank == 0:
                    with torch.random.fork_rng(devices=[]):  # a probe must not shift the training RNG
                        scores = epoch_end(model, epoch + 1)
                    metrics.update(scores)
                    if tracker is not None:
                        tracker.log(scores, step)
            if step == stop:
                metrics.update(summary())
            if is_ckpt:
                row = history[-1] if history else {"loss": float("nan"), "images_per_s": float("nan")}
                metrics = {"step": step, "loss": row["loss"], **metrics}
                checkpoint(metrics)
                if rank == 0:
                    print(f"pretrain: step {step}/{total} loss {row['loss']:.4f} {row['images_per_s']:.1f} img/s, "
                          "checkpoint saved", flush=True)
            elif metrics:
                report({"step": step, **metrics}, None)
            if step == stop:
                return metrics
    # Restored at the end already (killed after the last checkpoint): report it again with the summary.
    done = summary()
    checkpoint(done)
    return done


def _checkpoint(report: ReportFn, rank: int, model: IJEPA, opt: torch.optim.Optimizer, step: int,
                history: list[dict[str, float]], extra: dict[str, Any], metrics: dict[str, Any]) -> None:
    """Rank 0 writes the state into a temporary folder that `report` persists; the others report too."""
    if rank != 0:
        report(metrics, None)
        return
    with tempfile.TemporaryDirectory(prefix="ijepa-ckpt-") as d:
        save_checkpoint(Path(d), model, opt, step, history, extra)
        report(metrics, Path(d))


def _beaten_guess(rows: list[dict[str, float]]) -> bool:
    """Has the model beaten the context-mean guess at some diagnostics step of `rows`? (NaN rows: no.)"""
    return any(r.get("heldout_loss", float("nan")) < r.get("trivial_loss", float("nan")) for r in rows)


def _collapse_alarm(cfg: Config, row: dict[str, float], tracker: Tracker | None, tagged: bool,
                    armed: bool) -> bool:
    """Warn (once per run) and tag the MLflow run when the diagnostics batch shows collapse or, `armed`,
    a task turned trivial (see `pipeline.diagnostics.alarms`)."""
    p = cfg.pretrain
    found = alarms(row, p.collapse_std_min, p.collapse_rank_min, armed)
    if not found or tagged:
        return tagged
    what = f"step {row['step']}: " + ", ".join(found)
    print(f"warning: representation collapse? {what}", flush=True)
    if tracker is not None:
        tracker.tag("collapse", what)
    return True


def set_threads(cpus: float) -> None:
    """One intra-op thread per CPU the worker holds (Ray workers otherwise oversubscribe small machines)."""
    n = max(1, int(cpus))
    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)
