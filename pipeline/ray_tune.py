"""The door to Ray Tune: a sweep whose trials are short pretraining runs, each on a TorchTrainer of its own.

    tune_sweep(cfg, root, spec) -> (trial records, parent MLflow run id)

`SweepSpec` says what the trials are (search space, trial config, run label, score, ...); the masking sweep
builds one (`pipeline.sweep`). Trials are pretrained by `pipeline.ray_train.build_trainer` for `tune.epochs`
epochs with the spec's score run after each epoch; ASHA (time unit: epochs, the spec's metric, mode max)
stops the weak ones. Storage `<ray.storage_path>/<spec.name>/` (a local folder or an object-store prefix):
Tune's experiment (Tuner.restore resumes it), `trials/<id>/` (each trial's TorchTrainer and MLflow run id)
and `pipeline.json` (the parent MLflow run, then the finished records: a finished sweep is not rerun).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from pipeline import ray_train, storage, tracking  # ray_train before any Ray import: it sets RAY_AUTH_MODE
from pipeline.config import Config
from pipeline.train import EpochEndFn

# isort: split
import ray
from ray import tune
from ray._raylet import PlacementGroupID
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator
from ray.util.placement_group import PlacementGroup, placement_group_table, remove_placement_group

TRIAL_RUN_ID = "mlflow_run_id.txt"  # under trials/<trial id>/ of a sweep


@dataclass(frozen=True)
class SweepSpec:
    """What a sweep's trials are. Everything but `concurrency` travels to the trials: picklable
    (module-level functions, or dataclasses of plain values).

    name              the sweep's folder under `ray.storage_path` (and Tune's experiment name)
    space             search axis -> its values (tune.grid_search or tune.choice, by `tune.search`)
    trial_config      (cfg, params) -> the trial's Config; params: one value per axis
    label             params -> the trial's MLflow run name
    concurrency       (cfg, ray.cluster_resources()) -> how many trials run at once; raises PipelineError
                      when one trial does not fit the cluster (Train gives up on workers that wait a minute)
    dataset_fn        () -> the pretraining images, built inside each worker
    score             (model, epoch) -> metrics joining the epoch's report (rank 0), `metric` among them
    metric            what ASHA compares, higher is better
    history_keys      the keys of an epoch's report kept in the trial records
    driver_resources  what a trial's driver process holds while it waits on its trainer
    """

    name: str
    space: dict[str, list[Any]]
    trial_config: Callable[[Config, dict[str, Any]], Config]
    label: Callable[[dict[str, Any]], str]
    concurrency: Callable[[Config, dict[str, float]], int]
    dataset_fn: Callable[[], Dataset]
    score: EpochEndFn
    metric: str
    history_keys: Sequence[str]
    driver_resources: dict[str, float]


class _EpochReports(TuneReportCallback):
    """TuneReportCallback for the reports that carry `metric` (the epoch ends): Tune rejects a result
    without its scheduler's metric, and the checkpoint-only reports have none."""

    def __init__(self, metric: str):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if metrics and self.metric in metrics[0]:
            super().after_report(run_context, metrics, None)  # the trainer keeps its own checkpoints


def _sweep_trial(params: dict[str, Any], *, cfg: Config, root: str, spec: SweepSpec, parent_run_id: str,
                 trials_dir: str) -> None:
    """One Tune trial: a child MLflow run, then the pretrain loop on a TorchTrainer of its own.

    The trainer is named by the trial id under `trials_dir`, so a trial restarted by Tuner.restore
    resumes from its last checkpoint; its child run id is kept there too and reopened. (Tune names the
    trial folders after this function: `_sweep_trial_<id>`.)
    """
    trial_id = tune.get_context().get_trial_id()
    tcfg = spec.trial_config(cfg, params)
    root_path = Path(root)
    uri = tracking.tracking_uri(cfg.mlflow, root_path)
    tracking.connect(cfg.mlflow, root_path)
    id_file = storage.join(trials_dir, trial_id, TRIAL_RUN_ID)
    run_id = (storage.read_text(id_file) or "").strip() or None
    if run_id and tracking.run_status(run_id) is None:
        run_id = None
    run_params = {"trial_id": trial_id, **{f"trial.{k}": v for k, v in params.items()},  # the search axes
                  "tune.epochs": cfg.tune.epochs, "ray.resources_per_worker": tcfg.ray.resources_per_worker}
    opened = (tracking.pipeline_run(tcfg, spec.label(params), run_id=run_id, root=root_path) if run_id
              else tracking.child_run(parent_run_id, spec.label(params), params=run_params))
    with opened as run:
        storage.write_text(id_file, run.info.run_id + "\n")
        ray_train.build_trainer(tcfg, spec.dataset_fn, trial_id, trials_dir, tracking_uri=uri, run_id=run.info.run_id,
                                max_epochs=cfg.tune.epochs, callbacks=[_EpochReports(spec.metric)],
                                epoch_end=spec.score).fit()


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


