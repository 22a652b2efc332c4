"""MLflow on a real server: `mlflow server` over a PostgreSQL cluster made for the module, artifacts proxied
to an S3-compatible store (moto). A tiny pretrain and one evaluation log into it and are read back through
the client; then the server is stopped mid-run: training finishes, the unsent metrics wait in the run's
folder (one warning line), the stage fails in one line, and a rerun logs the rest without training again.

Skipped when the PostgreSQL binaries, psycopg, boto3 or moto are missing, but fails when CI is set: CI
installs them (.ci/install-postgres, the `test` extra) and this check must run there.
"""

import functools
import glob
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import mlflow
import mlflow.pytorch
import pytest
import torch
import yaml
from conftest import free_port, wait_for
from mlflow.tracking import MlflowClient

from evals import linear
from evals.common import flatten
from pipeline import pretrain, ray_train, tracking
from pipeline.data.random_images import RandomImages
from pipeline.errors import PipelineError
from pipeline.models.io import load_encoder

RAY = pytest.importorskip("ray")
INITDB = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))[-1:]), None)

BUCKET = "mlflow"
KEYS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
FAST = {"eval_linear.epochs": 3, "eval_linear.attentive_epochs": 2, "eval_linear.lrs": [0.01],
        "eval_linear.weight_decays": [0.0], "data.num_workers": 0}


@pytest.fixture(scope="module", autouse=True)
def ray_down_after():
    RAY.shutdown()  # a Ray of an earlier module lacks this module's environment (the sampling interval)
    yield
    RAY.shutdown()


def missing() -> str | None:
    """What this module needs and the machine lacks, None when nothing."""
    if INITDB is None:
        return "the PostgreSQL binaries (initdb, pg_ctl) are not installed: run .ci/install-postgres"
    for module, package in (("psycopg", "psycopg[binary]"), ("boto3", "boto3"), ("moto", "moto[server]")):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed: pip install '{package}' (the test extra)"
    return None


@pytest.fixture(scope="module")
def postgres() -> str:
    """`postgresql://postgres@127.0.0.1:<port>/postgres` of a throwaway cluster (trust auth, no fsync).
    As root it runs as `nobody`: initdb refuses root. First of the fixtures, so that a skip starts nothing."""
    if (reason := missing()) is not None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{reason}; CI must install it before the tests")
        pytest.skip(f"{reason}; with CI set this is a failure")
    bin_dir = Path(INITDB).parent
    base = Path(tempfile.mkdtemp(prefix="ijepa-pg-"))  # not under pytest's 0700 root-owned tmp: nobody reads it
    as_user = []
    if os.geteuid() == 0:
        shutil.chown(base, "nobody")
        as_user = ["runuser", "-u", "nobody", "--"]
    data, port = base / "data", free_port()

    def pg(*args):
        return subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=120)

    try:
        done = pg(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync")
        assert done.returncode == 0, done.stderr
        done = pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w", "start", "-o",
                  f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off")
        assert done.returncode == 0, done.stderr + (base / "log").read_text()
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if data.is_dir():
            pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


class MlflowServer:
    """`mlflow server` on PostgreSQL with artifacts proxied to s3://mlflow/artifacts; stop() and start()
    again keep everything (the stores outlive it)."""

    def __init__(self, backend: str, s3_endpoint: str, log: Path):
        self.backend, self.s3_endpoint, self.log = backend, s3_endpoint, log
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> float:
        """Returns the seconds until /health answered."""
        env = {**os.environ, **KEYS, "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
               "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
            env.pop(k, None)
        t0 = time.time()
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", self.backend,
                 "--artifacts-destination", f"s3://{BUCKET}/artifacts", "--host", "127.0.0.1",
                 "--port", str(self.port), "--workers", "1"],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def healthy():
            assert self.proc.poll() is None, f"mlflow server exited: {self.log.read_text()[-3000:]}"
            try:
                return urllib.request.urlopen(self.uri + "/health", timeout=2).read() == b"OK"
            except OSError:
                return False

        assert wait_for(healthy, timeout=180, every=0.5), f"mlflow server not up: {self.log.read_text()[-3000:]}"
        return time.time() - t0

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture(scope="module")
def server(postgres, s3_endpoint, tmp_path_factory):
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint, **{k.lower(): v for k, v in KEYS.items() if "KEY" in k},
                 region_name=KEYS["AWS_DEFAULT_REGION"]).create_bucket(Bucket=BUCKET)
    srv = MlflowServer(postgres, s3_endpoint, tmp_path_factory.mktemp("mlflow-server") / "server.log")
    srv.started_in = srv.start()
    yield srv
    srv.stop()


