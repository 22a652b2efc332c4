"""Every evaluation stage end to end on tiny exported data, and the bad inputs that must fail cleanly."""

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from evals import clevr, depth, linear, report, semi
from pipeline import tracking
from pipeline.errors import PipelineError
from pipeline.models.encoder import build_encoder
from pipeline.models.io import save_encoder

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
FAST = {"eval_linear.epochs": 5, "eval_semi.epochs": 5, "eval_clevr.epochs": 5, "eval_depth.epochs": 3,
        "eval_linear.attentive_epochs": 3, "eval_semi.attentive_epochs": 3, "eval_clevr.attentive_epochs": 3,
        "eval_depth.num_bins": 16, "mlflow.system_metrics": False}


@pytest.fixture
def cfg(tiny_cfg):
    """tiny_cfg with a saved (random) 'pretrained' encoder and a placeholder pretrain run id."""
    cfg = tiny_cfg.replace(**FAST)
    torch.manual_seed(123)
    enc = build_encoder(cfg.model, cfg.data.image_size)
    out = Path(cfg.pretrain.out_dir)
    save_encoder(enc, cfg.model, cfg.data.image_size, out / "encoder")
    tracking.write_run_id("0" * 32, out / "run_id.txt")  # bad-input tests fail before MLflow is touched
    return cfg


def run_names(cfg) -> list[str]:
    db = cfg.mlflow.tracking_uri.removeprefix("sqlite:///")
    with sqlite3.connect(db) as con:
        return [r[0] for r in con.execute("select name from runs")]


@pytest.mark.slow  # ~2 min on the busy 2-core box: 5 MLflow child runs, 2 encoders x 3 datasets
def test_every_stage_end_to_end(cfg, eval_data, tmp_path):
    cfg = cfg.replace(**{"data.root": str(eval_data)})
    with tracking.pipeline_run(cfg, "pretrain", root=tmp_path) as run:
        tracking.write_run_id(run.info.run_id, Path(cfg.pretrain.out_dir) / "run_id.txt")
    m = linear.run(cfg, tmp_path)
    cached = sorted((tmp_path / ".cache" / "features").iterdir())
    # (ijepa, random, pixels) x (train, val) pooled; (ijepa, random) x (train, val) tokens (the attentive probe's;
    # the diagnostics read the val ones: all 32 val images are under its 512)
    assert len(cached) == 10
    assert set(m["diagnostics"]) == {"ijepa", "random"} and m["diagnostics"]["random"]["rankme"] > 1
    assert 0 <= m["pixels"]["top1"] <= m["pixels"]["top5"] <= 100
    for enc in ("ijepa", "random"):
        for res in (m[enc]["last"], m[enc]["last4"], m[enc]["knn"]["last"], m[enc]["knn"]["last4"],
                    m[enc]["attentive"]["last"]):
            assert 0 <= res["top1"] <= res["top5"] <= 100 and "hits" not in res
        assert set(m[enc]["attentive"]["last"]) == {"top1", "top5"}  # lr, weight_decay: to the chosen params
    for probe, views in (("knn", ("last", "last4")), ("attentive", ("last",))):  # paired like the linear probe
        for view in views:
            pv = m["paired"][probe][view]["top1"]
            assert pv["margin"] == pytest.approx(m["ijepa"][probe][view]["top1"] - m["random"][probe][view]["top1"])
    s = semi.run(cfg, tmp_path)
    assert sorted((tmp_path / ".cache" / "features").iterdir()) == cached  # the 1% probe reuses train features
    assert set(s["ijepa"]) == set(s["paired"]) == {"last", "last4", "knn", "attentive"}
    for view in ("last", "last4"):  # the paired test of the two encoders on the same val images
        pv = m["paired"][view]["top1"]
        assert pv["margin"] == pytest.approx(m["ijepa"][view]["top1"] - m["random"][view]["top1"])
        assert pv["ci95_low"] <= pv["margin"] <= pv["ci95_high"] and 0 < pv["p_value"] <= 1
    c = clevr.run(cfg, tmp_path)
    assert set(c["random"]) == {"count_all", "closest_object_distance"}
    assert set(c["paired"]) == set(c["pixels"]) == {"count_all", "closest_object_distance"}
    for task in c["random"].values():  # VTAB: top-1 only, for every probe
        assert set(task["knn"]["last4"]) == set(task["attentive"]["last"]) == {"top1"}
    d = depth.run(cfg, tmp_path)
    assert set(d) == {"ijepa", "random", "mean_depth", "paired"}
    pd_ = d["paired"]["last"]["abs_rel"]
    assert pd_["margin"] == pytest.approx(d["random"]["last"]["abs_rel"] - d["ijepa"]["last"]["abs_rel"])
    assert 0 <= d["ijepa"]["last"]["d1"] <= d["ijepa"]["last"]["d2"] <= d["ijepa"]["last"]["d3"] <= 1
    table = report.run(cfg, tmp_path)
    for name in ("eval_linear", "eval_semi", "eval_clevr", "eval_depth"):
        doc = json.loads((tmp_path / "metrics" / f"{name}.json").read_text())
        assert "random" in doc and "ijepa" in doc
    # linear, 1 %, count, distance top-1 of the linear, attentive and k-NN probes; depth AbsRel
    assert table["p.last"].notna().sum() == 3 * 4 + 1
    assert {"top1", "attentive_top1", "knn_top1"} <= set(table.loc["clevr.count_all"].index)
    assert {"linear", "semi_1pct", "clevr.count_all", "clevr.closest_object_distance", "depth"} == \
        set(table.index.get_level_values(0))
    assert (tmp_path / "reports" / "evals.md").is_file() and (tmp_path / "reports" / "evals.csv").is_file()
    assert {"pretrain", "eval_linear", "eval_semi", "eval_clevr", "eval_depth", "report"} <= set(run_names(cfg))


