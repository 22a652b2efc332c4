"""The one module that talks to Ray: start or join Ray, run the pretraining loop in a TorchTrainer.

    pretrain(cfg, root) -> summary       the pretrain stage: train (or resume, or re-export) and write outs
    build_trainer(cfg, dataset_fn, ...)  a TorchTrainer over `pipeline.train.train_worker` (Tune trials)
    tune_sweep(cfg, root, name, ...)     the sweep stage's Tuner: one trial = one short pretraining (pipeline.sweep)

A pretraining run is named by the hash of the sections that change what it learns (`run_name`). Its Ray
storage is `<ray.storage_path>/<name>/`: a local folder, or an object-store prefix (`s3://bucket/prefix`)
that every node of a cluster reaches (`pipeline.storage`). Ray Train V2 resumes a run from its latest
checkpoint when a trainer with the same (storage_path, name) is started again, so re-running the stage
after the whole process was killed continues where the last checkpoint left off. `<name>/pipeline.json`
records the MLflow run id (the resumed run logs into the same MLflow run) and, once training ended, the
final checkpoint: a finished run is not retrained, only its outputs are written again (from a checkpoint
on an object store, downloaded first).

Outputs (relative paths against `root`): `<pretrain.out_dir>/encoder/` (the target encoder),
`<pretrain.out_dir>/run_id.txt`, `metrics/pretrain.json`, `metrics/pretrain_curve.csv` and, when
`pipeline.viz` can draw it, `reports/pretrain_curves.png`.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

# Ray reads RAY_AUTH_MODE when it is imported, not at ray.init: a driver joining a cluster started by
# `ray start` (token authentication on by default) needs it set first; local Ray uses tokens anyway.
# Only when Ray is not imported yet: setting it afterwards would start a local Ray whose processes
# expect a token that this process does not send.
if "ray" not in sys.modules:
    os.environ.setdefault("RAY_AUTH_MODE", "token")
import ray  # noqa: E402
import ray.train
import yaml
from ray import tune
from ray._raylet import PlacementGroupID
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group
from torch import Tensor
from torch.utils.data import Dataset

from pipeline import storage, tracking
from pipeline.atomic import atomic_write, atomic_write_text
from pipeline.config import Config, RayConfig
from pipeline.diagnostics import DIAG_COLUMNS
from pipeline.errors import PipelineError
from pipeline.models.ijepa import build_ijepa
from pipeline.models.io import encoder_meta, save_encoder
from pipeline.train import (
    CURVE_COLUMNS,
    EpochEndFn,
    heldout_images,
    load_checkpoint,
    pretrain_dataset,
    set_threads,
    train_worker,
)

RUN_SECTIONS = ("data", "mask", "model", "optim", "pretrain")  # what a run learns from; not ray, not mlflow
STATE_FILE = "pipeline.json"
STOP_FILE = "nan_stop.json"
TRIAL_RUN_ID = "mlflow_run_id.txt"  # under trials/<trial id>/ of a sweep
PID_DIR = "worker_pids"  # rank-<r>.pid of the current worker processes
METRICS_JSON = Path("metrics/pretrain.json")
CURVE_CSV = Path("metrics/pretrain_curve.csv")
CURVES_PNG = Path("reports/pretrain_curves.png")


def run_name(cfg: Config) -> str:
    """`pretrain-<hash>`: the same params give the same name, hence the same Ray storage to resume from."""
    return f"pretrain-{cfg.hash(*RUN_SECTIONS)}"


def _abs(root: Path, path: str | Path) -> Path:
    path = Path(path)
    return path if path.is_absolute() else root / path


# ------------------------------------------------------------------------------------------------ Ray


def init_ray(cfg: RayConfig) -> None:
    """Join `cfg.address`, or start a local Ray sized to this machine (no dashboard). Idempotent."""
    if ray.is_initialized():
        return
    if cfg.address:
        try:
            ray.init(address=cfg.address, log_to_driver=True)
        except (ConnectionError, RuntimeError) as e:
            raise PipelineError(f"ray.address = {cfg.address!r}: cannot join the Ray cluster "
                                f"({str(e).splitlines()[0]}); start it (and export RAY_AUTH_MODE=token) or set "
                                "ray.address: null") from None
        return
    # "local" explicitly: a plain ray.init() joins whatever /tmp/ray/ray_current_cluster names, even a dead one.
    # The dashboard is on (bound to 127.0.0.1): without it Ray Train's PlacementGroupCleaner warns every second.
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=True, dashboard_host="127.0.0.1",
             log_to_driver=True)


def shutdown_ray() -> None:
    ray.shutdown()


def _reporter(stop_file: str | None) -> Callable[[dict[str, Any], Path | None], None]:
    """`ray.train.report`; a NaN stop is also written to `stop_file` (a `pipeline.storage` location), since
    a run's result only keeps the metrics of its last checkpoint (and a NaN stop writes none)."""

    def report(metrics: dict[str, Any], directory: Path | None) -> None:
        checkpoint = Checkpoint.from_directory(str(directory)) if directory is not None else None
        ray.train.report(metrics, checkpoint=checkpoint)
        if stop_file and "nan_step" in metrics and ray.train.get_context().get_world_rank() == 0:
            storage.write_text(stop_file, json.dumps(metrics) + "\n")

    return report