def _tuner(cfg: Config, spec: SweepSpec, trainable: Any, exp_dir: str, location: str, concurrent: int) -> tune.Tuner:
    """Tuner.restore of the experiment in `exp_dir` when there is one, else a new Tuner with ASHA."""
    if tune.Tuner.can_restore(exp_dir):
        print(f"sweep: resuming {spec.name} from {exp_dir}")
        return tune.Tuner.restore(exp_dir, trainable, resume_unfinished=True, resume_errored=True)
    t = cfg.tune
    first = spec.trial_config(cfg, {k: v[0] for k, v in spec.space.items()})
    reaper = _PlacementGroupReaper(dict(first.ray.resources_per_worker))
    # stop_last_trials=False: ASHA does not stop a trial for reaching max_t; it ends on its own.
    # With True it is stopped on its last report while its TrainController is still wrapping up:
    # Tune removes the trial's placement group and the controller dies inside `fit()`. (A trial
    # below the cutoff of a rung at max_t is still stopped there; tune_sweep closes its run.)
    asha = ASHAScheduler(time_attr="epoch", metric=spec.metric, mode="max", max_t=t.epochs,
                         grace_period=t.asha_grace_epochs, reduction_factor=2, stop_last_trials=False)
    return tune.Tuner(
        trainable, param_space=_param_space(cfg, spec.space),
        # A grid's repeats are already in the space (its seed axis, pipeline.sweep.search_axes): Tune runs it once.
        tune_config=tune.TuneConfig(scheduler=asha, num_samples=1 if t.search == "grid" else t.num_samples,
                                    search_alg=BasicVariantGenerator(random_state=cfg.pretrain.seed,
                                                                     max_concurrent=concurrent)),
        run_config=tune.RunConfig(name=spec.name, storage_path=location, callbacks=[reaper],
                                  failure_config=tune.FailureConfig(max_failures=0)))


def tune_sweep(cfg: Config, root: str | Path, spec: SweepSpec) -> tuple[list[dict[str, Any]], str]:
    """Run (or resume, or just read back) the sweep `spec.name`; returns (trial records, parent run id).

    A record: {"trial_id", "params": {axis: value}, "history": [{key of spec.history_keys: value}, one per
    epoch], "error": first line or None, "mlflow_run_id"}, sorted by trial id. `spec.concurrency` runs
    before any trial.
    """
    root = Path(root).resolve()
    location = storage.resolve(root, cfg.ray.storage_path)
    ray_train.check_storage(cfg.ray, location)
    exp_dir = storage.join(location, spec.name)
    trials_dir, state_file = storage.join(exp_dir, "trials"), storage.join(exp_dir, ray_train.STATE_FILE)
    state = ray_train.read_state(state_file)
    parent = state.get("mlflow_run_id")
    if parent and tracking.run_status(parent) is None:
        parent, state = None, {}  # the MLflow store was reset
    if state.get("status") == "finished":
        print(f"sweep: {spec.name} already finished; writing its outputs again")
        return state["trials"], parent
    ray_train.init_ray(cfg.ray)
    concurrent = spec.concurrency(cfg, ray.cluster_resources())
    with tracking.pipeline_run(cfg, "sweep", run_id=parent, root=root) as run:
        parent = run.info.run_id
        tracking.set_tag("ray_sweep_name", spec.name)
        ray_train.write_state(state_file, {"mlflow_run_id": parent, "status": "running"})
        trainable = tune.with_resources(
            tune.with_parameters(_sweep_trial, cfg=cfg, root=str(root), spec=spec, parent_run_id=parent,
                                 trials_dir=trials_dir),
            spec.driver_resources)
        results = _tuner(cfg, spec, trainable, exp_dir, location, concurrent).fit()
    trials = sorted((_trial_record(r, trials_dir, spec.history_keys) for r in results), key=lambda r: r["trial_id"])
    for rec in trials:
        # A trial that ASHA stopped is torn down inside `fit()`: its child run is left RUNNING (process
        # killed) or FAILED (its controller died under it). Tune saw no error and every epoch it reported
        # is in the record, so the run is closed as FINISHED here, tagged stopped_early.
        status = tracking.run_status(rec["mlflow_run_id"]) if rec["mlflow_run_id"] else None
        if rec["error"] is None and status in ("RUNNING", "FAILED", "KILLED"):
            with tracking.pipeline_run(cfg, spec.label(rec["params"]), run_id=rec["mlflow_run_id"], root=root):
                epochs = max((h.get("epoch", 0) for h in rec["history"]), default=0)
                tracking.set_tag("stopped_early", str(epochs < cfg.tune.epochs).lower())
                tracking.set_tag("status_when_sweep_ended", status)
    ray_train.write_state(state_file, {"mlflow_run_id": parent, "status": "finished", "trials": trials})
    return trials, parent
