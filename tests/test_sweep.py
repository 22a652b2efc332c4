"""The masking sweep (pipeline.sweep + pipeline.ray_tune, scored by evals.sweep_score): search space, trial configs,
per-epoch probe score,
result table and outputs, one-line rejections before any trial; slow: a 2-trial sweep end to end on Ray with
MLflow parent/child runs, a finished sweep read back, and resume after the driver was killed."""

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch.utils.data import TensorDataset

from evals.report import to_markdown
from evals.sweep_score import ProbeScore, probe_score
from pipeline import sweep
from pipeline.config import ConfigError, from_dict
from pipeline.data.random_images import RandomImages
from pipeline.errors import PipelineError
from pipeline.models.ijepa import build_ijepa
from pipeline.train import train_worker

ROOT = Path(__file__).resolve().parents[1]


def tiny(cfg, **over):
    return cfg.replace(**{"data.num_workers": 0, "mlflow.system_metrics": False, "eval_semi.epochs": 5,
                          "tune.pred_scale": [[0.15, 0.2], [0.075, 0.2]], "tune.strategy": ["multiblock"],
                          "tune.epochs": 2, "tune.num_samples": 1, **over})  # 2 trials, whatever params.yaml says


def labelled(n_train=16, n_val=16, size=32, classes=4, seed=0):
    """(train, val) TensorDatasets whose classes differ in mean colour: a probe can learn them."""
    g = torch.Generator().manual_seed(seed)

    def make(n):
        y = torch.arange(n) % classes
        x = torch.randn(n, 3, size, size, generator=g) * 0.5 + (y.float() / classes)[:, None, None, None]
        return TensorDataset(x, y)

    return make(n_train), make(n_val)


def run_sweep(cfg, root):
    """What the sweep stage runs: the 1% probe score on the configured data, the report's table format."""
    return sweep.run(cfg, root, probe_score(cfg, root), to_markdown)


# ------------------------------------------------------------------------------------- space and trials


def test_grid_and_random_trial_counts(tiny_cfg):
    cfg = tiny(tiny_cfg, **{"tune.strategy": ["multiblock", "random"], "tune.num_samples": 2})
    assert sweep.search_axes(cfg.tune, 0)["pred_scale"] == [[0.15, 0.2], [0.075, 0.2]]
    assert sweep.search_axes(cfg.tune, 0)["reg"] == ["vicreg"]  # the demo's own regulariser unless asked
    assert sweep.num_trials(cfg.tune) == 2 * 2 * 2  # pred_scale x strategy x repeats
    regs = cfg.replace(**{"tune.reg": ["none", "vicreg", "sigreg"]}).tune
    assert sweep.search_axes(regs, 0)["reg"] == ["none", "vicreg", "sigreg"] and sweep.num_trials(regs) == 2 * 2 * 3 * 2
    random = cfg.replace(**{"tune.search": "random", "tune.num_samples": 3}).tune
    assert sweep.num_trials(random) == 3


def test_grid_repeats_are_pretraining_seeds(tiny_cfg):
    """The same setting at the same seed trains the same trial again: a grid's repeats differ in the seed."""
    cfg = tiny(tiny_cfg, **{"tune.num_samples": 3})
    assert sweep.search_axes(cfg.tune, 5)["seed"] == [5, 6, 7]
    assert sweep.search_axes(cfg.replace(**{"tune.num_samples": 1}).tune, 5)["seed"] == [5]
    assert sweep.search_axes(cfg.replace(**{"tune.search": "random"}).tune, 5)["seed"] == [5]  # draws differ anyway
    params = {"strategy": "random", "num_targets": 4, "pred_scale": [0.15, 0.2], "enc_scale": [0.85, 1.0], "seed": 6}
    assert sweep.trial_config(cfg, params).pretrain.seed == 6
    assert sweep.trial_label(params) == "random M4 tgt 0.15-0.2 ctx 0.85-1 seed 6"


