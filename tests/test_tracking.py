"""MLflow tracking against an embedded SQLite store in tmp_path; a server gone mid-run (unsent metrics kept)."""

import json
import time

import mlflow
import pytest
from conftest import free_port

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


def test_run_logger_keeps_what_a_gone_server_did_not_take_and_replay_sends_it(tiny_cfg, tmp_path, capsys):
    cfg = tiny_cfg.replace(**{"mlflow.system_metrics": False})
    with tracking.pipeline_run(cfg, "pretrain", root=tmp_path) as run:
        pass
    run_id, unsent = run.info.run_id, tmp_path / "ray_results" / "x" / tracking.UNSENT_FILE
    logger = tracking.RunLogger(f"http://127.0.0.1:{free_port()}", run_id, unsent, recheck_s=3600)
    t0 = time.monotonic()
    for step in range(1, 21):
        logger.log({"loss": 1.0 / step, "lr": 1e-3}, step)
    logger.tag("collapse", "step 7")
    logger.close()
    assert time.monotonic() - t0 < 15  # one round of retries, then straight to the file: training is not held up
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "from step 1 on" in warnings[0] and str(unsent) in warnings[0]
    lines = [json.loads(line) for line in unsent.read_text().splitlines()]
    assert [r["step"] for r in lines[:-1]] == list(range(1, 21)) and lines[-1]["tags"] == {"collapse": "step 7"}
    assert {r["run_id"] for r in lines} == {run_id} and tracking.count_unsent(unsent) == 21

    uri = tracking.tracking_uri(cfg.mlflow, tmp_path)
    assert tracking.replay_unsent(unsent, uri) == 21 and not unsent.exists()
    assert tracking.replay_unsent(unsent, uri) == 0  # nothing left: a second call is a no-op
    client = mlflow.MlflowClient(uri)
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(s, 1.0 / s) for s in range(1, 21)]
    assert client.get_run(run_id).data.tags["collapse"] == "step 7"


def test_run_logger_sends_again_once_the_store_answers(tiny_cfg, tmp_path):
    cfg = tiny_cfg.replace(**{"mlflow.system_metrics": False})
    with tracking.pipeline_run(cfg, "pretrain", root=tmp_path) as run:
        pass
    logger = tracking.RunLogger(tracking.tracking_uri(cfg.mlflow, tmp_path), run.info.run_id, tmp_path / "u.jsonl",
                                recheck_s=0.0)
    good = logger.client
    logger.client = mlflow.MlflowClient(f"http://127.0.0.1:{free_port()}")  # the server away for steps 1-2
    logger.log({"loss": 1.0}, 1)
    logger.log({"loss": 0.5}, 2)
    logger.client = good
    logger.log({"loss": 0.25}, 3)
    assert [json.loads(line)["step"] for line in (tmp_path / "u.jsonl").read_text().splitlines()] == [1, 2]
    assert [m.step for m in good.get_metric_history(run.info.run_id, "loss")] == [3]


def test_unsent_file_on_an_object_store(tiny_cfg, tmp_path, s3_bucket):
    """Ray storage on S3: the file is written whole (first at once, then at most every 30 s, and on close)."""
    cfg = tiny_cfg.replace(**{"mlflow.system_metrics": False})
    with tracking.pipeline_run(cfg, "pretrain", root=tmp_path) as run:
        pass
    unsent = f"{s3_bucket}/ray_results/pretrain-x/{tracking.UNSENT_FILE}"
    logger = tracking.RunLogger(f"http://127.0.0.1:{free_port()}", run.info.run_id, unsent, recheck_s=3600)
    for step in range(1, 6):
        logger.log({"loss": float(step)}, step)
    assert tracking.count_unsent(unsent) == 1  # the first batch at once, the rest within 30 s
    logger.close()
    assert tracking.count_unsent(unsent) == 5
    uri = tracking.tracking_uri(cfg.mlflow, tmp_path)
    assert tracking.replay_unsent(unsent, uri) == 5 and tracking.count_unsent(unsent) == 0
    assert [m.step for m in mlflow.MlflowClient(uri).get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4, 5]
