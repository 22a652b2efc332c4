"""The one module that talks to MLflow.

Embedded default: a SQLite store `mlflow.db` and an artifact folder in the repo; `mlflow.tracking_uri`
points at a server instead. One MLflow run per pipeline run (the pretrain stage opens it and writes its
id to a small file that dvc declares); evaluation stages log into it as child runs.
"""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from pipeline.config import Config, MlflowConfig
from pipeline.errors import PipelineError

MAX_PARAM_CHARS = 500  # MLflow's limit on a param value (6000 on new servers; 500 is safe everywhere)

RUN_ID_FILE = "run_id.txt"  # in pretrain.out_dir, beside encoder/: the run the evaluations log into
MODEL_ALIAS = "candidate"  # the registry alias of the newest pretrained encoder (mlflow.register_model)
ENCODER_KEY_TAG = "encoder_key"  # the run that groups the evaluations of an encoder not pretrained here


def tracking_uri(cfg: MlflowConfig, root: Path | None = None) -> str:
    """`cfg.tracking_uri`, or `sqlite:///<root>/mlflow.db` (absolute) for the embedded store."""
    if cfg.tracking_uri:
        return cfg.tracking_uri
    root = (root or Path.cwd()).resolve()
    return f"sqlite:///{root / 'mlflow.db'}"


def _check_reachable(uri: str) -> None:
    """A server that does not answer fails here, in one line, before any training starts."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5).read()
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise PipelineError(f"MLflow server {uri} is unreachable ({reason}); start it or set "
                            "mlflow.tracking_uri: null for the embedded store") from None


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
def pipeline_run(cfg: Config, run_name: str, run_id: str | None = None, root: Path | None = None):
    """Open (or reopen, with `run_id`) the pipeline's MLflow run; tags it with git commit and params hash.

    Yields the active `mlflow.ActiveRun`. System metrics follow `cfg.mlflow.system_metrics`.
    """
    exp_id = connect(cfg.mlflow, root)
    with mlflow.start_run(run_id=run_id, experiment_id=None if run_id else exp_id, run_name=run_name,
                          log_system_metrics=cfg.mlflow.system_metrics) as run:
        if run_id is None:
            mlflow.log_params(flat_params(cfg))
            mlflow.set_tags({"git_commit": git_commit(root), "params_hash": cfg.hash(),
                             "preset": cfg.preset})
        yield run


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(run_id + "\n")
    tmp.replace(path)


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
    """

    def __init__(self, uri: str, run_id: str):
        self.client, self.run_id = MlflowClient(uri), run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        """One batch; a store that stays busy (SQLite locked by the driver) loses these metrics with a
        warning rather than killing the training worker."""
        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        for attempt in range(3):
            try:
                self.client.log_batch(self.run_id, metrics=batch)
                return
            except mlflow.exceptions.MlflowException as e:
                if attempt == 2:
                    print(f"warning: MLflow metrics of step {step} not logged ({str(e).splitlines()[0]})", flush=True)
                else:
                    time.sleep(0.5)

    def tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, value)