def server_cfg(tiny_cfg, srv, **over):
    """tiny_cfg logging into the server, in an experiment (and registered model) of its own, system metrics
    on; 96 random images for pretraining (12 steps of 16)."""
    name = f"server-{uuid.uuid4().hex[:8]}"
    return tiny_cfg.replace(**{"mlflow.tracking_uri": srv.uri, "mlflow.experiment": name,
                               "mlflow.registered_model": name, "mlflow.system_metrics": True, **FAST, **over})


IMAGES = functools.partial(RandomImages, 96, 32)


def s3_keys(srv) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=srv.s3_endpoint, aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="artifacts/")
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_pretrain_and_evaluation_log_into_postgres_and_s3(server, tiny_cfg, eval_data, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # before Ray starts: workers inherit it
    cfg = server_cfg(tiny_cfg, server, **{"data.root": str(eval_data), "mlflow.register_model": True})
    metrics = pretrain.run(cfg, tmp_path, dataset_fn=IMAGES)
    assert metrics["retrained"] and metrics["steps"] == 12
    evaluated = linear.run(cfg, tmp_path)

    client = MlflowClient(server.uri)
    run_id = metrics["mlflow_run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert run.data.params["pretrain.batch_size"] == "16" and run.data.tags["params_hash"] == cfg.hash()
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(1, 13))  # rank 0, each step
    assert "rankme" in run.data.metrics and "final_loss" in run.data.metrics
    # System metrics: each Ray node (one here) under its node id; the waiting driver samples nothing.
    assert "system/node0/cpu_utilization_percentage" in run.data.metrics
    assert {k.split("/")[1] for k in run.data.metrics if k.startswith("system/")} == {"node0"}
    assert run.data.tags["system_metrics.node0"] == socket.gethostname()

    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    assert [c.info.run_name for c in children] == ["eval_linear"]
    child = children[0]
    assert child.info.status == "FINISHED"
    expected = {k: v for k, v in flatten(evaluated).items() if isinstance(v, int | float) and v == v}
    assert expected and {k: child.data.metrics[k] for k in expected} == pytest.approx(expected)

    # Artifacts come back through the server's proxy, from the S3 bucket.
    assert {"encoder", "params.yaml", "pretrain_curve.csv"} <= {a.path for a in client.list_artifacts(run_id)}
    got = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="params.yaml",
                                                   dst_path=str(tmp_path / "dl"), tracking_uri=server.uri))
    assert yaml.safe_load(got.read_text())["mlflow"]["experiment"] == cfg.mlflow.experiment
    got = Path(mlflow.artifacts.download_artifacts(run_id=child.info.run_id, artifact_path="eval_linear.json",
                                                   dst_path=str(tmp_path / "dl"), tracking_uri=server.uri))
    assert json.loads(got.read_text()) == json.loads((tmp_path / "metrics" / "eval_linear.json").read_text())
    keys = s3_keys(server)
    assert any(run_id in k and k.endswith("params.yaml") for k in keys)
    assert any(child.info.run_id in k and k.endswith("eval_linear.json") for k in keys)

    # The registered encoder, loaded by alias from the server (registry in PostgreSQL, weights in S3).
    mlflow.set_tracking_uri(server.uri)
    version = client.get_model_version_by_alias(cfg.mlflow.registered_model, tracking.MODEL_ALIAS)
    assert version.run_id == run_id
    loaded = mlflow.pytorch.load_model(f"models:/{cfg.mlflow.registered_model}@{tracking.MODEL_ALIAS}")
    x = torch.randn(2, 3, cfg.data.image_size, cfg.data.image_size)
    torch.testing.assert_close(loaded(x), load_encoder(Path(cfg.pretrain.out_dir) / "encoder")(x))

    # And the runs are rows of the PostgreSQL cluster.
    import psycopg

    with psycopg.connect(server.backend) as con:
        names = {r[0] for r in con.execute("select name from runs where experiment_id = %s",
                                           (int(run.info.experiment_id),))}
    assert names == {"pretrain", "eval_linear"}


