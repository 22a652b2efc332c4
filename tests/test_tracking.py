"""MLflow tracking against an embedded SQLite store in tmp_path."""

import mlflow
import pytest

from pipeline import tracking
from pipeline.errors import PipelineError


def test_run_with_params_tags_metrics_and_child(tiny_cfg, tmp_path):
    with tracking.pipeline_run(tiny_cfg.replace(**{"mlflow.system_metrics": False}), "pretrain",
                               root=tmp_path) as run:
        tracking.log_metrics({"loss": 0.5}, step=1)
        tracking.log_metrics({"loss": 0.25}, step=2)
    run_id = run.info.run_id
    tracking.write_run_id(run_id, tmp_path / "models/run_id.txt")
    assert tracking.read_run_id(tmp_path / "models/run_id.txt") == run_id

    with tracking.child_run(run_id, "eval_linear", {"feature_view": "last"}):
        tracking.log_metrics({"top1": 0.9})

    got = mlflow.get_run(run_id)
    assert got.data.params["mask.pred_scale"] == "(0.15, 0.2)"
    assert got.data.tags["params_hash"] == tiny_cfg.replace(**{"mlflow.system_metrics": False}).hash()
    assert got.data.tags["git_commit"]
    hist = mlflow.MlflowClient().get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in hist] == [(1, 0.5), (2, 0.25)]
    children = mlflow.search_runs(experiment_ids=[got.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
    assert len(children) == 1 and children.iloc[0]["metrics.top1"] == 0.9
    assert got.info.status == "FINISHED"


def test_child_run_leaves_a_running_parent_running(tiny_cfg, tmp_path):
    """A sweep trial opens its child run while the sweep's driver still holds the parent open."""
    cfg = tiny_cfg.replace(**{"mlflow.system_metrics": False})
    tracking.connect(cfg.mlflow, tmp_path)
    exp = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
    parent = mlflow.MlflowClient().create_run(exp.experiment_id, run_name="sweep").info.run_id  # RUNNING
    with tracking.child_run(parent, "trial", {"mask.strategy": "random"}) as child:
        tracking.log_metrics({"probe_top1": 20.0}, step=1)
    assert mlflow.get_run(parent).info.status == "RUNNING"
    got = mlflow.get_run(child.info.run_id)
    assert got.info.status == "FINISHED" and got.data.tags["mlflow.parentRunId"] == parent
    assert got.data.params["mask.strategy"] == "random" and mlflow.active_run() is None


def test_default_store_is_sqlite_in_root(demo_cfg, tmp_path):
    assert tracking.tracking_uri(demo_cfg.mlflow, tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"


def test_unreachable_server_is_one_line_error(tiny_cfg):
    cfg = tiny_cfg.replace(**{"mlflow.tracking_uri": "http://127.0.0.1:9"})
    with pytest.raises(PipelineError) as err:
        tracking.connect(cfg.mlflow)
    assert "127.0.0.1:9" in str(err.value) and "\n" not in str(err.value)


def test_missing_run_id_file(tmp_path):
    with pytest.raises(PipelineError, match="run the pretrain stage first"):
        tracking.read_run_id(tmp_path / "nope.txt")
