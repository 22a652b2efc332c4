"""The per-worker pretraining loop, alone in one process (no Ray): history, checkpoints, resume, NaN stop."""

import math

import pytest
import torch

from pipeline.data.random_images import RandomImages
from pipeline.errors import PipelineError
from pipeline.schedules import Schedules, warmup_cosine
from pipeline.train import CURVE_COLUMNS, train_worker
from pipeline.train_state import load_checkpoint


class Recorder:
    """A report function that keeps every report and copies each checkpoint's state."""

    def __init__(self):
        self.reports, self.checkpoints = [], []

    def __call__(self, metrics, directory):
        self.reports.append(dict(metrics))
        if directory is not None:
            self.checkpoints.append(load_checkpoint(directory))


@pytest.fixture(autouse=True)
def one_thread():
    # On a busy 2-core box two OpenMP threads per step run several times slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cfg(tiny_cfg):
    # 48 images, global batch 16: 3 steps per epoch, 2 epochs; DataLoader in-process for speed.
    return tiny_cfg.replace(**{"data.num_workers": 0, "pretrain.checkpoint_every": 2})


def test_run_reports_history_checkpoints_and_done(cfg):
    rec = Recorder()
    done = train_worker(cfg, RandomImages(48, 32), rec)
    assert done["finished"] and done["step"] == done["steps_total"] == 6 and done["resumed_from"] == 0
    assert [c["step"] for c in rec.checkpoints] == [2, 4, 6]
    history = rec.checkpoints[-1]["history"]
    assert [r["step"] for r in history] == [1, 2, 3, 4, 5, 6]
    assert set(history[0]) == set(CURVE_COLUMNS)
    assert all(math.isfinite(r["loss"]) and r["images_per_s"] > 0 for r in history)
    w = cfg.optim.reg_weight  # the demo's optim.reg: vicreg at weight 3
    assert all(r["loss"] == pytest.approx(r["pred_loss"] + w * r["reg_loss"], rel=1e-6) and r["reg_loss"] > 0
               for r in history)
    # the first step runs with the schedule's value at 1, as the official loop (it steps its scheduler first)
    sched = Schedules(cfg.optim, steps_per_epoch=3, epochs=2)
    assert history[0]["lr"] == pytest.approx(warmup_cosine(1, sched.warmup_steps, 6, cfg.optim.start_lr,
                                                           cfg.optim.lr, cfg.optim.final_lr))
    assert history[0]["lr"] > cfg.optim.start_lr
    assert [r["epoch"] for r in rec.reports if "epoch_loss" in r] == [1, 2]
    assert rec.reports[-1] == done  # the summary travels with the last checkpoint
    assert done["final_loss"] == history[-1]["loss"]


@pytest.mark.parametrize("reg", ["none", "sigreg"])  # sigreg: random directions drawn from the step
def test_resume_mid_epoch_equals_uninterrupted_run(cfg, reg):
    cfg = cfg.replace(**{"optim.reg": reg, "optim.reg_weight": 0.1})
    data = RandomImages(48, 32)
    full = Recorder()
    train_worker(cfg, data, full)
    # Stop after step 4 (mid-epoch 2 of 3-step epochs), restore from that checkpoint, finish.
    part = Recorder()
    train_worker(cfg.replace(**{"pretrain.checkpoint_every": 4}), data, part, max_epochs=2)
    ckpt = next(c for c in part.checkpoints if c["step"] == 4)
    rest = Recorder()
    done = train_worker(cfg, data, rest, restore=ckpt)
    assert done["resumed_from"] == 4 and done["step"] == 6
    a, b = full.checkpoints[-1], rest.checkpoints[-1]
    assert [r["step"] for r in b["history"]] == [1, 2, 3, 4, 5, 6]  # nothing repeated or lost
    for name, t in a["model"].items():
        assert torch.equal(t, b["model"][name]), name
    for r in b["history"]:
        assert r["loss"] == pytest.approx(r["pred_loss"] + 0.1 * r["reg_loss"], rel=1e-6)
        assert (r["reg_loss"] > 0) == (reg != "none")


def test_max_epochs_stops_early_on_the_full_schedule(cfg):
    rec = Recorder()
    done = train_worker(cfg, RandomImages(48, 32), rec, max_epochs=1)
    assert done["step"] == 3 and done["steps_total"] == 6 and done["epoch"] == 1 and done["finished"]


