"""The library's layers, read from the source with `ast` (imports inside functions included):
`pipeline/` never imports the evaluations or the stages, and only its `ray_*.py` modules import Ray."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = sorted((ROOT / "pipeline").rglob("*.py"))


def imported(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in `path` (or in `source`, read as that file): `import a.b`,
    `from a import b` (as a and a.b), relative imports resolved against the file's package, and
    importlib.import_module / __import__ of a literal."""
    package = path.relative_to(ROOT).with_suffix("").parts[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package[: len(package) - node.level + 1], *([base] if base else [])])
            out += [(node.lineno, base)] + [(node.lineno, f"{base}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                out.append((node.lineno, node.args[0].value))
    return out


def top(module: str) -> str:
    return module.split(".")[0]


def test_the_walk_sees_lazy_relative_and_dynamic_imports():
    source = ("def g():\n    import evals.linear\n    from ..sweep import run\n    from .. import viz\n"
              "    importlib.import_module('stages.report')\n")
    got = {m for _, m in imported(ROOT / "pipeline" / "models" / "any.py", source)}
    assert {"evals.linear", "pipeline.sweep", "pipeline.sweep.run", "pipeline.viz", "stages.report"} <= got


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_library_never_imports_evals_or_stages(path):
    bad = [f"line {n}: {m}" for n, m in imported(path) if top(m) in ("evals", "stages")]
    assert not bad, f"{path.relative_to(ROOT)} imports the layers above the library: {bad}"


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_only_ray_modules_import_ray(path):
    ray = [f"line {n}: {m}" for n, m in imported(path) if top(m) == "ray"]
    assert path.name.startswith("ray_") or not ray, \
        f"{path.relative_to(ROOT)} imports Ray ({ray}); Ray belongs in pipeline/ray_*.py"


def test_there_are_ray_modules():
    assert {p.name for p in LIBRARY if any(top(m) == "ray" for _, m in imported(p))} == {"ray_train.py", "ray_tune.py"}
