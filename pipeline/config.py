"""Typed, validated view of params.yaml.

Every section of params.yaml is a frozen dataclass below. `load_config` reads the file, applies the
named preset (`preset: demo | paper`, pipeline/presets.py), then the explicit values of the file, and
validates the result. Anything wrong (an unknown key, a wrong type, an out-of-range value) raises
`ConfigError`, whose message is one line naming the key, the bad value and what is allowed; stages
turn it into a non-zero exit before doing any work.

Precedence, lowest first: dataclass defaults (the paper's settings) < preset < params.yaml.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import PipelineError
from pipeline.models.presets import ENCODER_PRESETS, PATCH_SIZES
from pipeline.presets import PRESETS

MASK_STRATEGIES = ("multiblock", "random", "block", "rasterized")
# Anti-collapse terms on the context features (pipeline/regularizers.py, optim.reg_on); "none" is the paper.
Regularizer = Literal["none", "vicreg", "sigreg"]
REGULARIZERS: tuple[str, ...] = typing.get_args(Regularizer)
STORAGE_SCHEMES = ("s3", "gs")  # object stores that pyarrow.fs, hence Ray Train, opens by URI


class ConfigError(PipelineError):
    """A bad value in params.yaml. `str()` is one line: key, bad value, what is allowed."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(key)

    def __str__(self) -> str:
        return f"params: {self.key} = {self.value!r} is not allowed; expected {self.allowed}"

    def under(self, prefix: str) -> ConfigError:
        return ConfigError(f"{prefix}.{self.key}" if prefix else self.key, self.value, self.allowed)


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(key, value, allowed)


def _check_range(key: str, pair: tuple[float, float], lo: float, hi: float, lo_open: bool = True) -> None:
    """A (min, max) pair inside (lo, hi] (or [lo, hi] when not lo_open) with min <= max."""
    a, b = pair
    inside = (lambda v: lo < v <= hi) if lo_open else (lambda v: lo <= v <= hi)
    bracket = "(" if lo_open else "["
    _check(inside(a) and inside(b), key, list(pair), f"both ends in {bracket}{lo}, {hi}]")
    _check(a <= b, key, list(pair), "[min, max] with min <= max")


# ----------------------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class SyntheticConfig:
    """The embedded default: procedural scenes written in the real on-disk formats by `prepare`."""

    seed: int = 0
    train_scenes: int = 2400  # shared by the ImageNet-, CLEVR- and NYU-format exports
    val_scenes: int = 800
    # The "1%" list, per class (at least one image). ImageNet-1% holds ~12.8 labels per class; with 300 scenes
    # per class, 0.04 gives the same 12 (1% would be 3 per class, a few-shot regime too noisy to rank encoders).
    subset_fraction: float = 0.04
    distance_thresholds: tuple[float, ...] | None = None  # None: from the data's quantiles
    processes: int = 2

    def __post_init__(self):
        _check(self.train_scenes >= 16, "train_scenes", self.train_scenes, "an integer >= 16")
        _check(self.val_scenes >= 8, "val_scenes", self.val_scenes, "an integer >= 8")
        _check(0 < self.subset_fraction <= 1, "subset_fraction", self.subset_fraction, "a number in (0, 1]")
        _check(self.processes >= 1, "processes", self.processes, "an integer >= 1")
        t = self.distance_thresholds
        _check(t is None or (len(t) == 7 and list(t) == sorted(t)), "distance_thresholds", t,
               "null or 7 increasing bin edges (6 classes)")


@dataclass(frozen=True)
class DataConfig:
    """Where the data lives. `source: synthetic` generates the embedded default into `root`."""

    source: Literal["synthetic", "real"] = "synthetic"
    root: str = "data"
    image_size: int = 224
    imagenet_root: str | None = None  # folder with train/<wnid>/ and val/<wnid>/
    imagenet_subset: str | None = None  # the 1% list (one `n01440764_10026.JPEG` per line)
    clevr_root: str | None = None  # CLEVR_v1.0 folder with images/ and scenes/
    nyu_root: str | None = None  # folder with nyu_depth_v2_labeled.mat and splits.mat
    on_corrupt: Literal["skip", "fail"] = "skip"
    num_workers: int = 1  # DataLoader worker processes per training worker
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self):
        _check(self.image_size >= 16, "image_size", self.image_size, "an integer >= 16")
        _check(self.num_workers >= 0, "num_workers", self.num_workers, "an integer >= 0")
        if self.source == "real":
            for key in ("imagenet_root",):
                _check(getattr(self, key) is not None, key, None, "a path when source is 'real'")


