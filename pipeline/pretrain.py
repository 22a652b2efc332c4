"""The pretrain run: train on Ray (or resume, or re-export a finished run) and write the stage's outputs.

    run(cfg, root) -> summary     what the pretrain stage calls
    run_name(cfg)                 `pretrain-<hash>`: the run's folder under `ray.storage_path`
    outputs(cfg, root)            the paths it writes, the pretrain stage's outs in dvc.yaml

A pretraining run is named by the hash of the sections that change what it learns (`run_name`). Its Ray
storage is `<ray.storage_path>/<name>/` (`pipeline.ray_train`), so re-running the stage after the whole
process was killed continues where the last checkpoint left off. `<name>/pipeline.json` records the
MLflow run id (the resumed run logs into the same MLflow run) and, once training ended, the final
checkpoint: a finished run is not retrained, only its outputs are written again (from a checkpoint on an
object store, downloaded first).

Outputs (relative paths against `root`): `<pretrain.out_dir>/encoder/` (the target encoder),
`<pretrain.out_dir>/run_id.txt`, `metrics/pretrain.json`, `metrics/pretrain_curve.csv` and
`reports/pretrain_curves.png`. Ray itself is behind `pipeline.ray_train`.
"""

from __future__ import annotations

import functools
import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from torch import Tensor
from torch.utils.data import Dataset

from pipeline import ray_train, storage, tracking
from pipeline.atomic import atomic_write, atomic_write_json
from pipeline.batches import heldout_images, pretrain_dataset
from pipeline.config import Config
from pipeline.diagnostics import DIAG_COLUMNS, relative_std_floor
from pipeline.errors import PipelineError
from pipeline.models.ijepa import build_ijepa
from pipeline.models.io import ENCODER_DIR, encoder_meta, save_encoder
from pipeline.train import CURVE_COLUMNS
from pipeline.train_state import load_checkpoint
from pipeline.viz import training_curves

RUN_SECTIONS = ("data", "mask", "model", "optim", "pretrain")  # what a run learns from; not ray, not mlflow
STOP_FILE = "nan_stop.json"
METRICS_JSON = Path("metrics/pretrain.json")
CURVE_CSV = Path("metrics/pretrain_curve.csv")
CURVES_PNG = Path("reports/pretrain_curves.png")


def run_name(cfg: Config) -> str:
    """`pretrain-<hash>`: the same params give the same name, hence the same Ray storage to resume from."""
    return f"pretrain-{cfg.hash(*RUN_SECTIONS)}"


def outputs(cfg: Config, root: Path) -> dict[str, Path]:
    """What the stage writes: the encoder folder and run id under `pretrain.out_dir` (relative to `root`), the
    metrics, the curve CSV and its picture. dvc.yaml declares each as an out of stage pretrain."""
    out_dir = root / cfg.pretrain.out_dir  # an absolute out_dir replaces root (pathlib's `/`)
    return {"encoder": out_dir / ENCODER_DIR, "run_id": out_dir / tracking.RUN_ID_FILE, "metrics": root / METRICS_JSON,
            "curve": root / CURVE_CSV, "curves_png": root / CURVES_PNG}


def run(cfg: Config, root: str | Path | None = None, dataset_fn: Callable[[], Dataset] | None = None) -> dict[str, Any]:
    """Pretrain on Ray (or resume, or re-export a finished run), write the outputs; return the summary.

    `dataset_fn` defaults to the ImageNet-format train split under `cfg.data` (tests pass a tiny one); the
    diagnostics then run on held-out val images (`pipeline.batches.heldout_images`).
    Raises PipelineError before any training when MLflow or the storage is unreachable or the data is
    missing, and when the loss stops being finite (naming the step; the last good checkpoint stays in the
    storage).
    """
    root = Path(root or Path.cwd()).resolve()
    location = storage.resolve(root, cfg.ray.storage_path)
    name = run_name(cfg)
    state_file = storage.join(location, name, ray_train.STATE_FILE)
    uri = tracking.tracking_uri(cfg.mlflow, root)
    tracking.connect(cfg.mlflow, root)  # unreachable server: one-line error before anything starts
    ray_train.check_storage(cfg.ray, location)
    heldout_fn = functools.partial(heldout_images, cfg, str(root)) if dataset_fn is None else None
    dataset_fn = dataset_fn or functools.partial(pretrain_dataset, cfg, str(root))
    dataset_fn()  # missing or empty data: one-line error here, not inside a Ray worker

    state = ray_train.read_state(state_file)
    run_id = state.get("mlflow_run_id")
    if run_id and tracking.run_status(run_id) is None:
        run_id = None  # the MLflow store was reset: open a new run
    with tracking.pipeline_run(cfg, "pretrain", run_id=run_id, root=root, driver_system_metrics=False) as mlflow_run:
        run_id = mlflow_run.info.run_id
        tracking.set_tag("ray_run_name", name)
        finished = state.get("status") == "finished" and storage.is_dir(state.get("checkpoint", ""))
        if finished:
            print(f"pretrain: {name} already finished; writing its outputs from {state['checkpoint']}")
            summary, checkpoint = state["summary"], state["checkpoint"]
        else:
            ray_train.write_state(state_file, {"mlflow_run_id": run_id, "status": "running"})
            summary, checkpoint = _train(cfg, dataset_fn, heldout_fn, name, location, uri, run_id)
            ray_train.write_state(state_file, {"mlflow_run_id": run_id, "status": "finished", "summary": summary,
                                               "checkpoint": checkpoint})
        summary = {**summary, "retrained": not finished}
        return _write_outputs(cfg, root, checkpoint, run_id, name, summary)


