"""dvc.yaml's deps hold every project file each stage runs (editing one must make `dvc repro` rerun it),
and no code file it does not run.

A stage's code is the import closure of its `stages/<name>.py` within this repo (imports inside functions
included: the library imports MLflow, timm and its own modules lazily; a package's `_LAZY` names count as
its submodules). A dep covers a file when it names the file or a folder above it.
"""

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "evals", "stages")


def _module_file(name: str) -> Path | None:
    """pipeline.models.io -> pipeline/models/io.py (or the package's __init__.py); None outside the repo."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _lazy_exports(init: Path) -> dict[str, str]:
    """A package's `_LAZY = {name: submodule}`: the names its module `__getattr__` imports on first use
    (`from pipeline.data import NyuDepth` runs pipeline/data/nyu.py)."""
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def _imports(path: Path) -> set[Path]:
    """The repo files `path` imports, anywhere in it (a package import also brings its __init__.py)."""
    out: set[Path] = set()
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names = [base] + [f"{base}.{a.name}" for a in node.names]  # `from evals import common`
            init = _module_file(base)
            if init is not None and init.name == "__init__.py":
                lazy = _lazy_exports(init)
                names += [f"{base}.{lazy[a.name]}" for a in node.names if a.name in lazy]
        for name in names:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__, a/b/__init__ too
                f = _module_file(".".join(parts[:i]))
                if f is not None:
                    out.add(f)
    return out


def _runs_code(path: Path) -> bool:
    """False for a file of nothing but a docstring (a package's __init__.py): editing it changes no result.
    Once it holds code it must be a dep like any other file."""
    body = ast.parse(path.read_text()).body
    return not all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def closure(entry: Path) -> set[Path]:
    seen, todo = set(), [entry]
    while todo:
        f = todo.pop()
        if f not in seen:
            seen.add(f)
            todo.extend(_imports(f) - seen)
    return seen


STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_cover_the_code_it_runs(name):
    stage = STAGES[name]
    module = stage["cmd"].split("-m ", 1)[1].split()[0]  # python -m stages.<name>
    deps = [ROOT / d for d in stage.get("deps", []) if "${" not in d]
    covered = lambda f: any(f == d or d in f.parents for d in deps)  # noqa: E731
    missing = sorted(str(f.relative_to(ROOT)) for f in closure(_module_file(module))
                     if not covered(f) and _runs_code(f))
    assert not missing, f"dvc.yaml stage {name!r} runs these files but does not depend on them: {missing}"


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_name_no_code_it_does_not_run(name):
    """The other way round: a code file (or package folder) in the deps that the stage never imports would
    rerun it for nothing, and is how a moved module's old entry lingers. Data deps are not code."""
    stage = STAGES[name]
    module = stage["cmd"].split("-m ", 1)[1].split()[0]
    runs = closure(_module_file(module))
    code = [d for d in stage.get("deps", []) if d.split("/")[0] in PACKAGES]
    unused = [d for d in code if not any(f == ROOT / d or ROOT / d in f.parents for f in runs)]
    assert not unused, f"dvc.yaml stage {name!r} depends on code it does not run: {unused}"


def test_closure_follows_lazy_and_package_imports():
    files = {str(f.relative_to(ROOT)) for f in closure(ROOT / "stages" / "eval_linear.py")}
    assert {"evals/linear.py", "evals/common.py", "pipeline/models/checkpoints.py", "pipeline/tracking.py"} <= files
    # `from pipeline.data import ImageNetFolder` (inside a function) runs pipeline/data/imagenet.py, through
    # pipeline.data's lazy __getattr__
    assert "pipeline/data/imagenet.py" in files and "pipeline/data/nyu.py" not in files


def _resolved(path: str, params: dict) -> str:
    """`${data.root}/x` -> `data/x`, from params.yaml, as DVC resolves a stage's paths."""
    def value(m: re.Match) -> str:
        v = params
        for key in m.group(1).split("."):
            v = v[key]
        return str(v)

    return re.sub(r"\$\{([^}]+)\}", value, path)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_dvc_lock_records_the_deps_dvc_yaml_lists(name):
    """A stage's entry in the committed dvc.lock lists the files dvc.yaml's deps name: otherwise the lock
    is from before the last edit of the stage's deps, `dvc status` calls the stage changed on a fresh
    clone, and a plain `dvc repro` reruns it. Rerun the stage (`dvc repro <name>`) and commit dvc.lock."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]
    assert name in lock, f"dvc.lock has no entry for stage {name!r}: run `dvc repro {name}` and commit dvc.lock"
    want = {_resolved(d if isinstance(d, str) else next(iter(d)), params) for d in STAGES[name].get("deps", [])}
    have = {d["path"] for d in lock[name].get("deps", [])}
    assert have == want, (f"dvc.lock's {name!r} deps differ from dvc.yaml's: missing {sorted(want - have)}, "
                          f"extra {sorted(have - want)}; run `dvc repro {name}` and commit dvc.lock")