def test_trial_config_sets_mask_budget_and_worker_share(tiny_cfg):
    cfg = tiny(tiny_cfg, **{"ray.num_workers": 2, "tune.resources_per_trial": {"CPU": 1}, "tune.epochs": 3})
    params = {"strategy": "random", "num_targets": 2, "pred_scale": [0.1, 0.2], "enc_scale": [0.65, 1.0]}
    t = sweep.trial_config(cfg, params)
    assert (t.mask.strategy, t.mask.num_targets, t.mask.pred_scale, t.mask.enc_scale) == \
        ("random", 2, (0.1, 0.2), (0.65, 1.0))
    assert t.mask.pred_aspect == cfg.mask.pred_aspect  # keys outside the space stay
    assert t.pretrain.epochs == 3 and t.ray.resources_per_worker == {"CPU": 0.5} and not t.ray.use_gpu
    assert t.optim.reg == "vicreg" and t.optim == cfg.optim  # no reg axis in the params: the config's own
    r = sweep.trial_config(cfg.replace(**{"optim.reg_weight": 0.5}), {**params, "reg": "sigreg"})
    assert (r.optim.reg, r.optim.reg_weight, r.mask.strategy) == ("sigreg", 0.5, "random")
    assert sweep.trial_label({**params, "reg": "sigreg"}) == "random M2 tgt 0.1-0.2 ctx 0.65-1 sigreg"
    assert sweep.trial_label({**params, "reg": "none"}) == "random M2 tgt 0.1-0.2 ctx 0.65-1"
    gpu = sweep.trial_config(cfg.replace(**{"tune.resources_per_trial": {"CPU": 2, "GPU": 1}}), params)
    assert gpu.ray.resources_per_worker == {"CPU": 1.0, "GPU": 0.5} and gpu.ray.use_gpu
    assert sweep.trial_label(params) == "random M2 tgt 0.1-0.2 ctx 0.65-1"
    with pytest.raises(PipelineError, match="epochs"):
        sweep.trial_config(cfg, {**params, "epochs": 1})


def test_sweep_name_follows_tune_and_training_sections(tiny_cfg):
    cfg = tiny(tiny_cfg)
    name = sweep.sweep_name(cfg)
    assert sweep.sweep_name(cfg.replace(**{"mlflow.experiment": "x", "ray.address": "h:1"})) == name
    assert sweep.sweep_name(cfg.replace(**{"tune.epochs": 3})) != name
    assert sweep.sweep_name(cfg.replace(**{"optim.lr": 0.002})) != name


@pytest.mark.parametrize("tune, where", [
    ({"pred_scale": []}, "tune.pred_scale"),
    ({"strategy": []}, "tune.strategy"),
    ({"reg": []}, "tune.reg"),
    ({"reg": ["vicreg", "simclr"]}, "tune.reg"),
    ({"enc_scale": [[0.9, 0.4]]}, "tune.enc_scale[0]"),  # min > max
    ({"pred_scale": [[0.1, 1.5]]}, "tune.pred_scale[0]"),  # outside (0, 1]
    ({"pred_scale": [[0.0, 0.2]]}, "tune.pred_scale[0]"),
])
def test_bad_space_is_one_line_naming_the_key(tune, where):
    with pytest.raises(ConfigError) as e:
        from_dict({"preset": "demo", "tune": tune})
    assert where in str(e.value) and "\n" not in str(e.value)


def test_too_many_cpus_per_trial_is_one_line_and_concurrency_fits_the_cluster(tiny_cfg):
    cfg = tiny(tiny_cfg, **{"tune.resources_per_trial": {"CPU": 4}})
    with pytest.raises(PipelineError) as e:
        sweep.check_resources(cfg, {"CPU": 2.0})
    assert "tune.resources_per_trial.CPU = 4" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(PipelineError, match="GPU"):
        sweep.check_resources(cfg.replace(**{"tune.resources_per_trial": {"CPU": 1, "GPU": 1}}), {"CPU": 2.0})
    ok = cfg.replace(**{"tune.resources_per_trial": {"CPU": 1}, "tune.max_concurrent_trials": 4})
    assert sweep.check_resources(ok, {"CPU": 2.0}) == 1  # 2 x (1 + driver) does not fit in 2 CPUs
    assert sweep.check_resources(ok, {"CPU": 8.0}) == 4
    assert sweep.check_resources(ok.replace(**{"tune.max_concurrent_trials": 2}), {"CPU": 64.0}) == 2


