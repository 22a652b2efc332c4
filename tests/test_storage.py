"""Run storage on an object store (pipeline.storage, pipeline.pretrain, pipeline.ray_tune), against a real
S3-compatible server (moto_server on 127.0.0.1, fixture `s3_bucket`): the helpers on s3:// and on a local folder,
a missing bucket as one line before Ray starts; slow: a pretrain whose checkpoints and state live only in the bucket
(re-exported from there), the driver killed mid-run and the rerun resuming from the bucket."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import ray
import torch
import yaml
from test_launch import SCRIPT, check_outputs, images, tiny, wait_for  # the local-storage twins of these tests

from pipeline import pretrain, ray_train, ray_tune, storage
from pipeline.errors import PipelineError
from pipeline.models.io import load_encoder

ROOT = Path(__file__).resolve().parents[1]


def listing(uri):
    """{path under `uri`: size} of every object below it."""
    fs, base = pafs.FileSystem.from_uri(uri)
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return {i.path[len(base) + 1:]: i.size for i in infos if i.type == pafs.FileType.File}


@pytest.mark.parametrize("where", ["s3", "local"])
def test_text_files_folders_and_downloads(where, request, tmp_path):
    base = request.getfixturevalue("s3_bucket") + "/runs" if where == "s3" else storage.resolve(tmp_path, "runs")
    f = storage.join(base, "run", "state.json")
    assert storage.read_text(f) is None and not storage.is_dir(storage.join(base, "run"))
    storage.write_text(f, '{"a": 1}\n')
    storage.write_text(storage.join(base, "run", "ckpt", "model.pt"), "weights")
    assert storage.read_text(f) == '{"a": 1}\n'
    assert storage.is_dir(storage.join(base, "run")) and not storage.is_dir(f) and not storage.is_dir("")
    with storage.local_dir(storage.join(base, "run")) as d:
        assert (d / "ckpt" / "model.pt").read_text() == "weights" and (d / "state.json").is_file()
    storage.delete(f)
    storage.delete(f)  # nothing there: no error
    assert storage.read_text(f) is None
    assert storage.problem(base) is None
    if where == "s3":
        assert set(listing(base)) == {"run/ckpt/model.pt"}  # really in the bucket
        assert storage.problem("s3://no-such-bucket-here/x") == "there is no bucket 'no-such-bucket-here'"


def test_resolve_keeps_uris_and_anchors_local_paths(tmp_path):
    assert storage.resolve(tmp_path, "s3://b/p/") == "s3://b/p"
    assert storage.resolve(tmp_path, "ray_results") == str(tmp_path.resolve() / "ray_results")
    assert storage.join("s3://b/p", "run", "x.json") == "s3://b/p/run/x.json"
    assert storage.scheme("gs://b") == "gs" and storage.scheme("/a/b") is None


# ------------------------------------------------------------------------------------------- pretrain


@pytest.fixture
def ray_fresh():
    """A local Ray started inside the test, so its workers inherit the test's AWS_* variables."""
    ray.shutdown()
    yield
    ray.shutdown()


def tiny_s3(tiny_cfg, bucket, **over):
    return tiny(tiny_cfg, **{"ray.storage_path": f"{bucket}/ray_results", **over})


@pytest.mark.slow  # ~50 s on 2 cores, most of it Ray's start and its controller's teardown
def test_pretrain_checkpoints_to_s3_and_exports_from_there(tiny_cfg, s3_bucket, ray_fresh, tmp_path):
    cfg = tiny_s3(tiny_cfg, s3_bucket, **{"pretrain.epochs": 1})  # 6 steps, a checkpoint every 2
    metrics = pretrain.run(cfg, tmp_path, dataset_fn=images())
    assert metrics["retrained"]
    check_outputs(cfg, tmp_path, metrics, steps=6)
    assert not (tmp_path / "ray_results").exists()

    run = f"{s3_bucket}/ray_results/{pretrain.run_name(cfg)}"
    objects = listing(run)
    assert {ray_train.STATE_FILE, f"{ray_train.PID_DIR}/rank-0.pid", f"{ray_train.PID_DIR}/rank-1.pid"} <= set(objects)
    kept = {p.split("/")[0] for p in objects if p.startswith("checkpoint_") and "/" in p}
    assert len(kept) == cfg.pretrain.num_to_keep
    state = json.loads(storage.read_text(f"{run}/{ray_train.STATE_FILE}"))
    assert state["status"] == "finished" and state["checkpoint"].startswith(f"{run}/checkpoint_")

    # Finished: not retrained; the encoder is exported again from the checkpoint in the bucket.
    encoder_dir = Path(cfg.pretrain.out_dir) / "encoder"
    x = torch.randn(2, 3, 32, 32)
    before = load_encoder(encoder_dir)(x)
    for f in encoder_dir.iterdir():
        f.unlink()
    again = pretrain.run(cfg, tmp_path, dataset_fn=images())
    assert not again["retrained"] and again["mlflow_run_id"] == metrics["mlflow_run_id"] and again["steps"] == 6
    torch.testing.assert_close(load_encoder(encoder_dir)(x), before)