def _worker_loop(config: dict[str, Any]) -> None:
    """TorchTrainer's train_loop_per_worker: restore the latest checkpoint if Ray has one, then train."""
    cfg: Config = config["cfg"]
    rank = ray.train.get_context().get_world_rank()
    if config.get("pid_dir"):  # which process is which rank: for operators (and tests) that kill one
        storage.write_text(storage.join(config["pid_dir"], f"rank-{rank}.pid"), f"{os.getpid()}\n")
    set_threads(cfg.ray.resources_per_worker.get("CPU", 1.0))
    device = ray.train.torch.get_device() if cfg.ray.use_gpu else None
    restore = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            restore = load_checkpoint(d)
    heldout = config["heldout_fn"]() if rank == 0 and config.get("heldout_fn") else None
    ctx = ray.train.get_context()
    with tracking.worker_tracking(config["tracking_uri"], config["run_id"], rank=rank, node_rank=ctx.get_node_rank(),
                                  local_rank=ctx.get_local_rank(), system_metrics=cfg.mlflow.system_metrics,
                                  unsent=config["unsent"]) as tracker:
        train_worker(cfg, config["dataset_fn"](), _reporter(config.get("stop_file")), restore=restore,
                     tracker=tracker, max_epochs=config.get("max_epochs"), device=device,
                     epoch_end=config.get("epoch_end"), heldout=heldout)


def build_trainer(cfg: Config, dataset_fn: Callable[[], Dataset], name: str, storage_path: str | Path, *,
                  tracking_uri: str | None = None, run_id: str | None = None, max_epochs: int | None = None,
                  stop_file: str | Path | None = None, callbacks: Sequence[Any] = (),
                  epoch_end: EpochEndFn | None = None,
                  heldout_fn: Callable[[], Tensor | None] | None = None) -> TorchTrainer:
    """A TorchTrainer running `train_worker` on `cfg.ray.num_workers` workers.

    `storage_path`: a local folder (relative: to the working directory) or an object-store URI.
    `dataset_fn()` builds the dataset inside each worker (picklable: a module-level function or a
    functools.partial of one). MLflow metrics go to `run_id` when given; a NaN stop is written to
    `stop_file` (JSON with `nan_step`) when given. A Tune trial passes
    `callbacks=[TuneReportCallback()]` and `max_epochs` (its budget); the reports then reach Tune.
    `epoch_end(model, epoch)` runs on rank 0 after each epoch, its metrics joining the epoch's report.
    `heldout_fn()` (rank 0) gives the diagnostics batch (n, 3, S, S); None: a fixed batch of the train set.
    """
    r = cfg.ray
    location = storage.resolve(Path.cwd(), storage_path)
    scaling = ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu,
                            resources_per_worker=dict(r.resources_per_worker), accelerator_type=r.accelerator_type)
    run = RunConfig(name=name, storage_path=location, callbacks=list(callbacks),
                    failure_config=FailureConfig(max_failures=cfg.pretrain.max_failures),
                    checkpoint_config=CheckpointConfig(num_to_keep=cfg.pretrain.num_to_keep))
    loop_config = {"cfg": cfg, "dataset_fn": dataset_fn, "run_id": run_id, "tracking_uri": tracking_uri,
                   "max_epochs": max_epochs, "stop_file": str(stop_file) if stop_file else None,
                   "pid_dir": storage.join(location, name, PID_DIR), "epoch_end": epoch_end,
                   "heldout_fn": heldout_fn, "unsent": storage.join(location, name, tracking.UNSENT_FILE)}
    return TorchTrainer(_worker_loop, train_loop_config=loop_config, scaling_config=scaling, run_config=run)