def test_grace_longer_than_budget_fails_before_anything(tiny_cfg, tmp_path):
    cfg = tiny(tiny_cfg, **{"tune.asha_grace_epochs": 3})
    with pytest.raises(PipelineError, match="asha_grace_epochs = 3"):
        sweep.run(cfg, tmp_path, ProbeScore(cfg, labelled), to_markdown,
                  dataset_fn=functools.partial(RandomImages, 32, 32))
    assert not (tmp_path / "reports").exists()


# ------------------------------------------------------------------------------------------- the score


def test_probe_score_joins_epoch_reports_without_changing_training(tiny_cfg):
    cfg = tiny(tiny_cfg)
    data = RandomImages(16, 32)  # 1 step per epoch

    def run(epoch_end):
        reports = []
        train_worker(cfg, data, lambda m, d: reports.append(dict(m)), max_epochs=2, epoch_end=epoch_end)
        return [r for r in reports if "epoch" in r]

    plain = run(None)
    scored = run(ProbeScore(cfg, labelled))
    assert [r["epoch"] for r in scored] == [1, 2]
    for r in scored:
        assert 0 <= r[sweep.SCORE] <= 100 and 0 <= r["probe_top5"] <= 100 and r["val_rankme"] >= 1
    # The probe runs on a forked RNG and reads the target encoder only: training is unchanged.
    assert [r["epoch_loss"] for r in scored] == [r["epoch_loss"] for r in plain]
    # Every epoch's report carries the seeded init's score: the untrained model's, not a trained epoch's.
    torch.manual_seed(cfg.pretrain.seed)
    untrained = ProbeScore(cfg, labelled)(build_ijepa(cfg), 0)
    for r in scored:
        assert {k: r[sweep.INIT + k] for k in sweep.SCORE_KEYS} == untrained
    assert scored[-1]["val_rankme"] != untrained["val_rankme"]
    assert not any(k.startswith(sweep.INIT) for r in plain for k in r)  # no score, no init figures


def test_probe_score_standard_error_and_check_leave_the_shipped_copy_empty(tiny_cfg):
    cfg = tiny(tiny_cfg)
    score = ProbeScore(cfg, functools.partial(labelled, n_val=25))
    score.check()
    assert score._data is None  # the score travels to every Ray worker: no datasets inside
    torch.manual_seed(0)
    model = build_ijepa(cfg)
    ref = score(model, 0)
    p = ref[sweep.SCORE] / 100
    assert ref[sweep.SCORE + "_se"] == pytest.approx(100 * (p * (1 - p) / 25) ** 0.5)
    assert set(ref) == set(sweep.SCORE_KEYS)
    assert score(model, 0) == ref  # deterministic: every trial of a seed reads the same init level


def test_references_come_from_each_seeds_first_trial_that_scored_its_init():
    def with_init(rec, level):
        for h in rec["history"]:
            h.update({sweep.INIT + sweep.SCORE: level, sweep.INIT + sweep.SCORE + "_se": 1.5,
                      sweep.INIT + "probe_top5": 50.0, sweep.INIT + "val_rankme": 2.0})
        return rec

    trials = [with_init(record("b", "random", [0.15, 0.2], [25.0], seed=0), 18.0),
              with_init(record("a", "multiblock", [0.15, 0.2], [30.0], seed=0), 17.0),
              record("c", "multiblock", [0.15, 0.2], [], error="boom", seed=1),  # failed before any epoch
              with_init(record("d", "random", [0.15, 0.2], [20.0], seed=2), 16.0),
              with_init(record("e", "random", [0.15, 0.2], [20.0]), 15.0)]  # from before the seed axis
    refs = sweep.references_from_trials(trials)
    assert refs == {0: {sweep.SCORE: 17.0, sweep.SCORE + "_se": 1.5, "probe_top5": 50.0, "val_rankme": 2.0},
                    2: {sweep.SCORE: 16.0, sweep.SCORE + "_se": 1.5, "probe_top5": 50.0, "val_rankme": 2.0}}
    df = sweep.results_table(trials, epochs=1, references=refs).set_index("trial")
    assert df.loc["a", "margin"] == 13.0 and df.loc["b", "margin"] == 8.0 and df.loc["d", "margin"] == 4.0  # its seed's
    assert pd.isna(df.loc["c", "margin"]) and pd.isna(df.loc["e", "margin"])
    assert sweep.references_from_trials([record("x", "random", [0.15, 0.2], [20.0], seed=0)]) == {}