def test_server_gone_mid_run_training_finishes_and_a_rerun_logs_the_rest(server, tiny_cfg, tmp_path, capfd):
    cfg = server_cfg(tiny_cfg, server, **{"pretrain.epochs": 3})  # 18 steps
    steps = list(range(1, 19))
    client = MlflowClient(server.uri)
    state_file = Path(cfg.ray.storage_path) / pretrain.run_name(cfg) / ray_train.STATE_FILE
    stopped_after: list[int] = []

    def stop_server_after_step_2():
        def logged():
            if not state_file.is_file():
                return None
            return client.get_metric_history(json.loads(state_file.read_text())["mlflow_run_id"], "loss")

        if wait_for(lambda: len(logged() or []) >= 2, timeout=300):
            stopped_after.append(len(logged()))
            server.stop()

    stopper = threading.Thread(target=stop_server_after_step_2, daemon=True)
    stopper.start()
    try:
        with pytest.raises(PipelineError) as err:
            pretrain.run(cfg, tmp_path, dataset_fn=IMAGES)
        stopper.join(timeout=10)
        assert stopped_after and stopped_after[0] < len(steps), "the server was not stopped during training"
        # Training finished, the local outputs are written, and the one-line error names the server.
        msg = str(err.value)
        assert "\n" not in msg and server.uri in msg and "rerun the stage" in msg
        state = json.loads(state_file.read_text())
        assert state["status"] == "finished" and state["summary"]["finished"]
        assert json.loads((tmp_path / pretrain.METRICS_JSON).read_text())["steps"] == len(steps)
        assert (Path(cfg.pretrain.out_dir) / "encoder").is_dir()
        unsent = state_file.parent / tracking.UNSENT_FILE
        kept = [json.loads(line) for line in unsent.read_text().splitlines()]
        kept_steps = {r["step"] for r in kept if "loss" in r.get("metrics", {})}
        assert len(steps) in kept_steps and f"{len(kept)} metric batches wait in {unsent}" in msg
        # One line for the run, not one per step (Ray Train echoes a worker's print on both of the driver's
        # streams: once in each).
        out = capfd.readouterr()
        warnings = [[line for line in o.splitlines() if "warning: MLflow" in line] for o in (out.out, out.err)]
        assert max(len(w) for w in warnings) == 1 and "training goes on" in (warnings[0] + warnings[1])[0], warnings
    finally:
        if server.proc.poll() is not None:
            server.start()

    # Back up: the same run reopened, not trained again; the kept batches replayed, the outputs logged.
    on_server = {m.step for m in client.get_metric_history(state["mlflow_run_id"], "loss")}
    assert on_server | kept_steps == set(steps)
    again = pretrain.run(cfg, tmp_path, dataset_fn=IMAGES)
    assert not again["retrained"] and again["mlflow_run_id"] == state["mlflow_run_id"]
    assert not unsent.exists()
    run = client.get_run(state["mlflow_run_id"])
    assert run.info.status == "FINISHED" and "final_loss" in run.data.metrics
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == steps  # each step once
    assert {"encoder", "params.yaml"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