# --------------------------------------------------------------------------------------------- stage


def _read_state(location: str | Path) -> dict[str, Any]:
    text = storage.read_text(str(location))
    return json.loads(text) if text is not None else {}


def _write_state(location: str | Path, state: dict[str, Any]) -> None:
    storage.write_text(str(location), json.dumps(state, indent=2, default=str) + "\n")


def _checkpoint_location(storage_location: str, checkpoint: Checkpoint) -> str:
    """A result's checkpoint as a `pipeline.storage` location (Ray gives a path on its filesystem, without
    the URI scheme of an object store)."""
    scheme = storage.scheme(storage_location)
    return f"{scheme}://{checkpoint.path.lstrip('/')}" if scheme else checkpoint.path


def _check_storage(cfg: RayConfig, location: str) -> None:
    """A one-line error when the object store behind `ray.storage_path` cannot hold runs (before Ray)."""
    problem = storage.problem(location)
    if problem:
        raise PipelineError(f"ray.storage_path = {cfg.storage_path!r}: {problem}; create the bucket or set "
                            "AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")


def pretrain(cfg: Config, root: str | Path | None = None,
             dataset_fn: Callable[[], Dataset] | None = None) -> dict[str, Any]:
    """Pretrain on Ray (or resume, or re-export a finished run), write the outputs; return the summary.

    `dataset_fn` defaults to the ImageNet-format train split under `cfg.data` (tests pass a tiny one); the
    diagnostics then run on held-out val images (`pipeline.train.heldout_images`).
    Raises PipelineError before any training when MLflow or the storage is unreachable or the data is
    missing, and when the loss stops being finite (naming the step; the last good checkpoint stays in the
    storage).
    """
    root = Path(root or Path.cwd()).resolve()
    location, out_dir = storage.resolve(root, cfg.ray.storage_path), _abs(root, cfg.pretrain.out_dir)
    name = run_name(cfg)
    state_file = storage.join(location, name, STATE_FILE)
    uri = tracking.tracking_uri(cfg.mlflow, root)
    tracking.connect(cfg.mlflow, root)  # unreachable server: one-line error before anything starts
    _check_storage(cfg.ray, location)
    heldout_fn = functools.partial(heldout_images, cfg, str(root)) if dataset_fn is None else None
    dataset_fn = dataset_fn or functools.partial(pretrain_dataset, cfg, str(root))
    dataset_fn()  # missing or empty data: one-line error here, not inside a Ray worker

    state = _read_state(state_file)
    run_id = state.get("mlflow_run_id")
    if run_id and tracking.run_status(run_id) is None:
        run_id = None  # the MLflow store was reset: open a new run
    with tracking.pipeline_run(cfg, "pretrain", run_id=run_id, root=root, driver_system_metrics=False) as run:
        run_id = run.info.run_id
        tracking.set_tag("ray_run_name", name)
        finished = state.get("status") == "finished" and storage.is_dir(state.get("checkpoint", ""))
        if finished:
            print(f"pretrain: {name} already finished; writing its outputs from {state['checkpoint']}")
            summary, checkpoint = state["summary"], state["checkpoint"]
        else:
            _write_state(state_file, {"mlflow_run_id": run_id, "status": "running"})
            init_ray(cfg.ray)
            stop_file = storage.join(location, name, STOP_FILE)
            storage.delete(stop_file)
            result = build_trainer(cfg, dataset_fn, name, location, tracking_uri=uri, run_id=run_id,
                                   stop_file=stop_file, heldout_fn=heldout_fn).fit()
            summary = dict(result.metrics or {})
            stop = storage.read_text(stop_file)
            if stop is not None:
                nan_step = json.loads(stop)["nan_step"]
                last = _checkpoint_location(location, result.checkpoint) if result.checkpoint else "none"
                tracking.set_tag("failure", f"non-finite loss at step {nan_step}")
                raise PipelineError(f"loss is not finite at step {nan_step}; training stopped, last good "
                                    f"checkpoint {last} kept; lower optim.lr or set optim.grad_clip")
            if result.checkpoint is None or not summary.get("finished"):
                raise PipelineError(f"pretrain run {name} ended without a final checkpoint ({summary})")
            checkpoint = _checkpoint_location(location, result.checkpoint)
            _write_state(state_file, {"mlflow_run_id": run_id, "status": "finished", "summary": summary,
                                      "checkpoint": checkpoint})
        summary = {**summary, "retrained": not finished}
        return _write_outputs(cfg, root, out_dir, checkpoint, run_id, name, summary)