# ------------------------------------------------------------------------------------------ the table


def record(tid, strategy, pred, scores, stopped_at=None, error=None, reg=None, seed=None):
    hist = [{"epoch": e + 1, sweep.SCORE: s, sweep.SCORE + "_se": 2.0 + e, "probe_top5": 90.0, "val_rankme": 5.0,
             "rankme": 4.0, "epoch_loss": 0.3} for e, s in enumerate(scores[:stopped_at])]
    params = {"strategy": strategy, "num_targets": 4, "pred_scale": pred, "enc_scale": [0.85, 1.0]}
    if reg is not None:  # records of sweeps from before the reg axis have none
        params["reg"] = reg
    if seed is not None:  # nor of the seed axis
        params["seed"] = seed
    return {"trial_id": tid, "params": params, "history": hist, "error": error, "mlflow_run_id": f"run{tid}"}


def test_table_sorted_one_row_per_trial_with_early_stops(tiny_cfg, tmp_path):
    trials = [record("a", "multiblock", [0.15, 0.2], [20.0, 30.0]),
              record("b", "random", [0.15, 0.2], [25.0, 0.0], stopped_at=1),
              record("c", "multiblock", [0.075, 0.2], [40.0, 35.0], reg="vicreg"),
              record("d", "random", [0.075, 0.2], [], error="RuntimeError: boom")]
    df = sweep.results_table(trials, epochs=2)
    assert df["trial"].tolist() == ["c", "a", "b", "d"]  # last-epoch score, failed (NaN) last
    c = df.iloc[0]
    assert (c[sweep.SCORE], c["best_" + sweep.SCORE], c["epochs"], c["pred_scale"]) == (35.0, 40.0, 2, "(0.075, 0.2)")
    assert df.set_index("trial")["stopped_early"].to_dict() == {"c": False, "a": False, "b": True, "d": True}
    assert df.set_index("trial").loc["d", "error"] == "RuntimeError: boom"
    assert df.set_index("trial")["reg"].to_dict() == {"c": "vicreg", "a": "none", "b": "none", "d": "none"}

    cfg = tiny(tiny_cfg)
    out = sweep.write_outputs(cfg, tmp_path, trials, (4, 4), to_markdown)
    for rel in (sweep.CSV, sweep.MARKDOWN, sweep.PLOT, sweep.MASKS, sweep.METRICS_JSON):
        assert (tmp_path / rel).is_file() and (tmp_path / rel).stat().st_size > 0, rel
    back = pd.read_csv(tmp_path / sweep.CSV)
    assert back["trial"].tolist() == ["c", "a", "b", "d"]
    md = (tmp_path / sweep.MARKDOWN).read_text().splitlines()
    trial_table = md[:md.index("## Over pretraining seeds")]
    assert md[4].startswith("| trial | strategy |") and len([ln for ln in trial_table if ln.startswith("| ")]) == 5
    best = json.loads((tmp_path / sweep.METRICS_JSON).read_text())
    assert best["best"]["trial"] == "c" and best["best_by_strategy"] == {"multiblock": 35.0, "random": 25.0}
    assert best["best_by_reg"] == {"none": 30.0, "vicreg": 35.0}
    assert best["trials"] == 4 and best["stopped_early"] == 2
    assert out["summary"] == best


