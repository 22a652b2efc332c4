"""The per-worker pretraining loop: one process per Ray worker (or alone, for tests and benchmarks).

Nothing here imports Ray. Ray Train runs `train_worker` inside a TorchTrainer, which has set up
`torch.distributed` (gloo on CPU, nccl on GPU); the loop reads rank and world size from it, so the same
function runs alone in a test.

The data order and masks are functions of (seed, step) only, whatever the number of Ray or DataLoader
workers: `pipeline.batches`. Steps are counted from 1: "step k" is the k-th optimiser step; metrics,
checkpoints and errors use it. A checkpoint (`pipeline.train_state`) holds the whole training state, so a
run resumed from one continues exactly as if it had not stopped.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset

from pipeline.batches import StepLoader, fixed_batch, steps_per_epoch
from pipeline.config import Config
from pipeline.diagnostics import DIAG_COLUMNS, alarms, diagnose, representation_stats
from pipeline.errors import PipelineError
from pipeline.masks import MaskSampler
from pipeline.models.ijepa import IJEPA, IJEPAOutput, build_ijepa
from pipeline.progress import progress
from pipeline.schedules import Schedules
from pipeline.step import autocast, build_optimizer, train_step
from pipeline.train_state import save_checkpoint, set_rng_state

# Every log row has all columns; the diagnostics ones are NaN except every `pretrain.diag_every` steps.
# loss = pred_loss + optim.reg_weight * reg_loss (reg_loss 0 and pred_loss = loss when optim.reg is none).
CURVE_COLUMNS = ("step", "loss", "pred_loss", "reg_loss", "lr", "wd", "momentum", "target_std", "images_per_s",
                 *DIAG_COLUMNS)
DIAG_MASK_STEP = 2**40  # the diagnostics batch's masks: MaskSampler.sample(n, DIAG_MASK_STEP), never a training step
NO_BAD_STEP = 2**62


class Tracker(Protocol):
    """Rank 0's metric sink (an MLflow run on the Ray side)."""

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def tag(self, key: str, value: str) -> None: ...


# Called by EVERY rank at the same steps (Ray's report is a barrier); the directory only on rank 0.
ReportFn = Callable[[dict[str, Any], Path | None], None]
# (model, epochs done) -> metrics for that epoch's report, e.g. a sweep's probe score. Rank 0 only.
EpochEndFn = Callable[[IJEPA, int], dict[str, float]]


def train_worker(cfg: Config, dataset: Dataset, report: ReportFn, *, restore: dict[str, Any] | None = None,
                 tracker: Tracker | None = None, max_epochs: int | None = None,
                 device: torch.device | None = None, epoch_end: EpochEndFn | None = None,
                 heldout: Tensor | None = None) -> dict[str, Any]:
    """Pretrain from scratch or from `restore` (a `train_state.load_checkpoint` dict); return the final report.

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
    that epoch's report and rank 0's tracker (the other ranks wait in the report's barrier). It also runs
    once on the seeded init, before any restore (`epoch` 0): those figures join every epoch's report as
    `init_<key>`, the random-init level of this very model that the trial's margin is taken over.
    """
    p = cfg.pretrain
    run = _Worker(cfg, dataset, device or torch.device("cpu"), restore, max_epochs, heldout, epoch_end)
    while run.step < run.stop:
        for images, masks_enc, masks_pred in run.epoch():
            out = train_step(run.net, run.opt, run.sched, run.step, images, masks_enc, masks_pred, p.bf16,
                             cfg.optim.grad_clip)
            step = run.count(out.loss)
            is_log = step % p.log_every == 0 or step == run.stop
            is_ckpt = step % p.checkpoint_every == 0 or step == run.stop
            is_diag = p.diag_images > 0 and (step % p.diag_every == 0 or step == run.stop)
            if is_log or is_ckpt:
                nan_at = run.first_nan_step()
                if nan_at is not None:
                    stopped = {"step": step, "nan_step": nan_at, "finished": False}
                    report(stopped, None)
                    return stopped
            if is_log or is_diag:
                run.log(out, is_diag, tracker)
            metrics = run.end_epoch(epoch_end, tracker) if step % run.spe == 0 else {}
            if step == run.stop:
                metrics.update(run.summary())
            if is_ckpt:
                metrics = run.checkpoint_step(report, metrics)
            elif metrics:
                report({"step": step, **metrics}, None)
            if step == run.stop:
                return metrics
    # Restored at the end already (killed after the last checkpoint): report it again with the summary.
    done = run.summary()
    run.checkpoint(report, done)
    return done