@dataclass(frozen=True)
class MaskConfig:
    """I-JEPA masking; defaults are the paper's (Sec. 3, Fig. 4)."""

    strategy: str = "multiblock"
    num_targets: int = 4
    pred_scale: tuple[float, float] = (0.15, 0.2)
    pred_aspect: tuple[float, float] = (0.75, 1.5)
    enc_scale: tuple[float, float] = (0.85, 1.0)
    enc_aspect: tuple[float, float] = (1.0, 1.0)
    min_keep: int = 10
    allow_overlap: bool = False

    def __post_init__(self):
        _check(self.strategy in MASK_STRATEGIES, "strategy", self.strategy, f"one of {list(MASK_STRATEGIES)}")
        _check(self.num_targets >= 1, "num_targets", self.num_targets, "an integer >= 1")
        _check_range("pred_scale", self.pred_scale, 0.0, 1.0)
        _check_range("enc_scale", self.enc_scale, 0.0, 1.0)
        _check_range("pred_aspect", self.pred_aspect, 0.0, float("inf"))
        _check_range("enc_aspect", self.enc_aspect, 0.0, float("inf"))
        _check(self.min_keep >= 1, "min_keep", self.min_keep, "an integer >= 1")


@dataclass(frozen=True)
class ModelConfig:
    """Encoder preset and the narrow predictor."""

    name: str = "vit_huge"
    patch_size: int = 14
    pred_depth: int = 12
    pred_emb_dim: int = 384

    def __post_init__(self):
        _check(self.name in ENCODER_PRESETS, "name", self.name, f"one of {list(ENCODER_PRESETS)}")
        _check(self.patch_size in PATCH_SIZES, "patch_size", self.patch_size, f"one of {list(PATCH_SIZES)}")
        _check(self.pred_depth >= 1, "pred_depth", self.pred_depth, "an integer >= 1")
        _check(self.pred_emb_dim >= 8 and self.pred_emb_dim % 8 == 0, "pred_emb_dim", self.pred_emb_dim,
               "a positive multiple of 8")

    @property
    def embed_dim(self) -> int:
        return ENCODER_PRESETS[self.name][0]


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with warmup + cosine LR, cosine weight decay and a linear EMA schedule (paper, App. A)."""

    lr: float = 1e-3
    start_lr: float = 2e-4
    final_lr: float = 1e-6
    warmup_epochs: float = 40
    weight_decay: float = 0.04
    final_weight_decay: float = 0.4
    ema: tuple[float, float] = (0.996, 1.0)
    ipe_scale: float = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    loss: Literal["smooth_l1", "l2"] = "smooth_l1"
    grad_clip: float | None = None
    # Not in the paper: loss = prediction loss + reg_weight * regulariser(context features, see reg_on).
    # reg_weight is read only when reg is not "none"; 1.0 is VICReg's own balance for vicreg, while
    # sigreg is on a larger scale (pipeline/regularizers.py).
    reg: Regularizer = "none"
    reg_weight: float = 1.0
    # What it regularises: "pooled", the context encoder's mean token per image (C-JEPA, LeJEPA), or
    # "patches", every context token minus its image's mean (within-image spread: on the demo scenes the
    # pooled choice still let all patches of an image collapse onto one vector, docs/findings.md).
    reg_on: Literal["pooled", "patches"] = "pooled"

    def __post_init__(self):
        for key in ("lr", "start_lr", "final_lr", "weight_decay", "final_weight_decay"):
            _check(getattr(self, key) >= 0, key, getattr(self, key), "a number >= 0")
        _check(self.lr > 0, "lr", self.lr, "a number > 0")
        _check(self.warmup_epochs >= 0, "warmup_epochs", self.warmup_epochs, "a number >= 0")
        _check_range("ema", self.ema, 0.0, 1.0, lo_open=False)
        _check(self.ipe_scale >= 1.0, "ipe_scale", self.ipe_scale, "a number >= 1")
        _check_range("betas", self.betas, 0.0, 1.0, lo_open=False)
        _check(self.grad_clip is None or self.grad_clip > 0, "grad_clip", self.grad_clip, "null or > 0")
        _check(self.reg_weight >= 0, "reg_weight", self.reg_weight, "a number >= 0")


@dataclass(frozen=True)
class PretrainConfig:
    """The pretraining run: length, global batch, checkpoints, logging, collapse alarms."""

    epochs: int = 300
    batch_size: int = 2048  # global, split over Ray workers
    seed: int = 0
    checkpoint_every: int = 1000  # steps
    num_to_keep: int = 2
    max_failures: int = 1
    log_every: int = 10  # steps
    bf16: bool = True  # autocast on GPU only
    collapse_std_min: float = 0.01  # std across images of the pooled target features (diagnostics batch)
    collapse_rank_min: float = 2.0  # RankMe of the centred pooled target features (diagnostics batch)
    # ... and when that std falls below this share of its value at init (the random-init encoder on the same
    # batch): features shrinking towards one vector for all images (EMA momentum 0: 0.14-0.22); 0: off
    collapse_std_drop: float = 0.3
    diag_every: int = 500  # steps between collapse/shortcut diagnostics (pipeline/diagnostics.py), and the last
    diag_images: int = 256  # the fixed diagnostics batch: held-out (val) images; 0 turns diagnostics off
    out_dir: str = "models"

    def __post_init__(self):
        _check(self.epochs >= 1, "epochs", self.epochs, "an integer >= 1")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        for key in ("checkpoint_every", "num_to_keep", "log_every", "diag_every"):
            _check(getattr(self, key) >= 1, key, getattr(self, key), "an integer >= 1")
        _check(self.diag_images >= 0, "diag_images", self.diag_images, "an integer >= 0 (0: no diagnostics)")
        _check(self.max_failures >= -1, "max_failures", self.max_failures, "an integer >= -1 (-1: unlimited)")
        _check(0.0 <= self.collapse_std_drop < 1.0, "collapse_std_drop", self.collapse_std_drop,
               "a number in [0, 1) (0: off)")


@dataclass(frozen=True)
class RayConfig:
    """Where training runs: local Ray by default, an existing cluster when `address` is set."""

    address: str | None = None  # null: a local Ray started on demand; "host:port" joins a cluster
    num_workers: int = 2
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})
    accelerator_type: str | None = None  # e.g. "A100"
    storage_path: str = "ray_results"  # a folder (relative: to the repo) or s3://bucket/prefix, shared by all nodes

    def __post_init__(self):
        _check(self.num_workers >= 1, "num_workers", self.num_workers, "an integer >= 1")
        scheme, uri, rest = self.storage_path.partition("://")
        _check(bool(self.storage_path.strip()) and (not uri or (scheme in STORAGE_SCHEMES and rest.strip("/"))),
               "storage_path", self.storage_path,
               f"a local folder or an object-store URI {' or '.join(s + '://bucket/prefix' for s in STORAGE_SCHEMES)}")
        for k, v in self.resources_per_worker.items():
            _check(v >= 0, f"resources_per_worker.{k}", v, "a number >= 0")


@dataclass(frozen=True)
class MlflowConfig:
    """Tracking: an embedded SQLite store in the repo unless `tracking_uri` names a server."""

    tracking_uri: str | None = None  # null: sqlite:///<repo>/mlflow.db
    artifact_root: str = "mlartifacts"  # for the embedded store only
    experiment: str = "ijepa"
    system_metrics: bool = True
    register_model: bool = False  # the pretrained encoder into the model registry, alias "candidate"
    registered_model: str = "ijepa-encoder"

    def __post_init__(self):
        _check(bool(self.experiment.strip()), "experiment", self.experiment, "a non-empty name")
        _check(bool(self.registered_model.strip()), "registered_model", self.registered_model, "a non-empty name")


@dataclass(frozen=True)
class ProbeConfig:
    """A linear head trained on cached frozen features, its lr/wd picked on a split of train."""

    batch_size: int = 256  # feature extraction
    epochs: int = 100
    lrs: tuple[float, ...] = (1e-3, 1e-2, 1e-1)
    weight_decays: tuple[float, ...] = (0.0, 1e-4, 1e-3)
    val_fraction: float = 0.1
    seed: int = 0
    max_train: int | None = None  # a seeded subset of at most this many train images; null: all
    max_test: int | None = None  # the same for the test split

    def __post_init__(self):
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        _check(self.max_train is None or self.max_train >= 2, "max_train", self.max_train, "null or an integer >= 2")
        _check(self.max_test is None or self.max_test >= 1, "max_test", self.max_test, "null or an integer >= 1")
        _check(self.epochs >= 1, "epochs", self.epochs, "an integer >= 1")
        _check(len(self.lrs) >= 1 and all(v > 0 for v in self.lrs), "lrs", list(self.lrs),
               "a non-empty list of numbers > 0")
        _check(len(self.weight_decays) >= 1 and all(v >= 0 for v in self.weight_decays), "weight_decays",
               list(self.weight_decays), "a non-empty list of numbers >= 0")
        _check(0 < self.val_fraction < 1, "val_fraction", self.val_fraction, "a number in (0, 1)")


@dataclass(frozen=True)
class ClassifierProbeConfig(ProbeConfig):
    """A classification evaluation: the linear probe, plus a k-NN (evals/knn.py) and an attentive probe
    (evals/attentive.py) as second opinions on the same test images."""

    knn: bool = True  # cosine k-NN on the pooled features (DINO): no training, seconds
    knn_k: int = 20
    knn_temperature: float = 0.07  # neighbours vote exp(cos / T)
    # V-JEPA's attentive probe on the last layer's patch tokens, which the feature cache must hold: off in the
    # paper setting (ImageNet-1k at ViT-H/14: 838 GB of tokens; evals/attentive.py refuses more than 32 GiB)
    attentive: bool = False
    attentive_epochs: int = 20
    attentive_weight_decay: float = 0.01  # AdamW's; the grid is lrs x this one value
    attentive_max_train: int | None = None  # a seeded subset of the train images for this probe; null: all

    def __post_init__(self):
        super().__post_init__()
        _check(self.knn_k >= 1, "knn_k", self.knn_k, "an integer >= 1")
        _check(self.knn_temperature > 0, "knn_temperature", self.knn_temperature, "a number > 0")
        _check(self.attentive_epochs >= 1, "attentive_epochs", self.attentive_epochs, "an integer >= 1")
        _check(self.attentive_weight_decay >= 0, "attentive_weight_decay", self.attentive_weight_decay,
               "a number >= 0")
        _check(self.attentive_max_train is None or self.attentive_max_train >= 2, "attentive_max_train",
               self.attentive_max_train, "null or an integer >= 2")


@dataclass(frozen=True)
class DepthProbeConfig(ProbeConfig):
    """NYU depth head: 256-bin classification over [min_depth, max_depth] (DINOv2) or regression."""

    head: Literal["bins", "regression"] = "bins"
    num_bins: int = 256
    min_depth: float = 1e-3
    max_depth: float = 10.0

    def __post_init__(self):
        super().__post_init__()
        _check(self.num_bins >= 2, "num_bins", self.num_bins, "an integer >= 2")
        _check(0 < self.min_depth < self.max_depth, "min_depth", self.min_depth, "0 < min_depth < max_depth")


@dataclass(frozen=True)
class EvaluateConfig:
    """Which encoder the evaluation stages evaluate (pipeline/models/checkpoints.py reads the formats)."""

    encoder: str | None = None  # null: <pretrain.out_dir>/encoder; or a path to any encoder file / folder
    which: Literal["target_encoder", "encoder"] = "target_encoder"  # of an official .pth.tar (paper: target)

    def __post_init__(self):
        _check(self.encoder is None or bool(self.encoder.strip()), "encoder", self.encoder,
               "null or a path to an encoder file or folder")


@dataclass(frozen=True)
class TuneConfig:
    """Ray Tune sweep over the masking and the regulariser; each list is a grid axis (or sampled from,
    `search: random`)."""

    search: Literal["grid", "random"] = "grid"
    num_samples: int = 1  # grid: repeats of the grid, at pretraining seeds pretrain.seed, +1, ...; random: trials
    pred_scale: tuple[tuple[float, float], ...] = ((0.15, 0.2),)
    enc_scale: tuple[tuple[float, float], ...] = ((0.85, 1.0),)
    num_targets: tuple[int, ...] = (4,)
    strategy: tuple[str, ...] = ("multiblock",)
    reg: tuple[str, ...] = ("none",)  # optim.reg per trial, at optim.reg_weight
    epochs: int = 2  # per-trial pretraining budget
    resources_per_trial: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})
    max_concurrent_trials: int = 1
    asha_grace_epochs: int = 1

    def __post_init__(self):
        axes = {"pred_scale": self.pred_scale, "enc_scale": self.enc_scale,
                "num_targets": self.num_targets, "strategy": self.strategy, "reg": self.reg}
        for key, axis in axes.items():
            _check(len(axis) >= 1, key, list(axis), "a non-empty list")
        for i, pair in enumerate(self.pred_scale):
            _check_range(f"pred_scale[{i}]", pair, 0.0, 1.0)
        for i, pair in enumerate(self.enc_scale):
            _check_range(f"enc_scale[{i}]", pair, 0.0, 1.0)
        for s in self.strategy:
            _check(s in MASK_STRATEGIES, "strategy", s, f"each one of {list(MASK_STRATEGIES)}")
        for r in self.reg:
            _check(r in REGULARIZERS, "reg", r, f"each one of {list(REGULARIZERS)}")
        _check(all(n >= 1 for n in self.num_targets), "num_targets", list(self.num_targets), "integers >= 1")
        _check(self.num_samples >= 1, "num_samples", self.num_samples, "an integer >= 1")
        _check(self.epochs >= 1, "epochs", self.epochs, "an integer >= 1")
        _check(self.max_concurrent_trials >= 1, "max_concurrent_trials", self.max_concurrent_trials,
               "an integer >= 1")


@dataclass(frozen=True)
class Config:
    """The whole of params.yaml."""

    preset: str = "paper"
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    eval_linear: ClassifierProbeConfig = field(default_factory=ClassifierProbeConfig)
    eval_semi: ClassifierProbeConfig = field(default_factory=ClassifierProbeConfig)
    eval_clevr: ClassifierProbeConfig = field(default_factory=ClassifierProbeConfig)
    eval_depth: DepthProbeConfig = field(default_factory=DepthProbeConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def __post_init__(self):
        _check(self.preset in PRESETS, "preset", self.preset, f"one of {list(PRESETS)}")
        grid, patch = self.data.image_size, self.model.patch_size
        _check(grid % patch == 0, "data.image_size", grid, f"a multiple of model.patch_size ({patch})")
        # Both regularisers are statistics over each worker's slice of the batch (variances, a normality test).
        per_worker = self.pretrain.batch_size // self.ray.num_workers
        _check(self.optim.reg == "none" or per_worker >= 2, "optim.reg", self.optim.reg,
               f"'none' with {per_worker} image(s) per worker (pretrain.batch_size / ray.num_workers); "
               "a regulariser needs at least 2")
        # dvc.yaml cannot default evaluate.encoder to null, so params.yaml names <out_dir>/encoder: moving
        # out_dir alone would leave the evaluations on a stale encoder from the old folder.
        default_out = PretrainConfig().out_dir
        enc = self.evaluate.encoder
        _check(enc is None or self.pretrain.out_dir == default_out
               or Path(enc) != Path(default_out) / "encoder", "evaluate.encoder", enc,
               f"{self.pretrain.out_dir}/encoder (what pretrain.out_dir = {self.pretrain.out_dir} now holds) "
               "or the path of another encoder; it still names the default out_dir's")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """`{"mask.pred_scale": (0.15, 0.2), ...}`: for MLflow params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and not (prefix.endswith("resources_per_worker")
                                                or prefix.endswith("resources_per_trial")):
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                out[prefix] = value

        walk("", self.to_dict())
        return out

    def hash(self, *sections: str) -> str:
        """A short stable hash of the named sections (all when none): names a run by its params."""
        d = self.to_dict()
        chosen = {k: d[k] for k in sections} if sections else d
        return hashlib.sha256(json.dumps(chosen, sort_keys=True, default=list).encode()).hexdigest()[:12]

    def replace(self, **overrides: Any) -> Config:
        """A copy with dotted keys replaced, validated: `cfg.replace(**{"mask.num_targets": 2})`."""
        d = self.to_dict()
        for dotted, value in overrides.items():
            _set_dotted(d, dotted, value)
        return build(Config, d)


