"""The one module that talks to MLflow.

Embedded default: a SQLite store `mlflow.db` and an artifact folder in the repo; `mlflow.tracking_uri`
points at a server instead. One MLflow run per pipeline run (the pretrain stage opens it and writes its
id to a small file that dvc declares); evaluation stages log into it as child runs.

A server that goes away mid-run does not stop training: rank 0's `RunLogger` keeps the batches it could not
send in `UNSENT_FILE` (one JSON line each, in the Ray storage folder of the run) with one warning line, and
the pretrain stage sends them when it ends (`replay_unsent`). System metrics of the pretrain run:
`system/node<k>/...`, one set per Ray node that trains (`worker_tracking`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from pipeline import storage
from pipeline.atomic import atomic_write_text
from pipeline.config import Config, MlflowConfig
from pipeline.errors import PipelineError

MAX_PARAM_CHARS = 500  # MLflow's limit on a param value (6000 on new servers; 500 is safe everywhere)

RUN_ID_FILE = "run_id.txt"  # in pretrain.out_dir, beside encoder/: the run the evaluations log into
MODEL_ALIAS = "candidate"  # the registry alias of the newest pretrained encoder (mlflow.register_model)
ENCODER_KEY_TAG = "encoder_key"  # the run that groups the evaluations of an encoder not pretrained here
UNSENT_FILE = "mlflow_unsent.jsonl"  # in the run's Ray storage folder: metric batches the server did not take
# MLflow's REST client retries a refused connection 7 times with backoff: ~4 min per call. A worker that
# logs every few steps must not stall that long, so it fails fast and retries on its own terms (RunLogger).
QUICK_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def tracking_uri(cfg: MlflowConfig, root: Path | None = None) -> str:
    """`cfg.tracking_uri`, or `sqlite:///<root>/mlflow.db` (absolute) for the embedded store."""
    if cfg.tracking_uri:
        return cfg.tracking_uri
    root = (root or Path.cwd()).resolve()
    return f"sqlite:///{root / 'mlflow.db'}"


def _check_reachable(uri: str, hint: str = "start it or set mlflow.tracking_uri: null for the embedded store") -> None:
    """A server that does not answer fails here, in one line, before any training starts."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).read()
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise PipelineError(f"MLflow server {uri} is unreachable ({reason}); {hint}") from None


@contextmanager
def quick_http():
    """MLflow's HTTP calls inside the block fail at once instead of retrying for minutes (`QUICK_HTTP`).

    Process-wide while it lasts (MLflow reads these variables at each request): meant for a Ray worker's
    whole life, or around single calls whose caller retries."""
    saved = {k: os.environ.get(k) for k in QUICK_HTTP}
    os.environ.update(QUICK_HTTP)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def server_needed(uri: str, hint: str):
    """Calls that must reach the store (a stage's final logging): an unreachable server, or one that fails
    on the way, is one PipelineError naming it, followed by `hint` (what the user does next)."""
    _check_reachable(uri, hint)
    try:
        yield
    except mlflow.exceptions.MlflowException as e:
        raise PipelineError(f"MLflow store {uri} failed ({str(e).splitlines()[0][:200]}); {hint}") from None


def connect(cfg: MlflowConfig, root: Path | None = None) -> str:
    """Point MLflow at the configured store and experiment; returns the experiment id."""
    root = (root or Path.cwd()).resolve()
    uri = tracking_uri(cfg, root)
    _check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is None:
        location = None
        if uri.startswith("sqlite:"):
            location = (root / cfg.artifact_root).resolve().as_uri()
        return client.create_experiment(cfg.experiment, artifact_location=location)
    return exp.experiment_id


