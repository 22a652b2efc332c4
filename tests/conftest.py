"""Shared fixtures: the repo root, a tiny config that runs anywhere in seconds, an S3-compatible server."""

import atexit
import faulthandler
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from pipeline.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]

# One CI run (2026-12-03) printed "445 passed" and then died of a segmentation fault while the interpreter
# tore down (make test: exit 139); three local runs of the same suite (one with chromium, PostgreSQL and
# CI=true, one from a fresh clone) did not. The crash came after pytest's own faulthandler was switched
# off, so nothing says which extension's finaliser it was. Once the session is over: faulthandler back on
# (a crash in an atexit handler, e.g. Ray's shutdown or MLflow's flush, still prints every thread's stack
# and fails the run), and after the other atexit handlers (this one is registered first, so it runs last)
# the process exits with pytest's status without finalising the extension modules.
_SESSION_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus) -> None:
    _SESSION_STATUS.append(int(exitstatus))


def pytest_unconfigure(config) -> None:
    faulthandler.enable(file=sys.__stderr__, all_threads=True)


@atexit.register
def _exit_without_finalising() -> None:
    if _SESSION_STATUS:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_SESSION_STATUS[-1])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float = 300.0, every: float = 0.2) -> bool:
    """Poll `predicate()` until it is true (True) or `timeout` seconds pass (False)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return True
        time.sleep(every)
    return False


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


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory) -> str:
    """`http://127.0.0.1:<port>` of a moto S3 server started for the session (skipped without moto[server])."""
    pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install 'moto[server]')")
    port = free_port()
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("w")
    proc = subprocess.Popen([sys.executable, "-c", "from moto.server import main; main()", "-H", "127.0.0.1",
                             "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(150):
            try:
                urllib.request.urlopen(url, timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"moto_server exited with {proc.returncode}; see {log.name}")
                time.sleep(0.2)
        else:
            pytest.fail(f"moto_server did not answer on {url} within 30 s; see {log.name}")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch) -> str:
    """`s3://<new bucket>` on the moto server, with the standard AWS_* variables pointing every client
    (pyarrow, hence Ray; boto3; DVC) at it for the test, and at nothing else."""
    import pyarrow.fs as pafs

    env = {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    bucket = f"ijepa-{uuid.uuid4().hex[:12]}"
    pafs.S3FileSystem(endpoint_override=s3_endpoint, access_key="testing", secret_key="testing", region="us-east-1",
                      allow_bucket_creation=True).create_dir(bucket)
    return f"s3://{bucket}"