# ------------------------------------------------------------------------------------------- loading

# annotation -> (what an error says is allowed, the check); bool is an int in Python, but not here
_SCALARS: dict[type, tuple[str, typing.Callable[[Any], bool]]] = {
    bool: ("true or false", lambda v: isinstance(v, bool)),
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
    str: ("a string", lambda v: isinstance(v, str)),
}


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return f"one of {list(args)}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is types.NoneType else _type_name(a) for a in args)
    if origin is tuple:
        if args[1:] == (Ellipsis,):
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} ({', '.join(map(_type_name, args))})"
    if origin is dict:
        return "a mapping of names to numbers"
    if dataclasses.is_dataclass(tp):
        return "a mapping (section)"
    if tp in _SCALARS:
        return _SCALARS[tp][0]
    raise TypeError(f"unsupported annotation {tp!r}")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """`value` checked against the annotation `tp`; lists become tuples, ints become floats."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return build(tp, value, key)
    if origin is Literal and value in args:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and types.NoneType in args:
            return None
        for a in (a for a in args if a is not types.NoneType):
            try:
                return _coerce(a, value, key)
            except ConfigError:  # the next alternative; the error names the whole union
                pass
    if origin is tuple and isinstance(value, (list, tuple)):
        items = args[:1] * len(value) if args[1:] == (Ellipsis,) else args
        if len(items) == len(value):  # a wrong item is named by its index
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(items, value, strict=True)))
    if origin is dict and isinstance(value, dict):
        return {str(k): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp in _SCALARS and _SCALARS[tp][1](value):
        return float(value) if tp is float else value
    raise ConfigError(key, value, _type_name(tp))


def build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and bad values."""
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in hints:
            raise ConfigError(f"{prefix}.{key}" if prefix else key, data[key],
                              f"a known key of {prefix or 'the top level'}: {sorted(hints)}")
    kwargs = {name: _coerce(hints[name], value, f"{prefix}.{name}" if prefix else name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:  # __post_init__ names its own field only
        raise e.under(prefix) from None


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
        if not isinstance(d, dict):
            raise ConfigError(dotted, value, "a key inside a section")
    d[leaf] = value


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def from_dict(raw: dict[str, Any] | None) -> Config:
    """Preset values first, then the explicit values of `raw`; validated."""
    raw = dict(raw or {})
    preset = raw.get("preset", "paper")
    if not isinstance(preset, str) or preset not in PRESETS:  # a list or mapping is unhashable: not `in` a dict
        raise ConfigError("preset", preset, f"one of {list(PRESETS)}")
    merged: dict[str, Any] = {}
    for dotted, value in PRESETS[preset].items():
        _set_dotted(merged, dotted, value)
    return build(Config, _deep_merge(merged, raw))


def load_config(path: str | Path = "params.yaml") -> Config:
    """Read and validate params.yaml. Raises ConfigError (one line) or FileNotFoundError."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}", "<unparsable>", "valid YAML") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(str(path), raw, "a mapping of sections")
    return from_dict(raw)