def _write_outputs(cfg: Config, root: Path, out_dir: Path, checkpoint: str, run_id: str, name: str,
                   summary: dict[str, Any]) -> dict[str, Any]:
    """Encoder, run id, metrics JSON, curve CSV (+ PNG) from the final checkpoint (a `pipeline.storage`
    location, downloaded when on an object store); all into MLflow too."""
    with storage.local_dir(checkpoint) as d:
        state = load_checkpoint(d)
    model = build_ijepa(cfg)
    model.load_state_dict(state["model"])
    encoder_dir = save_encoder(model.target_encoder, cfg.model, cfg.data.image_size, out_dir / "encoder",
                               extra={"params_hash": cfg.hash(*RUN_SECTIONS), "step": state["step"],
                                      "mlflow_run_id": run_id})
    tracking.write_run_id(run_id, out_dir / tracking.RUN_ID_FILE)

    history = pd.DataFrame(state["history"], columns=list(CURVE_COLUMNS))
    last = history.iloc[-1] if len(history) else None
    metrics = {"final_loss": float(summary.get("final_loss", last["loss"] if last is not None else "nan")),
               "steps": int(state["step"]), "epochs": cfg.pretrain.epochs, "batch_size": cfg.pretrain.batch_size,
               "images_per_s": float(summary.get("images_per_s", 0.0)), "wall_s": float(summary.get("wall_s", 0.0)),
               "final_target_std": float(last["target_std"]) if last is not None else None,
               **_last_diagnostics(history),
               "num_workers": cfg.ray.num_workers, "resumed_from_step": int(summary.get("resumed_from", 0)),
               "retrained": bool(summary["retrained"]), "ray_run_name": name, "mlflow_run_id": run_id}
    csv_path, json_path = root / CURVE_CSV, root / METRICS_JSON
    atomic_write(csv_path, lambda tmp: history.to_csv(tmp, index=False))
    atomic_write_text(json_path, json.dumps(metrics, indent=2) + "\n")

    png = _curves_png(cfg, history, root / CURVES_PNG)
    # The local outputs are written; a server gone now fails the stage, and a rerun (not retraining) logs again.
    unsent = storage.join(storage.resolve(root, cfg.ray.storage_path), name, tracking.UNSENT_FILE)
    waiting = tracking.count_unsent(unsent)
    kept = f" and {waiting} metric batches wait in {unsent}" if waiting else ""
    with tracking.server_needed(tracking.tracking_uri(cfg.mlflow, root), f"the outputs are written{kept}; start it "
                                "and rerun the stage: it does not train again, it logs them"):
        tracking.replay_unsent(unsent)  # what rank 0 could not send during training
        tracking.log_metrics({k: metrics[k] for k in ("final_loss", "images_per_s", "wall_s")}, step=metrics["steps"])
        tracking.log_artifacts(encoder_dir, "encoder")
        tracking.log_encoder_model(model.target_encoder, encoder_meta(encoder_dir), cfg.mlflow)
        tracking.log_artifact(csv_path)
        if png is not None:
            tracking.log_artifact(png)
        with tempfile.TemporaryDirectory() as d:
            params = Path(d) / "params.yaml"  # the resolved config (preset applied) this run trained with
            params.write_text(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict(), default=list)), sort_keys=False))
            tracking.log_artifact(params)
    print(f"pretrain: {metrics['steps']} steps, final loss {metrics['final_loss']:.4f}, "
          f"{metrics['images_per_s']:.1f} img/s -> {encoder_dir}")
    return metrics


