"""Shared fixtures: the repo root and a tiny config that runs anywhere in seconds."""

from pathlib import Path

import pytest

from pipeline.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def demo_cfg() -> Config:
    """The committed params.yaml (preset demo)."""
    return load_config(ROOT / "params.yaml")


@pytest.fixture
def tiny_cfg(tmp_path) -> Config:
    """Smaller than the demo: 32 px, 2 epochs of a few steps, outputs under tmp_path."""
    return load_config(ROOT / "params.yaml").replace(**{
        "data.image_size": 32,
        "data.root": str(tmp_path / "data"),
        "data.synthetic.train_scenes": 64,
        "data.synthetic.val_scenes": 32,
        "model.pred_depth": 1,
        "model.pred_emb_dim": 32,
        "pretrain.epochs": 2,
        "pretrain.batch_size": 16,
        "pretrain.checkpoint_every": 2,
        "pretrain.log_every": 1,
        "pretrain.diag_every": 2,
        "pretrain.diag_images": 16,
        "pretrain.out_dir": str(tmp_path / "models"),
        "evaluate.encoder": str(tmp_path / "models" / "encoder"),  # params.yaml: <pretrain.out_dir>/encoder
        "ray.storage_path": str(tmp_path / "ray_results"),
        "mlflow.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "mlflow.artifact_root": str(tmp_path / "mlartifacts"),
        "mask.min_keep": 2,
    })


@pytest.fixture(scope="session")
def eval_data(tmp_path_factory) -> Path:
    """The synthetic export at 32 px (64 train / 32 val scenes) in every real format, once per session:
    the evaluation stages' data."""
    from pipeline.data import export_synthetic

    root = tmp_path_factory.mktemp("evaldata")
    cfg = load_config(ROOT / "params.yaml").replace(**{
        "data.image_size": 32, "data.synthetic.train_scenes": 64, "data.synthetic.val_scenes": 32})
    export_synthetic(cfg.data, root, progress=False)
    return root
