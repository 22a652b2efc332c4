"""Where each dataset lives: the generated layout under data.root, or the user's real folders."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import DataConfig
from pipeline.errors import PipelineError

# The synthetic export's layout under data.root (written by pipeline.data.export).
SYNTHETIC_LAYOUT = {
    "imagenet": "imagenet",
    "imagenet_subset": "imagenet/1percent.txt",
    "clevr": "clevr/CLEVR_v1.0",
    "nyu": "nyu",
}
_KEYS = {"imagenet": "imagenet_root", "imagenet_subset": "imagenet_subset", "clevr": "clevr_root",
         "nyu": "nyu_root"}
_WHAT = {"imagenet": "ImageNet folder (train/<wnid>/, val/<wnid>/)", "imagenet_subset": "1% list",
         "clevr": "CLEVR_v1.0 folder (images/, scenes/)",
         "nyu": "folder with nyu_depth_v2_labeled.mat and splits.mat"}


class DataPaths:
    """imagenet, imagenet_subset, clevr, nyu: absolute Paths (read-only).

    With real data a dataset whose key is null in params.yaml stays unset, and reading its attribute
    raises a PipelineError naming the key: a run that needs only ImageNet does not need CLEVR.
    """

    __slots__ = ("_paths",)

    def __init__(self, imagenet: Path | None, imagenet_subset: Path | None, clevr: Path | None,
                 nyu: Path | None):
        paths = {"imagenet": imagenet, "imagenet_subset": imagenet_subset, "clevr": clevr, "nyu": nyu}
        object.__setattr__(self, "_paths", {k: None if v is None else Path(v) for k, v in paths.items()})

    def __setattr__(self, name, value):
        raise AttributeError("DataPaths is read-only")

    def _get(self, name: str) -> Path:
        path = self._paths[name]
        if path is None:
            raise PipelineError(f"params: data.{_KEYS[name]} is null; set it to the {_WHAT[name]} "
                                "(needed with data.source: real)")
        return path

    imagenet = property(lambda self: self._get("imagenet"))
    imagenet_subset = property(lambda self: self._get("imagenet_subset"))
    clevr = property(lambda self: self._get("clevr"))
    nyu = property(lambda self: self._get("nyu"))

    def has(self, name: str) -> bool:
        """True when dataset `name` (imagenet, imagenet_subset, clevr, nyu) is configured."""
        return self._paths[name] is not None

    def __eq__(self, other) -> bool:
        return isinstance(other, DataPaths) and self._paths == other._paths

    def __hash__(self) -> int:
        return hash(tuple(self._paths.items()))

    def __repr__(self) -> str:
        return "DataPaths(" + ", ".join(f"{k}={v!s}" for k, v in self._paths.items()) + ")"


def synthetic_paths(root: Path) -> DataPaths:
    """The exporter's layout under `root`."""
    root = Path(root)
    return DataPaths(**{k: root / v for k, v in SYNTHETIC_LAYOUT.items()})


def dataset_paths(data: DataConfig, root: Path | None = None) -> DataPaths:
    """Paths of the four datasets; relative paths are taken against `root` (default: the cwd).

    synthetic: the layout under data.root. real: the configured folders; imagenet_subset null means
    <imagenet_root>/1percent.txt.
    """
    base = Path.cwd() if root is None else Path(root)

    def resolve(p: str | Path | None) -> Path | None:
        return None if p is None else (base / Path(p).expanduser()).resolve()

    if data.source == "synthetic":
        return synthetic_paths(resolve(data.root))
    imagenet = resolve(data.imagenet_root)
    subset = resolve(data.imagenet_subset) if data.imagenet_subset is not None else None
    if subset is None and imagenet is not None:
        subset = imagenet / "1percent.txt"
    return DataPaths(imagenet, subset, resolve(data.clevr_root), resolve(data.nyu_root))