def _last_diagnostics(history: pd.DataFrame) -> dict[str, float | None]:
    """The last logged value of each diagnostics column (`pipeline.diagnostics`), None if never logged."""
    out: dict[str, float | None] = {}
    for col in DIAG_COLUMNS:
        values = history[col].dropna()
        out[col] = float(values.iloc[-1]) if len(values) else None
    return out


def _curves_png(cfg: Config, history: pd.DataFrame, path: Path) -> Path | None:
    """The training-curves figure when `pipeline.viz` provides it (optional: drawing never fails a run)."""
    try:
        from pipeline.viz import training_curves
    except ImportError:
        return None
    if history.empty:
        return None
    return training_curves(history, path, collapse_std_min=cfg.pretrain.collapse_std_min,
                           collapse_rank_min=cfg.pretrain.collapse_rank_min, title="I-JEPA pretraining")


# --------------------------------------------------------------------------------------------- sweep


class _EpochReports(TuneReportCallback):
    """TuneReportCallback for the reports that carry `metric` (the epoch ends): Tune rejects a result
    without its scheduler's metric, and the checkpoint-only reports have none."""

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if metrics and self.metric in metrics[0]:
            super().after_report(run_context, metrics, None)  # the trainer keeps its own checkpoints


def _sweep_trial(params: dict[str, Any], *, cfg: Config, root: str, trial_config: Callable[[Config, dict], Config],
                 dataset_fn: Callable[[], Dataset], epoch_end: EpochEndFn, label: Callable[[dict], str],
                 metric: str, parent_run_id: str, trials_dir: str) -> None:
    """One Tune trial: a child MLflow run, then the pretrain loop on a TorchTrainer of its own.

    The trainer is named by the trial id under `trials_dir`, so a trial restarted by Tuner.restore
    resumes from its last checkpoint; its child run id is kept there too and reopened.
    """
    trial_id = tune.get_context().get_trial_id()
    tcfg = trial_config(cfg, params)
    root_path = Path(root)
    uri = tracking.tracking_uri(cfg.mlflow, root_path)
    tracking.connect(cfg.mlflow, root_path)
    id_file = storage.join(trials_dir, trial_id, TRIAL_RUN_ID)
    run_id = (storage.read_text(id_file) or "").strip() or None
    if run_id and tracking.run_status(run_id) is None:
        run_id = None
    run_params = {"trial_id": trial_id, **{f"trial.{k}": v for k, v in params.items()},  # the search axes
                  "tune.epochs": cfg.tune.epochs, "ray.resources_per_worker": tcfg.ray.resources_per_worker}
    opened = (tracking.pipeline_run(tcfg, label(params), run_id=run_id, root=root_path) if run_id
              else tracking.child_run(parent_run_id, label(params), params=run_params))
    with opened as run:
        storage.write_text(id_file, run.info.run_id + "\n")
        build_trainer(tcfg, dataset_fn, trial_id, trials_dir, tracking_uri=uri, run_id=run.info.run_id,
                      max_epochs=cfg.tune.epochs, callbacks=[_EpochReports(metric)], epoch_end=epoch_end).fit()