def test_a_missing_bucket_is_one_line_before_ray_starts(tiny_cfg, s3_bucket, ray_fresh, tmp_path):
    cfg = tiny_s3(tiny_cfg, "s3://no-such-bucket-here")
    with pytest.raises(PipelineError) as err:
        pretrain.run(cfg, tmp_path, dataset_fn=images())
    assert str(err.value) == ("ray.storage_path = 's3://no-such-bucket-here/ray_results': there is no bucket "
                              "'no-such-bucket-here'; create the bucket or set AWS_ENDPOINT_URL / "
                              "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")
    assert not ray.is_initialized()


@pytest.mark.slow
def test_rerun_after_the_driver_was_killed_resumes_from_s3(tiny_cfg, s3_bucket, ray_fresh, tmp_path):
    cfg = tiny_s3(tiny_cfg, s3_bucket, **{"pretrain.epochs": 4})  # 24 steps
    run = f"{s3_bucket}/ray_results/{pretrain.run_name(cfg)}"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict(), default=list))))
    # The driver (and the local Ray it starts) inherits the AWS_* variables that point at the server.
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(params), str(tmp_path)], cwd=ROOT,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Ray restores what its snapshot registers: kill once it names a checkpoint.
    registered = lambda: json.loads(storage.read_text(f"{run}/checkpoint_manager_snapshot.json") or "{}").get(  # noqa: E731
        "checkpoint_results")
    try:
        assert wait_for(lambda: registered() or proc.poll() is not None, timeout=400)
        assert proc.poll() is None, "the driver ended before it was killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait()
    state = json.loads(storage.read_text(f"{run}/{ray_train.STATE_FILE}"))
    assert state["status"] == "running"

    metrics = pretrain.run(cfg, tmp_path, dataset_fn=images())
    assert metrics["resumed_from_step"] > 0 and metrics["mlflow_run_id"] == state["mlflow_run_id"]
    check_outputs(cfg, tmp_path, metrics, steps=24)  # every step exactly once in the history
    assert not (tmp_path / "ray_results").exists()


@pytest.mark.slow
def test_sweep_keeps_its_trials_in_s3(tiny_cfg, s3_bucket, ray_fresh, tmp_path):
    import pandas as pd
    from test_sweep import on_ray, run_sweep

    from pipeline import sweep
    from pipeline.data import export_synthetic

    cfg = on_ray(tiny_cfg, tmp_path / "data", **{"ray.storage_path": f"{s3_bucket}/ray_results",
                                                 "data.synthetic.val_scenes": 32, "data.synthetic.processes": 1})
    export_synthetic(cfg.data, tmp_path / "data", progress=False)
    summary = run_sweep(cfg, tmp_path)
    assert len(pd.read_csv(tmp_path / sweep.CSV)) == 2 and not (tmp_path / "ray_results").exists()
    exp = f"{s3_bucket}/ray_results/{sweep.sweep_name(cfg)}"
    state = json.loads(storage.read_text(f"{exp}/{ray_train.STATE_FILE}"))
    assert state["status"] == "finished" and state["mlflow_run_id"] == summary["mlflow_run_id"]
    ids = {t["trial_id"]: t["mlflow_run_id"] for t in state["trials"]}
    assert len(ids) == 2 and all(ids.values())  # each read back from trials/<id>/ in the bucket
    assert {f"trials/{t}/{ray_tune.TRIAL_RUN_ID}" for t in ids} <= set(listing(exp))