def test_eval_linear_and_report_through_the_stage_clis(cfg, eval_data, tmp_path):
    """The default run's end-to-end check of the evaluation stages (the slow test above runs all of them in
    process): `python -m stages.eval_linear` then `stages.report` as DVC runs them, in a repo root of their own,
    writing what dvc.yaml declares and logging child runs of the pretrain run."""
    cfg = cfg.replace(**{"data.root": str(eval_data), "eval_linear.lrs": [0.01], "eval_linear.weight_decays": [0.0]})
    with tracking.pipeline_run(cfg, "pretrain", root=tmp_path) as run:
        tracking.write_run_id(run.info.run_id, Path(cfg.pretrain.out_dir) / "run_id.txt")
    doc = json.loads(json.dumps(cfg.to_dict(), default=list))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc))
    for stage in ("eval_linear", "report"):
        proc = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 0, proc.stderr
        declared = [next(iter(o)) if isinstance(o, dict) else o
                    for key in ("outs", "metrics") for o in STAGES[stage].get(key, [])]
        assert declared and all((tmp_path / f).is_file() for f in declared), (stage, declared)
    m = json.loads((tmp_path / "metrics" / "eval_linear.json").read_text())
    assert {"ijepa", "random", "paired", "pixels", "diagnostics"} <= set(m)
    table = pd.read_csv(tmp_path / "reports" / "evals.csv", index_col=[0, 1])
    for view in ("last", "last4"):
        row = table.loc[("linear", "top1")]
        assert row[f"ijepa.{view}"] == pytest.approx(m["ijepa"][view]["top1"], abs=1e-4)
        assert row[f"margin.{view}"] == pytest.approx(m["ijepa"][view]["top1"] - m["random"][view]["top1"], abs=1e-3)
        assert row[f"p.{view}"] == pytest.approx(m["paired"][view]["top1"]["p_value"], rel=1e-5)
    assert table.loc[("linear", "top1"), "baseline"] == pytest.approx(m["pixels"]["top1"], abs=1e-4)
    assert (tmp_path / "reports" / "evals.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(run_names(cfg)) == ["eval_linear", "pretrain", "report"]


def test_architecture_mismatch_names_both_and_writes_nothing(cfg, tmp_path):
    bad = cfg.replace(**{"model.patch_size": 16})
    with pytest.raises(PipelineError, match="vit_micro/8 at 32 px.*model.patch_size=16"):
        linear.run(bad, tmp_path)
    assert not (tmp_path / "metrics").exists()


def test_missing_split_and_empty_subset_fail_cleanly(cfg, tmp_path):
    root = tmp_path / "broken"
    (root / "imagenet" / "train" / "n01").mkdir(parents=True)
    (root / "imagenet" / "train" / "n01" / "n01_1.JPEG").write_bytes(b"")
    with pytest.raises(PipelineError, match="val"):
        linear.run(cfg.replace(**{"data.root": str(root)}), tmp_path)
    (root / "imagenet" / "val" / "n01").mkdir(parents=True)
    (root / "imagenet" / "val" / "n01" / "x.JPEG").write_bytes(b"")
    (root / "imagenet" / "1percent.txt").write_text("\n")
    with pytest.raises(PipelineError, match="empty subset"):
        semi.run(cfg.replace(**{"data.root": str(root)}), tmp_path)
    assert not (tmp_path / "metrics").exists()


@pytest.mark.slow
def test_stage_cli_exits_2_with_one_line(cfg, tmp_path):
    params = tmp_path / "params.yaml"
    doc = json.loads(json.dumps(cfg.replace(**{"model.patch_size": 16}).to_dict(), default=list))
    params.write_text(yaml.safe_dump(doc))
    proc = subprocess.run([sys.executable, "-m", "stages.eval_linear", "--params", str(params)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model.patch_size=16" in errors[0]