class _PlacementGroupReaper(tune.Callback):
    """Removes the worker placement groups that finished trials leave behind.

    Seen here (Ray 2.60, Train V2 inside Tune): after a trial's `fit()` returns, its workers' placement
    group stays CREATED and keeps the trial's CPUs, so the next trial's workers never start (Train gives
    up after a minute and retries for ever). Train's PlacementGroupCleaner, meant to remove it, dies when
    several Ray instances run on the machine. Removed: groups made during the sweep whose bundles are a
    trial worker's and whose resources have stayed all free (no worker on them) for `idle_s`.
    """

    def __init__(self, bundle: dict[str, float], idle_s: float = 5.0, every_s: float = 1.0):
        self.want = {k: v for k, v in bundle.items() if v}
        self.before = set(placement_group_table())
        self.idle_s, self.every_s = idle_s, every_s
        self.idle_since: dict[str, float] = {}
        self.last = 0.0

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s:
            return
        self.last = now
        free = ray.available_resources()
        for pg_id, pg in placement_group_table().items():
            bundles = [{k: v for k, v in b.items() if v} for b in pg["bundles"].values()]
            if pg_id in self.before or pg["state"] != "CREATED" or any(b != self.want for b in bundles):
                continue
            idle = all(free.get(f"{k}_group_{pg_id}", 0.0) >= v * len(bundles) - 1e-9 for k, v in self.want.items())
            if not idle:
                self.idle_since.pop(pg_id, None)
            elif now - self.idle_since.setdefault(pg_id, now) >= self.idle_s:
                remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(pg_id))))
                self.before.add(pg_id)


def _param_space(cfg: Config, space: dict[str, list[Any]]) -> dict[str, Any]:
    pick = tune.grid_search if cfg.tune.search == "grid" else tune.choice
    return {k: pick(v) for k, v in space.items()}


def _trial_record(result: Any, trials_dir: str, keys: Sequence[str]) -> dict[str, Any]:
    """{"trial_id", "params", "history": [one dict per epoch], "error", "mlflow_run_id"} of a Tune result."""
    df = result.metrics_dataframe
    history: list[dict[str, Any]] = []
    if df is not None and "epoch" in df:
        df = df.dropna(subset=["epoch"]).drop_duplicates("epoch", keep="last").sort_values("epoch")
        history = [{k: (float(v) if k != "epoch" else int(v)) for k, v in row.items() if k in keys and v == v}
                   for row in df.to_dict("records")]
    trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
    run_id = (storage.read_text(storage.join(trials_dir, trial_id, TRIAL_RUN_ID)) or "").strip() or None
    return {"trial_id": trial_id, "params": dict(result.config), "history": history,
            "error": str(result.error).splitlines()[0] if result.error else None,
            "mlflow_run_id": run_id}