class _Worker:
    """One worker's pretraining: what `train_worker` sets up (model, optimiser, schedules, batches,
    diagnostics batch) and the counters that its steps move on."""

    def __init__(self, cfg: Config, dataset: Dataset, device: torch.device, restore: dict[str, Any] | None,
                 max_epochs: int | None, heldout: Tensor | None, epoch_end: EpochEndFn | None = None):
        p = self.p = cfg.pretrain
        self.cfg, self.device = cfg, device
        self.rank, self.world = _world()
        if p.batch_size % self.world:
            raise PipelineError(f"pretrain.batch_size = {p.batch_size} does not split over ray.num_workers = "
                                f"{self.world}; use a multiple of it")
        self.spe = steps_per_epoch(len(dataset), p.batch_size)  # type: ignore[arg-type]
        self.sched = Schedules(cfg.optim, self.spe, p.epochs)
        self.total = self.spe * p.epochs
        self.stop = self.total if max_epochs is None else min(self.total, self.spe * max_epochs)

        torch.manual_seed(p.seed)  # identical init on every rank (DDP broadcasts rank 0's anyway)
        self.model = build_ijepa(cfg).to(device).train()
        self.opt = build_optimizer(self.model, cfg.optim)
        sampler = MaskSampler(cfg.mask, self.model.encoder.grid_size, p.seed)
        self.diag_batch, self.std_init = None, None
        if self.rank == 0 and p.diag_images > 0:
            with torch.random.fork_rng(devices=[]):  # the training's random stream stays as without diagnostics
                images = heldout if heldout is not None else fixed_batch(dataset, p.diag_images, p.seed)
                masks = sampler.sample(len(images), DIAG_MASK_STEP)
                self.diag_batch = (images.to(device), *(m.to(device) for m in masks))
                # The model is still its seeded init here, before any restore: the alarms' reference.
                with torch.no_grad(), autocast(device, p.bf16):
                    self.std_init = representation_stats(self.model.target_encoder(self.diag_batch[0]))["feature_std"]
        self.init_scores: dict[str, float] = {}
        if epoch_end is not None and self.rank == 0:
            with torch.random.fork_rng(devices=[]):  # still the seeded init; the training's stream is untouched
                self.init_scores = {f"init_{k}": v for k, v in epoch_end(self.model, 0).items()}
        self.step, self.history, self.wall0, epoch_loss = 0, [], 0.0, 0.0
        if restore is not None:
            self.model.load_state_dict(restore["model"])
            self.opt.load_state_dict(restore["optimizer"])
            set_rng_state(restore["rng"])
            self.step, self.history = restore["step"], list(restore["history"])
            self.wall0, epoch_loss = restore.get("wall_s", 0.0), restore.get("epoch_loss", 0.0)
        self.start_step = self.step
        self.net: nn.Module = self.model
        if self.world > 1:
            self.net = nn.parallel.DistributedDataParallel(self.model,
                                                           device_ids=[device] if device.type == "cuda" else None)

        self.loader = StepLoader(dataset, sampler, p.batch_size, p.seed, self.rank, self.world,
                                 cfg.data.num_workers, pin_memory=device.type == "cuda")
        self.bad_step = torch.full((), NO_BAD_STEP, dtype=torch.int64, device=device)
        self.epoch_loss = torch.full((), epoch_loss, device=device)  # sum of this epoch's losses (this rank)
        self.t_start, self.t_log, self.step_log = time.perf_counter(), time.perf_counter(), self.step
        self.collapse_tagged = False
        self.bar = progress(desc="pretrain", total=self.stop - self.step) if self.rank == 0 else None

    def epoch(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """The steps left in the current epoch (up to `stop`): this rank's images (b, 3, S, S), masks_enc
        (b, Kc) and masks_pred (b, M, Kt) on the device, one batch a step."""
        epoch_end = self.step - self.step % self.spe + self.spe
        for images, masks_enc, masks_pred, s in self.loader(self.step, min(epoch_end, self.stop)):
            assert s == self.step, f"loader step {s} != loop step {self.step}"
            yield tuple(t.to(self.device, non_blocking=True) for t in (images, masks_enc, masks_pred))

    def count(self, loss: Tensor) -> int:
        """One optimiser step done, its loss () still on the device; returns the step number (from 1)."""
        self.step += 1
        # Record the first non-finite step without a host sync; read at log and checkpoint steps.
        self.bad_step = torch.where(torch.isfinite(loss) | (self.bad_step < NO_BAD_STEP), self.bad_step, self.step)
        self.epoch_loss += loss
        if self.bar is not None:
            self.bar.update(1)
        return self.step

    def first_nan_step(self) -> int | None:
        """The first step whose loss was not finite, on any rank (one all-reduce), else None."""
        found = int(_all_reduce(self.bad_step.clone(), dist.ReduceOp.MIN if dist.is_initialized() else None))
        return None if found == NO_BAD_STEP else found

    def log(self, out: IJEPAOutput, is_diag: bool, tracker: Tracker | None) -> None:
        """Append this step's history row (rank means; diagnostics on `is_diag` steps), and on rank 0 send
        it to the tracker, the progress bar and the collapse alarm."""
        row = self._row(out, is_diag)
        self.history.append(row)
        if self.rank != 0:
            return
        if tracker is not None:
            tracker.log({k: v for k, v in row.items() if k != "step" and v == v}, self.step)  # no NaN
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.0f}")
        if is_diag and self.diag_batch is not None:
            self.collapse_tagged = _collapse_alarm(self.cfg, row, tracker, self.collapse_tagged,
                                                   _beaten_guess(self.history[:-1]), self.std_init)

    def _row(self, out: IJEPAOutput, is_diag: bool) -> dict[str, float]:
        """The CURVE_COLUMNS of this step: loss terms averaged over ranks (one host sync), the schedules it
        ran with, images/s since the last row, and rank 0's `diagnose` figures (NaN but on `is_diag`)."""
        step, sched = self.step, self.sched
        stats = _all_reduce(torch.stack([out.loss.float(), out.pred_loss.float(), out.reg_loss.float(),
                                         out.target_std.float()])) / self.world
        loss, pred_loss, reg_loss, target_std = stats.tolist()  # one host sync
        now = time.perf_counter()
        row = {"step": step, "loss": loss, "pred_loss": pred_loss, "reg_loss": reg_loss,
               "lr": sched.lr(step - 1), "wd": sched.wd(step - 1), "momentum": sched.momentum(step - 1),
               "target_std": target_std,
               "images_per_s": (step - self.step_log) * self.p.batch_size / max(1e-9, now - self.t_log),
               **dict.fromkeys(DIAG_COLUMNS, float("nan"))}
        if self.diag_batch is not None and is_diag:
            with torch.random.fork_rng(devices=[]), autocast(self.device, self.p.bf16):
                row.update(diagnose(self.model, *self.diag_batch))
        self.t_log, self.step_log = time.perf_counter(), step  # the diagnostics' time is not training time
        return row

    def end_epoch(self, epoch_end: EpochEndFn | None, tracker: Tracker | None) -> dict[str, Any]:
        """A full epoch ended: its mean loss over ranks, the last RankMe and, on rank 0, `epoch_end`'s
        scores and the init's (`init_<key>`), which rank 0's tracker gets too (what a sweep compares)."""
        epoch = self.step // self.spe
        epoch_mean = float(_all_reduce(self.epoch_loss.clone()) / (self.world * self.spe))
        diags = [r["rankme"] for r in self.history if r["rankme"] == r["rankme"]]
        metrics = {"epoch": epoch, "epoch_loss": epoch_mean, "rankme": diags[-1] if diags else float("nan")}
        self.epoch_loss.zero_()
        if epoch_end is not None and self.rank == 0:
            with torch.random.fork_rng(devices=[]):  # a probe must not shift the training RNG
                scores = epoch_end(self.model, epoch)
            metrics.update(scores, **self.init_scores)
            if tracker is not None:
                tracker.log({**scores, **self.init_scores}, self.step)
        return metrics

    def summary(self) -> dict[str, Any]:
        """The final report: it travels with the last checkpoint (Ray keeps a checkpoint's metrics)."""
        elapsed = time.perf_counter() - self.t_start
        if self.bar is not None:
            self.bar.close()
        return {"step": self.step, "steps_total": self.total, "wall_s": self.wall0 + elapsed,
                "resumed_from": self.start_step,
                "images_per_s": (self.step - self.start_step) * self.p.batch_size / max(1e-9, elapsed),
                "final_loss": self.history[-1]["loss"] if self.history else float("nan"),
                "feature_std_init": self.std_init, "finished": True}

    def checkpoint_step(self, report: ReportFn, metrics: dict[str, Any]) -> dict[str, Any]:
        """At a checkpoint step: the step and its loss ahead of `metrics`, checkpointed, and said on rank 0."""
        row = self.history[-1] if self.history else {"loss": float("nan"), "images_per_s": float("nan")}
        metrics = {"step": self.step, "loss": row["loss"], **metrics}
        self.checkpoint(report, metrics)
        if self.rank == 0:
            print(f"pretrain: step {self.step}/{self.total} loss {row['loss']:.4f} {row['images_per_s']:.1f} img/s, "
                  "checkpoint saved", flush=True)
        return metrics

    def checkpoint(self, report: ReportFn, metrics: dict[str, Any]) -> None:
        """Rank 0 writes the state into a temporary folder that `report` persists; the others report too."""
        extra = {"wall_s": self.wall0 + time.perf_counter() - self.t_start, "epoch_loss": float(self.epoch_loss)}
        if self.rank != 0:
            report(metrics, None)
            return
        with tempfile.TemporaryDirectory(prefix="ijepa-ckpt-") as d:
            save_checkpoint(Path(d), self.model, self.opt, self.step, self.history, extra)
            report(metrics, Path(d))


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(x: Tensor, op: Any = None) -> Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
    return x


def _beaten_guess(rows: list[dict[str, float]]) -> bool:
    """Has the model beaten the context-mean guess at some diagnostics step of `rows`? (NaN rows: no.)"""
    return any(r.get("heldout_loss", float("nan")) < r.get("trivial_loss", float("nan")) for r in rows)


def _collapse_alarm(cfg: Config, row: dict[str, float], tracker: Tracker | None, tagged: bool,
                    armed: bool, std_init: float | None) -> bool:
    """Warn (once per run) and tag the MLflow run when the diagnostics batch shows collapse or, `armed`,
    a task turned trivial (see `pipeline.diagnostics.alarms`; `std_init`: the init's feature std)."""
    p = cfg.pretrain
    found = alarms(row, p.collapse_std_min, p.collapse_rank_min, armed, std_init, p.collapse_std_drop)
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