def _train(cfg: Config, dataset_fn: Callable[[], Dataset], heldout_fn: Callable[[], Tensor | None] | None, name: str,
           location: str, uri: str, run_id: str) -> tuple[dict[str, Any], str]:
    """Fit the run's TorchTrainer (resuming from its latest checkpoint); (summary, final checkpoint location).

    PipelineError when the loss stopped being finite (the step from the stop file) or no final checkpoint.
    """
    ray_train.init_ray(cfg.ray)
    stop_file = storage.join(location, name, STOP_FILE)
    storage.delete(stop_file)
    result = ray_train.build_trainer(cfg, dataset_fn, name, location, tracking_uri=uri, run_id=run_id,
                                     stop_file=stop_file, heldout_fn=heldout_fn).fit()
    summary = dict(result.metrics or {})
    stop = storage.read_text(stop_file)
    if stop is not None:
        nan_step = json.loads(stop)["nan_step"]
        last = ray_train.checkpoint_location(location, result.checkpoint) if result.checkpoint else "none"
        tracking.set_tag("failure", f"non-finite loss at step {nan_step}")
        raise PipelineError(f"loss is not finite at step {nan_step}; training stopped, last good "
                            f"checkpoint {last} kept; lower optim.lr or set optim.grad_clip")
    if result.checkpoint is None or not summary.get("finished"):
        raise PipelineError(f"pretrain run {name} ended without a final checkpoint ({summary})")
    return summary, ray_train.checkpoint_location(location, result.checkpoint)


def _write_outputs(cfg: Config, root: Path, checkpoint: str, run_id: str, name: str,
                   summary: dict[str, Any]) -> dict[str, Any]:
    """Encoder, run id, metrics JSON, curve CSV (+ PNG) from the final checkpoint (a `pipeline.storage`
    location, downloaded when on an object store); all into MLflow too."""
    with storage.local_dir(checkpoint) as d:
        state = load_checkpoint(d)
    model = build_ijepa(cfg)
    model.load_state_dict(state["model"])
    paths = outputs(cfg, root)
    encoder_dir = save_encoder(model.target_encoder, cfg.model, cfg.data.image_size, paths["encoder"],
                               extra={"params_hash": cfg.hash(*RUN_SECTIONS), "step": state["step"],
                                      "mlflow_run_id": run_id})
    tracking.write_run_id(run_id, paths["run_id"])

    history = pd.DataFrame(state["history"], columns=list(CURVE_COLUMNS))
    last = history.iloc[-1] if len(history) else None
    metrics = {"final_loss": float(summary.get("final_loss", last["loss"] if last is not None else "nan")),
               "steps": int(state["step"]), "epochs": cfg.pretrain.epochs, "batch_size": cfg.pretrain.batch_size,
               "images_per_s": float(summary.get("images_per_s", 0.0)), "wall_s": float(summary.get("wall_s", 0.0)),
               "final_target_std": float(last["target_std"]) if last is not None else None,
               **_last_diagnostics(history), "feature_std_init": summary.get("feature_std_init"),
               "num_workers": cfg.ray.num_workers, "resumed_from_step": int(summary.get("resumed_from", 0)),
               "retrained": bool(summary["retrained"]), "ray_run_name": name, "mlflow_run_id": run_id}
    csv_path, json_path = paths["curve"], paths["metrics"]
    atomic_write(csv_path, lambda tmp: history.to_csv(tmp, index=False))
    atomic_write_json(json_path, metrics, sort_keys=False)

    png = _curves_png(cfg, history, paths["curves_png"], metrics["feature_std_init"])
    # The local outputs are written; a server gone now fails the stage, and a rerun (not retraining) logs again.
    unsent = storage.join(storage.resolve(root, cfg.ray.storage_path), name, tracking.UNSENT_FILE)
    waiting = tracking.count_unsent(unsent)
    kept = f" and {waiting} metric batches wait in {unsent}" if waiting else ""
    with tracking.server_needed(tracking.tracking_uri(cfg.mlflow, root), f"the outputs are written{kept}; start it "
                                "and rerun the stage: it does not train again, it logs them"):
        tracking.replay_unsent(unsent)  # what rank 0 could not send during training
        tracking.log_metrics({k: metrics[k] for k in ("final_loss", "images_per_s", "wall_s", "feature_std_init")
                              if metrics[k] is not None}, step=metrics["steps"])
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


def _curves_png(cfg: Config, history: pd.DataFrame, path: Path, std_init: float | None) -> Path | None:
    """The training-curves figure; None for an empty history (a run that logged no step). `std_init` (the
    seeded init's feature std on the diagnostics batch, None without diagnostics) places the relative
    alarm's line at collapse_std_drop x std_init."""
    if history.empty:
        return None
    p = cfg.pretrain
    return training_curves(history, path, collapse_std_min=p.collapse_std_min, collapse_rank_min=p.collapse_rank_min,
                           collapse_std_drop=relative_std_floor(std_init, p.collapse_std_drop),
                           title="I-JEPA pretraining")
