"""The door to Ray Train: start or join Ray, run the pretraining loop on a TorchTrainer, a run's folder.

    init_ray(cfg.ray)                      join `ray.address`, or start a local Ray sized to this machine
    build_trainer(cfg, dataset_fn, ...)    a TorchTrainer over `pipeline.train.train_worker`
    checkpoint_location(location, ckpt)    a result's checkpoint as a `pipeline.storage` location
    read_state / write_state               a run's `pipeline.json` beside Ray's checkpoints

A run's Ray storage is `<ray.storage_path>/<name>/`: a local folder, or an object-store prefix
(`s3://bucket/prefix`) that every node of a cluster reaches (`pipeline.storage`). Ray Train V2 resumes a
run from its latest checkpoint when a trainer with the same (storage_path, name) is started again. The
pretrain run (`pipeline.pretrain`) and the Tune runner (`pipeline.ray_tune`) build on this module; only
these two `ray_*` modules import Ray.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Ray reads RAY_AUTH_MODE when it is imported, not at ray.init: a driver joining a cluster started by
# `ray start` (token authentication on by default) needs it set first; local Ray uses tokens anyway.
# Only when Ray is not imported yet: setting it afterwards would start a local Ray whose processes
# expect a token that this process does not send.
if "ray" not in sys.modules:
    os.environ.setdefault("RAY_AUTH_MODE", "token")
import ray  # noqa: E402
import ray.train
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from torch import Tensor
from torch.utils.data import Dataset

from pipeline import storage, tracking
from pipeline.config import Config, RayConfig
from pipeline.errors import PipelineError
from pipeline.train import EpochEndFn, set_threads, train_worker
from pipeline.train_state import load_checkpoint

STATE_FILE = "pipeline.json"  # in a run's (or a sweep's) Ray storage folder
PID_DIR = "worker_pids"  # rank-<r>.pid of the current worker processes


def init_ray(cfg: RayConfig) -> None:
    """Join `cfg.address`, or start a local Ray sized to this machine (dashboard on 127.0.0.1). Idempotent."""
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


# ---------------------------------------------------------------------------------------- run folder


def check_storage(cfg: RayConfig, location: str) -> None:
    """A one-line error when the object store behind `ray.storage_path` cannot hold runs (before Ray)."""
    problem = storage.problem(location)
    if problem:
        raise PipelineError(f"ray.storage_path = {cfg.storage_path!r}: {problem}; create the bucket or set "
                            "AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")


def read_state(location: str | Path) -> dict[str, Any]:
    """A run's state file (JSON at a `pipeline.storage` location); {} when there is none yet."""
    text = storage.read_text(str(location))
    return json.loads(text) if text is not None else {}


def write_state(location: str | Path, state: dict[str, Any]) -> None:
    storage.write_text(str(location), json.dumps(state, indent=2, default=str) + "\n")


def checkpoint_location(storage_location: str, checkpoint: Checkpoint) -> str:
    """A result's checkpoint as a `pipeline.storage` location (Ray gives a path on its filesystem, without
    the URI scheme of an object store)."""
    scheme = storage.scheme(storage_location)
    return f"{scheme}://{checkpoint.path.lstrip('/')}" if scheme else checkpoint.path


# ------------------------------------------------------------------------------------------- trainer


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
