"""dvc.yaml's paths that are params follow params.yaml, and are the paths the code writes and reads.

A copy of the repo's dvc.yaml is resolved by DVC itself against a params.yaml whose `pretrain.out_dir`,
`data.root` and `evaluate.encoder` point elsewhere: every dep and out of every stage must move with them
and nothing else may change. Then the code, under the same params.yaml, must write what those stages
declare (pipeline.pretrain.outputs, the prepare stage's folder) and read what they depend on (the datasets
under data.root, evals.common.encoder_source).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from evals.common import encoder_source
from pipeline import pretrain
from pipeline.config import load_config
from pipeline.data import dataset_paths

MOVED = {"pretrain.out_dir": "elsewhere/models", "data.root": "d2", "evaluate.encoder": "elsewhere/models/encoder"}
ENCODER_STAGES = ("eval_linear", "eval_semi", "eval_clevr", "eval_depth", "pictures", "report")
TINY_DATA = {"data.image_size": 32, "data.synthetic.train_scenes": 24, "data.synthetic.val_scenes": 16,
             "data.synthetic.processes": 1, "data.synthetic.subset_fraction": 0.3}


def _repo(path: Path, changes: dict) -> Path:
    """A DVC repo (no git) holding the repo's dvc.yaml and its params.yaml with `changes` ({dotted: value})."""
    path.mkdir()
    shutil.copy(ROOT / "dvc.yaml", path / "dvc.yaml")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        section = raw
        for p in parents:
            section = section[p]
        section[leaf] = value
    (path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    from dvc.repo import Repo

    Repo.init(str(path), no_scm=True).close()
    return path


def _stages(repo: Path) -> dict[str, dict[str, list[str]]]:
    """{stage: {"deps": [...], "outs": [...]}} as DVC resolves dvc.yaml (metrics and plots files among outs)."""
    from dvc.repo import Repo

    with Repo(str(repo)) as r:
        return {s.name: {"deps": [d.def_path for d in s.deps], "outs": [o.def_path for o in s.outs]}
                for s in r.index.stages}


@pytest.fixture(scope="module")
def moved(tmp_path_factory) -> Path:
    return _repo(tmp_path_factory.mktemp("dvcpaths") / "repo", MOVED)


def test_deps_and_outs_follow_the_params_they_name(moved, tmp_path):
    default = _stages(_repo(tmp_path / "default", {}))
    committed = load_config(ROOT / "params.yaml")
    old = {"pretrain.out_dir": committed.pretrain.out_dir, "data.root": committed.data.root}
    assert old == {"pretrain.out_dir": "models", "data.root": "data"}  # the values the mapping below replaces

    def move(path: str) -> str:
        for key in ("pretrain.out_dir", "data.root"):
            if path == old[key] or path.startswith(old[key] + "/"):
                return MOVED[key] + path[len(old[key]):]
        return path

    expected = {name: {k: [move(p) for p in paths] for k, paths in s.items()} for name, s in default.items()}
    assert _stages(moved) == expected
    assert expected != default  # the mapping did move something: the outs below, and every data and encoder dep
    got = _stages(moved)
    assert got["prepare"]["outs"] == ["d2"]
    assert {"elsewhere/models/encoder", "elsewhere/models/run_id.txt"} <= set(got["pretrain"]["outs"])
    assert all("elsewhere/models/encoder" in got[name]["deps"] for name in ENCODER_STAGES)


def test_pretrain_writes_the_outs_it_declares_and_the_evals_read_its_encoder(moved):
    cfg = load_config(moved / "params.yaml")
    stages = _stages(moved)
    written = {str(p.relative_to(moved)) for p in pretrain.outputs(cfg, moved).values()}
    assert written == set(stages["pretrain"]["outs"])
    encoder = str(encoder_source(cfg, moved).relative_to(moved))
    assert encoder == "elsewhere/models/encoder" and encoder in stages["pretrain"]["outs"]
    for name in ENCODER_STAGES:
        assert encoder in stages[name]["deps"], name


def test_committed_params_evaluate_what_pretrain_writes():
    """evaluate.encoder cannot default to <pretrain.out_dir>/encoder in dvc.yaml (DVC interpolates no null):
    params.yaml spells it out, and the two must agree."""
    cfg = load_config(ROOT / "params.yaml")
    assert encoder_source(cfg, ROOT) == pretrain.outputs(cfg, ROOT)["encoder"]


def test_prepare_writes_only_into_its_out_and_every_reader_depends_on_it(tmp_path):
    """The prepare stage, run as DVC runs it, writes under its one out; the stages that read the datasets
    depend on that folder."""
    repo = _repo(tmp_path / "repo", {**MOVED, **TINY_DATA})
    before = set(repo.rglob("*"))
    proc = subprocess.run([sys.executable, "-m", "stages.prepare"], cwd=repo, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    new = {p.relative_to(repo) for p in set(repo.rglob("*")) - before if p.is_file()}
    stages = _stages(repo)
    (out,) = stages["prepare"]["outs"]
    assert out == "d2"
    strays = sorted(str(p) for p in new if p.parts[0] != out)
    assert new and not strays, f"prepare wrote outside its out {out!r}: {strays[:5]}"
    paths = dataset_paths(load_config(repo / "params.yaml").data, repo)
    for name in ("imagenet", "imagenet_subset", "clevr", "nyu"):
        assert getattr(paths, name).exists() and repo / out in getattr(paths, name).parents, name
    for name in ("pretrain", "eval_linear", "eval_semi", "eval_clevr", "eval_depth", "pictures", "sweep"):
        assert out in stages[name]["deps"], name
