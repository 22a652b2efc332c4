"""Evaluating an encoder that this pipeline did not pretrain: no pretrain stage, no models/ folder."""

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from evals import clevr, depth, linear, report, semi
from pipeline.errors import PipelineError
from pipeline.models.encoder import build_encoder

ROOT = Path(__file__).resolve().parents[1]
FAST = {"eval_linear.epochs": 3, "eval_semi.epochs": 3, "eval_clevr.epochs": 3, "eval_depth.epochs": 2,
        "eval_depth.num_bins": 8, "mlflow.system_metrics": False,
        "eval_linear.lrs": [0.01], "eval_linear.weight_decays": [0.0]}


def _official_file(path: Path, cfg) -> Path:
    torch.manual_seed(5)
    sd = build_encoder(cfg.model, cfg.data.image_size).state_dict()
    torch.save({"encoder": {f"module.{k}": v for k, v in sd.items()},
                "target_encoder": {f"module.{k}": v for k, v in sd.items()}, "epoch": 300}, path)
    return path


def _runs(cfg) -> list[tuple[str, str | None]]:
    """(run name, parent run name) of every run in the store."""
    db = cfg.mlflow.tracking_uri.removeprefix("sqlite:///")
    with sqlite3.connect(db) as con:
        names = dict(con.execute("select run_uuid, name from runs"))
        parents = dict(con.execute("select run_uuid, value from tags where key = 'mlflow.parentRunId'"))
    return sorted((names[r], names.get(parents.get(r))) for r in names)


def test_official_checkpoint_evaluated_without_pretraining(tiny_cfg, eval_data, tmp_path):
    ckpt = _official_file(tmp_path / "IN1K-vit.micro.8-300e.pth.tar", tiny_cfg)
    cfg = tiny_cfg.replace(**FAST, **{"data.root": str(eval_data), "evaluate.encoder": str(ckpt)})
    assert not Path(cfg.pretrain.out_dir).exists()
    m = linear.run(cfg, tmp_path)
    assert 0 <= m["ijepa"]["last"]["top1"] <= 100 and "p_value" in m["paired"]["last"]["top1"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "metrics" / "eval_linear.json").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    report.run(cfg, tmp_path)  # the report of what ran so far, logged under the same parent
    runs = _runs(cfg)
    parent = f"evaluate {ckpt.name}"
    assert (parent, None) in runs and ("eval_linear", parent) in runs and ("report", parent) in runs
    assert sum(name == parent for name, _ in runs) == 1  # one parent run per encoder file, found again
    assert (tmp_path / "reports" / "evals.md").is_file()


def test_hugging_face_folder_runs_every_stage(tiny_cfg, eval_data, tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.IJepaConfig(hidden_size=128, num_hidden_layers=6, num_attention_heads=4,
                                      intermediate_size=512, image_size=32, patch_size=8)
    transformers.IJepaModel(config).save_pretrained(tmp_path / "ijepa_micro")
    cfg = tiny_cfg.replace(**FAST, **{"data.root": str(eval_data), "evaluate.encoder": str(tmp_path / "ijepa_micro")})
    for stage in (linear, semi, clevr, depth):
        stage.run(cfg, tmp_path)
    table = report.run(cfg, tmp_path)
    assert {"linear", "semi_1pct", "depth"} <= set(table.index.get_level_values(0))
    assert {n for n, p in _runs(cfg) if p == "evaluate ijepa_micro"} >= {"eval_linear", "eval_semi", "eval_clevr",
                                                                        "eval_depth", "report"}


def test_bad_encoder_file_exits_2_with_one_line_and_no_metrics(tiny_cfg, tmp_path):
    bad = tmp_path / "cut.pth.tar"
    _official_file(bad, tiny_cfg)
    bad.write_bytes(bad.read_bytes()[:1000])
    doc = json.loads(json.dumps(tiny_cfg.replace(**{"evaluate.encoder": str(bad)}).to_dict(), default=list))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc))
    proc = subprocess.run([sys.executable, "-m", "stages.eval_linear", "--params", str(tmp_path / "params.yaml")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cut.pth.tar" in errors[0] and "corrupt" in errors[0]
    assert not (tmp_path / "metrics").exists()


def test_architecture_of_the_file_must_match_params(tiny_cfg, tmp_path):
    ckpt = _official_file(tmp_path / "micro.pth.tar", tiny_cfg)
    cfg = tiny_cfg.replace(**{"evaluate.encoder": str(ckpt), "model.name": "vit_tiny"})
    with pytest.raises(PipelineError, match="vit_micro/8 at 32 px.*model.name=vit_tiny"):
        linear.run(cfg, tmp_path)
    assert not (tmp_path / "metrics").exists()
