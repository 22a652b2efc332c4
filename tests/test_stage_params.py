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


def test_committed_resolved_config_is_what_params_yaml_resolves_to(tmp_path):
    """reports/params.resolved.json is in git (a DVC out without cache): a copy older than params.yaml or the
    config's defaults tells a reader a config no stage uses. `make repro` rewrites it; commit the result."""
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    assert run(tmp_path).returncode == 0
    fresh = json.loads((tmp_path / "reports/params.resolved.json").read_text())
    committed = json.loads((ROOT / "reports/params.resolved.json").read_text())
    assert committed == fresh, "reports/params.resolved.json is stale: run `make repro` (or `dvc repro params`)"


def test_bad_params_write_nothing(tmp_path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["optim"]["lr"] = -1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    proc = run(tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: params: optim.lr = -1.0 is not allowed; expected a number >= 0"
    assert not (tmp_path / "reports").exists()
