"""The `params` stage: writes the resolved config, or one error line and nothing at all."""

import json
import shutil
import subprocess
import sys

import yaml
from conftest import ROOT


def run(cwd, *args):
    return subprocess.run([sys.executable, "-m", "stages.resolve_params", *args], cwd=cwd, capture_output=True,
                          text=True, env={"PYTHONPATH": str(ROOT), "PATH": ""})


def test_writes_resolved_config(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    proc = run(tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads((tmp_path / "reports/params.resolved.json").read_text())
    assert out["config"]["model"]["name"] == "vit_micro"  # filled in by the demo preset
    assert out["config"]["data"]["image_size"] == 64


def test_bad_params_write_nothing(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["optim"]["lr"] = -1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    proc = run(tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: params: optim.lr = -1.0 is not allowed; expected a number >= 0"
    assert not (tmp_path / "reports").exists()