def test_nan_loss_stops_naming_the_step_without_checkpoint(cfg):
    # lr so large the weights blow up after a few steps: the loss turns inf/nan.
    cfg = cfg.replace(**{"optim.lr": 1e30, "optim.start_lr": 1e30, "pretrain.log_every": 1})
    rec = Recorder()
    done = train_worker(cfg, RandomImages(48, 32), rec)
    assert not done["finished"] and 1 <= done["nan_step"] <= done["step"] <= 6 and rec.reports[-1] == done
    assert all(c["step"] < done["nan_step"] for c in rec.checkpoints)
    assert all(math.isfinite(r["loss"]) for c in rec.checkpoints for r in c["history"])


def test_batch_larger_than_dataset_is_one_line_error(cfg):
    with pytest.raises(PipelineError, match="batch_size = 16"):
        train_worker(cfg, RandomImages(8, 32), Recorder())


class FakeTracker:
    def __init__(self):
        self.logged, self.tags = [], []

    def log(self, metrics, step):
        self.logged.append((step, dict(metrics)))

    def tag(self, key, value):
        self.tags.append((key, value))


def test_tracker_gets_every_log_step_and_one_collapse_tag(cfg, capsys):
    cfg = cfg.replace(**{"pretrain.collapse_rank_min": 1000.0, "pretrain.log_every": 2})  # rankme is always lower
    tracker = FakeTracker()
    train_worker(cfg, RandomImages(48, 32), Recorder(), tracker=tracker)
    assert [s for s, _ in tracker.logged] == [2, 4, 6]
    assert set(tracker.logged[0][1]) == set(CURVE_COLUMNS) - {"step"}
    assert len(tracker.tags) == 1 and tracker.tags[0][0] == "collapse" and "step 2: rankme" in tracker.tags[0][1]
    assert "representation collapse" in capsys.readouterr().out


def test_init_relative_std_alarm_keeps_its_reference_across_a_resume(cfg, monkeypatch):
    """The feature-std reference is the seeded init's, computed before any restore (a resumed worker has the
    same), and the alarm compares each check with it: an init that read 100x larger trips it at step 2."""
    from pipeline import train
    from pipeline.diagnostics import diagnose, representation_stats
    from pipeline.models.ijepa import build_ijepa

    data = RandomImages(48, 32)
    part = Recorder()
    train_worker(cfg, data, part, max_epochs=2)
    ckpt = next(c for c in part.checkpoints if c["step"] == 4)
    fresh = train._Worker(cfg, data, torch.device("cpu"), None, None, None)
    resumed = train._Worker(cfg, data, torch.device("cpu"), ckpt, None, None)
    torch.manual_seed(cfg.pretrain.seed)
    assert resumed.std_init == fresh.std_init == diagnose(build_ijepa(cfg), *fresh.diag_batch)["feature_std"]

    calls = []

    def inflated_init(h):  # in pipeline.train this name computes the init's reference only
        out = representation_stats(h)
        calls.append(out["feature_std"])
        return {**out, "feature_std": out["feature_std"] * 100}

    monkeypatch.setattr(train, "representation_stats", inflated_init)
    tracker = FakeTracker()
    train_worker(cfg, data, Recorder(), tracker=tracker)
    assert len(tracker.tags) == 1 and tracker.tags[0][1].startswith("step 2: feature_std")
    assert f"< {cfg.pretrain.collapse_std_drop:g} x its value at init ({calls[0] * 100:.4g})" in tracker.tags[0][1]
    tracker = FakeTracker()
    train_worker(cfg.replace(**{"pretrain.collapse_std_drop": 0.0}), data, Recorder(), tracker=tracker)
    assert tracker.tags == []  # 0: off


class NoisyImages(torch.utils.data.Dataset):
    """Images whose every read draws from torch's global RNG, as a random-crop train transform does."""

    def __init__(self, n, size):
        self.images = RandomImages(n, size)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i] + 0.01 * torch.rand(())


def test_diagnostics_on_the_train_set_leave_the_training_unchanged(cfg):
    """Without a held-out batch (the sweep's trials) the diagnostics batch is read from the train set, whose
    transform is random: that read must not advance the training's random stream (it used to: a trial's
    weights depended on `pretrain.diag_images`)."""
    data = NoisyImages(48, 32)
    with_diag, without = Recorder(), Recorder()
    train_worker(cfg, data, with_diag)
    train_worker(cfg.replace(**{"pretrain.diag_images": 0}), data, without)
    for name, t in with_diag.checkpoints[-1]["model"].items():
        assert torch.equal(t, without.checkpoints[-1]["model"][name]), name