def tune_sweep(cfg: Config, root: str | Path, name: str, *, space: dict[str, list[Any]],
               trial_config: Callable[[Config, dict], Config], dataset_fn: Callable[[], Dataset],
               epoch_end: EpochEndFn, check_resources: Callable[[Config, dict[str, float]], int],
               label: Callable[[dict], str], metric: str, driver_resources: dict[str, float],
               history_keys: Sequence[str]) -> tuple[list[dict[str, Any]], str]:
    """Run (or resume, or just read back) the Tune sweep `name`; returns (trial records, parent run id).

    Trials: `trial_config(cfg, params)` pretrained by `build_trainer` for `tune.epochs` epochs with
    `epoch_end` scoring each epoch; ASHA (time unit: epochs, `metric`, mode max) stops the weak ones.
    Storage `<ray.storage_path>/<name>/` (a local folder or an object-store prefix): Tune's experiment
    (Tuner.restore resumes it), `trials/<id>/` (each trial's TorchTrainer and MLflow run id) and
    `pipeline.json` (the parent MLflow run, then the finished records: a finished sweep is not rerun).
    `check_resources(cfg, ray.cluster_resources())` runs before any trial and returns how many trials fit
    at once (Train gives up on workers that wait a minute for resources).
    """
    root = Path(root).resolve()
    location = storage.resolve(root, cfg.ray.storage_path)
    _check_storage(cfg.ray, location)
    exp_dir = storage.join(location, name)
    trials_dir, state_file = storage.join(exp_dir, "trials"), storage.join(exp_dir, STATE_FILE)
    state = _read_state(state_file)
    parent = state.get("mlflow_run_id")
    if parent and tracking.run_status(parent) is None:
        parent, state = None, {}  # the MLflow store was reset
    if state.get("status") == "finished":
        print(f"sweep: {name} already finished; writing its outputs again")
        return state["trials"], parent
    init_ray(cfg.ray)
    concurrent = check_resources(cfg, ray.cluster_resources())
    t = cfg.tune
    with tracking.pipeline_run(cfg, "sweep", run_id=parent, root=root) as run:
        parent = run.info.run_id
        tracking.set_tag("ray_sweep_name", name)
        _write_state(state_file, {"mlflow_run_id": parent, "status": "running"})
        trainable = tune.with_resources(
            tune.with_parameters(_sweep_trial, cfg=cfg, root=str(root), trial_config=trial_config,
                                 dataset_fn=dataset_fn, epoch_end=epoch_end, label=label, metric=metric,
                                 parent_run_id=parent, trials_dir=trials_dir),
            driver_resources)
        first = trial_config(cfg, {k: v[0] for k, v in space.items()})
        reaper = _PlacementGroupReaper(dict(first.ray.resources_per_worker))
        if tune.Tuner.can_restore(exp_dir):
            print(f"sweep: resuming {name} from {exp_dir}")
            tuner = tune.Tuner.restore(exp_dir, trainable, resume_unfinished=True, resume_errored=True)
        else:
            # stop_last_trials=False: ASHA does not stop a trial for reaching max_t; it ends on its own.
            # With True it is stopped on its last report while its TrainController is still wrapping up:
            # Tune removes the trial's placement group and the controller dies inside `fit()`. (A trial
            # below the cutoff of a rung at max_t is still stopped there; the loop below closes its run.)
            asha = ASHAScheduler(time_attr="epoch", metric=metric, mode="max", max_t=t.epochs,
                                 grace_period=t.asha_grace_epochs, reduction_factor=2, stop_last_trials=False)
            tuner = tune.Tuner(
                trainable, param_space=_param_space(cfg, space),
                tune_config=tune.TuneConfig(scheduler=asha, num_samples=t.num_samples, search_alg=BasicVariantGenerator(
                    random_state=cfg.pretrain.seed, max_concurrent=concurrent)),
                run_config=tune.RunConfig(name=name, storage_path=location, callbacks=[reaper],
                                          failure_config=tune.FailureConfig(max_failures=0)))
        results = tuner.fit()
    trials = sorted((_trial_record(r, trials_dir, history_keys) for r in results), key=lambda r: r["trial_id"])
    for rec in trials:
        # A trial that ASHA stopped is torn down inside `fit()`: its child run is left RUNNING (process
        # killed) or FAILED (its controller died under it). Tune saw no error and every epoch it reported
        # is in the record, so the run is closed as FINISHED here, tagged stopped_early.
        status = tracking.run_status(rec["mlflow_run_id"]) if rec["mlflow_run_id"] else None
        if rec["error"] is None and status in ("RUNNING", "FAILED", "KILLED"):
            with tracking.pipeline_run(cfg, label(rec["params"]), run_id=rec["mlflow_run_id"], root=root):
                epochs = max((h.get("epoch", 0) for h in rec["history"]), default=0)
                tracking.set_tag("stopped_early", str(epochs < t.epochs).lower())
                tracking.set_tag("status_when_sweep_ended", status)
    _write_state(state_file, {"mlflow_run_id": parent, "status": "finished", "trials": trials})
    return trials, parent