def test_margins_over_each_seeds_random_init_and_the_spread_over_seeds_reach_every_output(tiny_cfg, tmp_path):
    trials = [record("a", "multiblock", [0.15, 0.2], [20.0, 30.0], seed=0),
              record("b", "random", [0.15, 0.2], [25.0, 22.0], seed=0),
              record("c", "multiblock", [0.15, 0.2], [20.0, 26.0], seed=1),
              record("d", "random", [0.15, 0.2], [25.0, 20.0], seed=1)]
    refs = {0: {sweep.SCORE: 18.0, sweep.SCORE + "_se": 4.0, "probe_top5": 60.0, "val_rankme": 3.0},
            1: {sweep.SCORE: 16.0, sweep.SCORE + "_se": 4.0, "probe_top5": 60.0, "val_rankme": 3.0}}
    df = sweep.results_table(trials, epochs=2, references=refs).set_index("trial")
    assert df["margin"].to_dict() == {"a": 12.0, "b": 4.0, "c": 10.0, "d": 4.0}  # each against its own seed's
    assert df.loc["a", sweep.SCORE + "_se"] == 3.0  # the last epoch's
    assert df.loc["a", "margin_se"] == pytest.approx(5.0)  # 3 and 4 in quadrature
    settings = sweep.over_seeds(df.reset_index()).set_index("strategy")
    assert settings.loc["multiblock", "seeds"] == 2 and settings.loc["multiblock", sweep.SCORE + "_mean"] == 28.0
    assert settings.loc["multiblock", sweep.SCORE + "_std"] == pytest.approx(2 ** 0.5 * 2)  # 30, 26
    assert settings.loc["random", "margin_mean"] == 4.0 and settings.loc["random", "margin_std"] == 0.0
    out = sweep.write_outputs(tiny(tiny_cfg), tmp_path, trials, (4, 4), to_markdown, references=refs)
    best = json.loads((tmp_path / sweep.METRICS_JSON).read_text())
    assert best["random_init"] == {"0": refs[0], "1": refs[1]} and best == out["summary"]
    assert best["best_by_strategy"] == {"multiblock": 30.0, "random": 22.0}
    assert best["best_by_strategy_se"] == {"multiblock": 3.0, "random": 3.0}
    assert best["mean_by_strategy"]["multiblock"][sweep.SCORE + "_mean"] == 28.0
    assert best["mean_by_strategy"]["random"]["margin_mean"] == 4.0 and len(best["over_seeds"]) == 2
    md = (tmp_path / sweep.MARKDOWN).read_text()
    assert "18.00 +- 4.00 (seed 0), 16.00 +- 4.00 (seed 1)" in md and "| margin | margin_se |" in md
    assert "## Over pretraining seeds" in md and "| seeds |" in md
    assert pd.read_csv(tmp_path / sweep.CSV).set_index("trial").loc["c", "margin"] == 10.0
    old = sweep.results_table([record("e", "multiblock", [0.15, 0.2], [20.0, 30.0])], epochs=2, references=refs)
    assert pd.isna(old.loc[0, "seed"]) and pd.isna(old.loc[0, "margin"])  # a record from before the seed axis
    assert "margin" not in sweep.results_table(trials, epochs=2).columns  # no references, no margin


def test_empty_sweep_is_one_line():
    with pytest.raises(PipelineError, match="no trials"):
        sweep.results_table([], epochs=2)


# ------------------------------------------------------------------------------------ on Ray (slow)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """A tiny export of the synthetic scenes in the ImageNet format (96 train, 32 val, 8-image 1% list)."""
    from pipeline.config import load_config
    from pipeline.data import export_synthetic

    root = tmp_path_factory.mktemp("sweep_data")
    cfg = load_config(ROOT / "params.yaml").replace(**{
        "data.image_size": 32, "data.synthetic.train_scenes": 96, "data.synthetic.val_scenes": 32,
        "data.synthetic.processes": 1})
    export_synthetic(cfg.data, root, progress=False)
    return root


def on_ray(tiny_cfg, data_root, **over):
    """One worker of 1 CPU per trial, 6 steps an epoch, a checkpoint every 3 steps."""
    return tiny(tiny_cfg, **{"data.root": str(data_root), "data.synthetic.train_scenes": 96,
                             "ray.num_workers": 1, "pretrain.checkpoint_every": 3, **over})


def mlflow_runs(cfg):
    import mlflow

    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    return mlflow.search_runs(experiment_names=[cfg.mlflow.experiment], output_format="list")