def git_commit(root: Path | None = None) -> str:
    """HEAD's commit, with `-dirty` when the tree has changes; "unknown" outside a git checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def flat_params(cfg: Config) -> dict[str, str]:
    """Every config value as an MLflow param (`mask.pred_scale` -> "(0.15, 0.2)")."""
    return {k: str(v)[:MAX_PARAM_CHARS] for k, v in cfg.flat().items()}


@contextmanager
def pipeline_run(cfg: Config, run_name: str, run_id: str | None = None, root: Path | None = None,
                 driver_system_metrics: bool = True):
    """Open (or reopen, with `run_id`) the pipeline's MLflow run; tags it with git commit and params hash.

    Yields the active `mlflow.ActiveRun`. This process samples its machine's system metrics when
    `cfg.mlflow.system_metrics` and `driver_system_metrics` (the pretrain stage passes False: its driver
    waits while the Ray nodes sample themselves, `worker_tracking`).
    """
    exp_id = connect(cfg.mlflow, root)
    run = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else exp_id, run_name=run_name,
                           log_system_metrics=cfg.mlflow.system_metrics and driver_system_metrics)
    try:
        if run_id is None:
            mlflow.log_params(flat_params(cfg))
            mlflow.set_tags({"git_commit": git_commit(root), "params_hash": cfg.hash(),
                             "preset": cfg.preset})
        yield run
    except BaseException:
        # Marked FAILED if the store still answers; a server that went away leaves the run RUNNING rather than
        # holding the error back for MLflow's minutes of retries (a rerun reopens the run by id).
        if _is_active(run):
            with quick_http():
                try:
                    mlflow.end_run("FAILED")
                except mlflow.exceptions.MlflowException:
                    pass
        raise
    if _is_active(run):
        mlflow.end_run("FINISHED")


def _is_active(run: mlflow.ActiveRun) -> bool:
    active = mlflow.active_run()
    return active is not None and active.info.run_id == run.info.run_id


@contextmanager
def child_run(parent_run_id: str, run_name: str, params: dict[str, Any] | None = None):
    """A nested run under `parent_run_id` (an evaluation inside the pretraining run, a sweep trial).

    The parent is only named, never reopened: a parent still running in another process (the sweep's
    driver) keeps its status.
    """
    exp_id = mlflow.get_run(parent_run_id).info.experiment_id
    with mlflow.start_run(run_name=run_name, parent_run_id=parent_run_id, experiment_id=exp_id) as run:
        if params:
            mlflow.log_params({k: str(v)[:MAX_PARAM_CHARS] for k, v in params.items()})
        yield run


def encoder_run(cfg: MlflowConfig, root: Path, key: str, run_name: str, params: dict[str, Any]) -> str:
    """The run id under which the evaluations of an external encoder log their child runs.

    Found by its `encoder_key` tag (every evaluation stage of one encoder file computes the same key), or
    created, with `params`, and marked finished at once: it holds no work of its own.
    """
    exp_id = connect(cfg, root)
    client = MlflowClient()
    found = client.search_runs([exp_id], filter_string=f"tags.{ENCODER_KEY_TAG} = '{key}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(exp_id, run_name=run_name,
                            tags={ENCODER_KEY_TAG: key, "git_commit": git_commit(root)})
    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in params.items()])
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def log_encoder_model(encoder: Any, metadata: dict[str, Any], cfg: MlflowConfig) -> str:
    """Log `encoder` as an MLflow model "encoder" of the active run (its model.json as metadata), registered
    as `cfg.registered_model` with alias `candidate` when `cfg.register_model`; returns the model URI.

    Pickle format, not MLflow 3's default pt2 graph: a pt2 model is traced at one input shape, while a user
    wants the module itself (`forward(x, keep_idx)`, any batch). The `pipeline` package travels with it
    (code_paths), so `mlflow.pytorch.load_model("models:/<name>@candidate")` works without this checkout.
    """
    import warnings

    import mlflow.pytorch
    import timm
    import torch

    code = Path(__file__).resolve().parent  # the pipeline package
    requirements = [f"torch=={torch.__version__.split('+')[0]}", f"timm=={timm.__version__}", "numpy"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = mlflow.pytorch.log_model(encoder, name="encoder", metadata=metadata, code_paths=[str(code)],
                                        pip_requirements=requirements, serialization_format="pickle",
                                        registered_model_name=cfg.registered_model if cfg.register_model else None)
    if cfg.register_model:
        MlflowClient().set_registered_model_alias(cfg.registered_model, MODEL_ALIAS, info.registered_model_version)
    return info.model_uri


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)


def set_tag(key: str, value: str) -> None:
    mlflow.set_tag(key, value)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    mlflow.log_artifact(str(path), artifact_path=artifact_path)


def write_run_id(run_id: str, path: str | Path) -> None:
    """The run id for later stages, written atomically (a dvc-declared out)."""
    atomic_write_text(path, run_id + "\n")


def read_run_id(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: no MLflow run id; run the pretrain stage first (dvc repro pretrain)")
    run_id = path.read_text().strip()
    if not run_id.isalnum():
        raise PipelineError(f"{path}: {run_id!r} is not an MLflow run id (expected a hex string)")
    return run_id


def log_artifacts(directory: str | Path, artifact_path: str | None = None) -> None:
    """Every file under `directory` into the active run (e.g. the final encoder folder)."""
    mlflow.log_artifacts(str(directory), artifact_path=artifact_path)


def run_status(run_id: str) -> str | None:
    """The status of run `run_id` in the current store (RUNNING, FINISHED, FAILED, ...), None when unknown."""
    try:
        return MlflowClient().get_run(run_id).info.status
    except mlflow.exceptions.MlflowException:
        return None


class RunLogger:
    """Logs into an existing run by id from any process (a Ray worker), without an active run.

    `uri` is the absolute tracking URI of the driver (`tracking_uri(cfg, root)`): a worker's cwd may differ.
    A batch the store does not take after `attempts` tries (a server gone, SQLite locked by the driver) is
    kept in `unsent` (a `pipeline.storage` location; JSON lines of `run_id`, `step`, `timestamp`,
    `metrics` or `tags`) and training goes on. The first such batch prints one warning line; after it the
    logger stops waiting on the store: later batches go straight to the file, with one try at the store
    every `recheck_s` seconds, and it sends again once that try succeeds. `replay_unsent` sends the file.
    """

    def __init__(self, uri: str, run_id: str, unsent: str | Path | None = None, attempts: int = 3,
                 recheck_s: float = 60.0):
        self.client, self.uri, self.run_id = MlflowClient(uri), uri, run_id
        self.unsent = str(unsent) if unsent is not None else None
        self.attempts, self.recheck_s = attempts, recheck_s
        self.kept = 0  # batches in the unsent file from this logger
        self._last_failure: float | None = None  # monotonic time of the last failed try; None: online
        self._buffer: list[str] = []  # object-store file: its whole text, written again now and then
        self._flushed = 0.0

    def log(self, metrics: dict[str, float], step: int) -> None:
        """One batch of metrics at `step`."""
        self._deliver({"step": int(step), "metrics": {k: float(v) for k, v in metrics.items()}})

    def tag(self, key: str, value: str) -> None:
        self._deliver({"tags": {key: str(value)}})

    def close(self) -> None:
        """Writes out what an object-store unsent file still holds in memory."""
        self._flush(force=True)

    def _deliver(self, record: dict[str, Any]) -> None:
        record = {"run_id": self.run_id, "timestamp": int(time.time() * 1000), **record}
        offline = self._last_failure is not None
        if offline and time.monotonic() - self._last_failure < self.recheck_s:
            self._keep(record, None)
            return
        error = None
        for attempt in range(1 if offline else self.attempts):
            try:
                with quick_http():
                    _send(self.client, self.run_id, [record])
                self._last_failure = None
                return
            except mlflow.exceptions.MlflowException as e:
                error = e
                if attempt + 1 < self.attempts:
                    time.sleep(0.5 * 2 ** attempt)
        self._last_failure = time.monotonic()
        self._keep(record, error)

    def _keep(self, record: dict[str, Any], error: Exception | None) -> None:
        if self.unsent is None:
            if self.kept == 0:
                print(f"warning: MLflow store {self.uri} did not take the metrics{_from_step(record)}; they are "
                      f"not logged ({_first_line(error)})", flush=True)
            self.kept += 1
            return
        line = json.dumps(record) + "\n"
        if storage.is_uri(self.unsent):
            if not self._buffer:  # a file left by an earlier attempt of this run: keep its lines
                self._buffer.append(storage.read_text(self.unsent) or "")
            self._buffer.append(line)
            self._flush(force=self.kept == 0)
        else:
            Path(self.unsent).parent.mkdir(parents=True, exist_ok=True)
            with open(self.unsent, "a") as f:
                f.write(line)
        if self.kept == 0:
            print(f"warning: MLflow store {self.uri} did not take the metrics{_from_step(record)} "
                  f"({_first_line(error)}); training goes on, unsent metrics kept in {self.unsent} (the pretrain "
                  "stage sends them when it ends; or pipeline.tracking.replay_unsent)", flush=True)
        self.kept += 1

    def _flush(self, force: bool = False) -> None:
        """An object can only be written whole: at most every 30 s, and on close."""
        if self._buffer and (force or time.monotonic() - self._flushed > 30):
            storage.write_text(self.unsent, "".join(self._buffer))
            self._flushed = time.monotonic()


def _from_step(record: dict[str, Any]) -> str:
    return f" from step {record['step']} on" if "step" in record else ""


def _first_line(error: Exception | None) -> str:
    return str(error).splitlines()[0][:200] if error is not None else "no answer"


def _send(client: MlflowClient, run_id: str, records: list[dict[str, Any]]) -> None:
    """`records` (the unsent file's lines) into `run_id`, within MLflow's limits of a batch."""
    metrics = [Metric(k, v, r["timestamp"], r["step"]) for r in records for k, v in r.get("metrics", {}).items()]
    tags = [RunTag(k, v) for r in records for k, v in r.get("tags", {}).items()]
    for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics and 100 tags a batch
        client.log_batch(run_id, metrics=metrics[i:i + 1000])
    for i in range(0, len(tags), 100):
        client.log_batch(run_id, tags=tags[i:i + 100])


def replay_unsent(location: str | Path, uri: str | None = None) -> int:
    """Send what `RunLogger` kept in `location` (each line into the run it names) to the store at `uri`
    (default: the current tracking URI), then delete the file; returns how many batches it held.

    Safe to repeat after a failure part way: MLflow ignores a metric logged again with the same step,
    timestamp and value.
    """
    location = str(location)
    text = storage.read_text(location)
    if text is None:
        return 0
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    client = MlflowClient(uri) if uri else MlflowClient()
    by_run: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_run.setdefault(r["run_id"], []).append(r)
    for run_id, rs in by_run.items():
        _send(client, run_id, rs)
    storage.delete(location)
    return len(records)


def count_unsent(location: str | Path) -> int:
    """How many batches wait in an unsent file (0 when there is none)."""
    text = storage.read_text(str(location))
    return sum(1 for line in (text or "").splitlines() if line.strip())


@contextmanager
def worker_tracking(uri: str | None, run_id: str | None, *, rank: int, node_rank: int, local_rank: int,
                    system_metrics: bool, unsent: str | Path | None = None):
    """What one Ray worker logs during training; yields rank 0's `RunLogger` (None on the other ranks).

    The first worker on each node samples that node's system metrics into the run as
    `system/node<node_rank>/...` (MLflow's node id), and tags the run `system_metrics.node<k>` with the
    host name. HTTP calls fail fast in the worker (`quick_http`), so a server that goes away costs the
    training a few seconds once, not minutes a step; the node's sampling then stops, quietly.
    """
    if not run_id or not uri:
        yield None
        return
    with quick_http():
        tracker = RunLogger(uri, run_id, unsent) if rank == 0 else None
        monitor = None
        if system_metrics and local_rank == 0:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            node = f"node{node_rank}"
            # Its messages (started, stopped, "failed to log" once the store is gone) would repeat on every
            # node what rank 0's one warning line says.
            logging.getLogger("mlflow.system_metrics").setLevel(logging.CRITICAL)
            try:
                MlflowClient(uri).set_tag(run_id, f"system_metrics.{node}", socket.gethostname())
                monitor = SystemMetricsMonitor(run_id, node_id=node, resume_logging=True, tracking_uri=uri)
                monitor.start()
            except mlflow.exceptions.MlflowException:
                monitor = None  # the store is down already: rank 0's logger says so
        try:
            yield tracker
        finally:
            if monitor is not None:
                monitor.finish()
            if tracker is not None:
                tracker.close()