@pytest.mark.slow
def test_two_trial_sweep_end_to_end_then_read_back(tiny_cfg, tiny_data, tmp_path):
    import ray

    cfg = on_ray(tiny_cfg, tiny_data)
    try:
        summary = run_sweep(cfg, tmp_path)
    finally:
        ray.shutdown()
    df = pd.read_csv(tmp_path / sweep.CSV)
    assert len(df) == 2 and sorted(df["pred_scale"]) == ["(0.075, 0.2)", "(0.15, 0.2)"]
    assert set(df["strategy"]) == {"multiblock"} and set(df["enc_scale"]) == {"(0.85, 1)"}
    assert (df["epochs"] == 2).all() or df["stopped_early"].any()
    assert df["margin"].notna().all()  # each trial's worker scored its own seeded init
    assert json.loads((tmp_path / sweep.METRICS_JSON).read_text())["random_init"].keys() == {str(cfg.pretrain.seed)}
    runs = mlflow_runs(cfg)
    parent = [r for r in runs if r.info.run_id == summary["mlflow_run_id"]]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == summary["mlflow_run_id"]]
    assert len(parent) == 1 and len(children) == 2
    assert {c.data.params["trial.pred_scale"] for c in children} == {"[0.15, 0.2]", "[0.075, 0.2]"}
    assert all(c.info.status == "FINISHED" for c in children)
    import mlflow

    for c in children:  # curves: the training loss per step and the probe score per epoch
        assert len(mlflow.MlflowClient().get_metric_history(c.info.run_id, sweep.SCORE)) >= 1
        assert len(mlflow.MlflowClient().get_metric_history(c.info.run_id, "loss")) >= 6
        assert mlflow.MlflowClient().get_metric_history(c.info.run_id, sweep.INIT + sweep.SCORE)
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(summary["mlflow_run_id"])}
    assert {"sweep.csv", "sweep.md", "sweep.png", "sweep_masks.png", "sweep.json"} <= artifacts

    # Finished: the same params only rewrite the outputs (no Ray, the same parent run).
    (tmp_path / sweep.CSV).unlink()
    again = run_sweep(cfg, tmp_path)
    assert again["mlflow_run_id"] == summary["mlflow_run_id"] and not ray.is_initialized()
    assert pd.read_csv(tmp_path / sweep.CSV)["trial"].tolist() == df["trial"].tolist()
    assert len(mlflow_runs(cfg)) == 3


SCRIPT = """
import sys
from evals.report import to_markdown
from evals.sweep_score import probe_score
from pipeline.config import load_config
from pipeline import sweep
cfg = load_config(sys.argv[1])
sweep.run(cfg, sys.argv[2], probe_score(cfg, sys.argv[2]), to_markdown)
"""


@pytest.mark.slow
def test_killed_sweep_resumes_without_rerunning_finished_trials(tiny_cfg, tiny_data, tmp_path):
    import yaml

    cfg = on_ray(tiny_cfg, tiny_data)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict(), default=list))))
    exp = Path(cfg.ray.storage_path) / sweep.sweep_name(cfg)
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, str(params), str(tmp_path)], cwd=ROOT,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    # One trial at a time: once the second trial's folder appears, the first has ended. Kill the whole
    # driver then (a trial that reached its budget ends on its own; Tune marks no result `done`).
    while time.time() - t0 < 400 and proc.poll() is None:
        if len(list(exp.glob("_sweep_trial_*"))) >= 2:
            break
        time.sleep(1)
    assert proc.poll() is None, "the sweep ended before the kill"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = [p for p in exp.glob("_sweep_trial_*/result.json") if '"epoch": 2' in p.read_text()]
    assert len(first) == 1, "no trial finished its 2 epochs before the kill"
    reports_before = first[0].read_text()
    import ray

    try:
        run_sweep(cfg, tmp_path)
    finally:
        ray.shutdown()
    df = pd.read_csv(tmp_path / sweep.CSV)
    assert len(df) == 2
    children = [r for r in mlflow_runs(cfg) if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2  # the finished trial was not run again, the other reopened its run
    assert first[0].read_text() == reports_before  # no epoch of the finished trial reported again
