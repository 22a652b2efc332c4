"""What every evaluation run shares: the two encoders, the MLflow parent run, the metrics file.

`prepare(cfg, root)` checks everything an evaluation needs before any work (the saved encoder and its
architecture against the params, the pretrain run id), so bad input fails in one line and writes no
metrics. `finish(...)` writes `metrics/<name>.json` atomically, then logs a child run of the pretrain
run with the chosen hyper-parameters as params and every figure as a metric.

Metrics files are nested JSON, which `dvc metrics show` flattens into dotted columns:

    {"ijepa": {"last": {"top1": 71.2, "top5": 99.1}, "last4": {...}}, "random": {...},
     "paired": {"last": {"top1": {"margin": 1.75, "ci95_low": ..., "p_value": 0.26, ...}}, ...}}

`split_results` builds that from the two encoders' results: the "paired" section (`evals.paired`)
compares them item by item on the same test images.

Accuracies are in %, depth errors in metres (rmse) or unitless (abs_rel, log10, d1..d3 as fractions).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from evals.paired import pair_up
from pipeline.atomic import atomic_write_json
from pipeline.config import ClassifierProbeConfig, Config, ProbeConfig
from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from pipeline.models.encoder import Encoder

# MLflow and timm are imported where used: they take seconds to import, and the pure functions here
# (and the modules that use them, and their tests) need neither.

METRICS_DIR = "metrics"
CACHE_DIR = Path(".cache") / "features"
HPARAM_KEYS = ("lr", "weight_decay", "selection_folds")  # chosen, or how: MLflow params, not metrics
ENCODERS = ("ijepa", "random")  # the pretrained target encoder and its random-init twin
DIAGNOSTICS = "diagnostics"  # eval_linear's section of representation statistics per encoder (no probe)


@dataclass
class EvalContext:
    root: Path
    encoders: dict[str, Encoder]  # "ijepa", "random"
    run_id: str
    cache_dir: Path
    device: torch.device
    source: dict[str, Any]  # the evaluated encoder's description: model, image_size, format, which, ...


def device() -> torch.device:
    """Where the encoders run and the probes' heads train: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_architecture(meta: dict, cfg: Config, where: str) -> None:
    """PipelineError naming both sides when the saved encoder is not the one params.yaml describes."""
    model = meta.get("model", {})
    saved = (model.get("name"), model.get("patch_size"), meta.get("image_size"))
    wanted = (cfg.model.name, cfg.model.patch_size, cfg.data.image_size)
    if saved != wanted:
        raise PipelineError(f"encoder {where} is {saved[0]}/{saved[1]} at {saved[2]} px but params.yaml says "
                            f"model.name={wanted[0]}, model.patch_size={wanted[1]}, data.image_size={wanted[2]}; "
                            "rerun pretrain or fix params.yaml")


def random_encoder(cfg: Config) -> Encoder:
    """The baseline: the same architecture, random init seeded by pretrain.seed, frozen."""
    from pipeline.models.encoder import build_encoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.pretrain.seed)
        enc = build_encoder(cfg.model, cfg.data.image_size)
    return enc.eval().requires_grad_(False)


def encoder_source(cfg: Config, root: Path) -> Path:
    """The encoder to evaluate: `evaluate.encoder` (relative to the repo root), or the pretrain stage's output."""
    from pipeline.models.io import ENCODER_DIR

    if cfg.evaluate.encoder is None:
        return root / cfg.pretrain.out_dir / ENCODER_DIR
    return root / Path(cfg.evaluate.encoder).expanduser()


def _source_key(source: Path, which: str) -> str:
    """Names an external encoder for MLflow without reading its weights: its files' paths, sizes, mtimes."""
    files = sorted(p for p in source.iterdir() if p.is_file()) if source.is_dir() else [source]
    h = hashlib.sha256(which.encode())
    for p in files:
        st = p.stat()
        h.update(f"|{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def parent_run(cfg: Config, root: Path, source: Path) -> str:
    """The MLflow run the evaluations of `source` log into: the pretrain run that made it (named in its
    model.json, or the run_id.txt beside it) when this store knows that run, else a run of its own."""
    from pipeline import tracking
    from pipeline.models.io import META, encoder_meta

    tracking.connect(cfg.mlflow, root)
    run_id = None
    if (source / META).is_file():
        run_id = encoder_meta(source).get("mlflow_run_id")
        if run_id is None and (source.parent / tracking.RUN_ID_FILE).is_file():
            run_id = tracking.read_run_id(source.parent / tracking.RUN_ID_FILE)
    if run_id is not None and tracking.run_status(str(run_id)) is not None:
        return str(run_id)
    params = {"evaluate.encoder": str(source), "evaluate.which": cfg.evaluate.which, "model.name": cfg.model.name,
              "model.patch_size": cfg.model.patch_size, "data.image_size": cfg.data.image_size}
    return tracking.encoder_run(cfg.mlflow, root, _source_key(source, cfg.evaluate.which),
                                f"evaluate {source.name}", params)


def prepare(cfg: Config, root: str | Path | None = None) -> EvalContext:
    """Load the encoder to evaluate (checked against params), build the baseline, find the MLflow run."""
    from pipeline.models.checkpoints import load_any_encoder
    from pipeline.models.io import ENCODER_DIR

    root = Path.cwd() if root is None else Path(root)
    source = encoder_source(cfg, root)
    if not source.exists():
        own = source.resolve() == (root / cfg.pretrain.out_dir / ENCODER_DIR).resolve()
        raise PipelineError(f"{source}: no saved encoder; " + ("run the pretrain stage first (dvc repro pretrain)"
                            if own else "evaluate.encoder names no file or folder"))
    encoder, meta = load_any_encoder(source, cfg.evaluate.which)
    check_architecture(meta, cfg, str(source))
    run_id = parent_run(cfg, root, source)
    dev = device()
    encoders = {"ijepa": encoder.to(dev), "random": random_encoder(cfg).to(dev)}
    return EvalContext(root, encoders, run_id, root / CACHE_DIR, dev, meta)


def prefetch(ctx: EvalContext, datasets: list[Dataset], cfg: ProbeConfig, *, tokens: bool = False,
             pooled: bool = True, baselines: dict[str, nn.Module] | None = None, num_workers: int = 0) -> None:
    """Fill the feature cache for `datasets`, one pass over each: every image is read and decoded once for
    both encoders (and the `baselines`, pooled), not once per encoder and kind. The probes then read it.

    `tokens` (patch tokens of both encoders) is checked against the attentive probe's token budget first.
    """
    from evals.attentive import check_token_budget
    from evals.features import extract_jobs, weights_hash

    kinds = (("pooled",) if pooled else ()) + (("tokens",) if tokens else ())
    if tokens:
        enc = ctx.encoders["ijepa"]
        check_token_budget(sum(len(ds) for ds in datasets), enc.num_patches, enc.embed_dim)
    jobs = {**{n: (e, kinds) for n, e in ctx.encoders.items()},
            **{n: (m, ("pooled",)) for n, m in (baselines or {}).items()}}
    hashes = {n: weights_hash(m) for n, (m, _) in jobs.items()}  # once, not once per dataset (ViT-H: seconds)
    for i, ds in enumerate(datasets):
        extract_jobs(jobs, ds, batch_size=cfg.batch_size, cache_dir=ctx.cache_dir, num_workers=num_workers,
                     desc=f"features {i + 1}/{len(datasets)}", encoder_hashes=hashes)


def whole_split_tokens(cfg: ClassifierProbeConfig) -> bool:
    """Whether the attentive probe of `cfg` reads the patch tokens of every train image (no subset)."""
    return cfg.attentive and cfg.attentive_max_train is None


def limit(ds: Dataset, cap: int | None, seed: int) -> Dataset:
    """At most `cap` items of `ds`: a seeded random choice kept in dataset order (all when cap is None)."""
    if cap is None or cap >= len(ds):
        return ds
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:cap].sort().values
    return Subset(ds, idx.tolist())


def split_hparams(result: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """{"last": {"top1", "lr", ...}} -> (figures, chosen hyper-parameters), both nested alike."""
    figures, chosen = {}, {}
    for k, v in result.items():
        if isinstance(v, dict):
            figures[k], chosen[k] = split_hparams(v)
            if not chosen[k]:
                del chosen[k]
        elif k in HPARAM_KEYS:
            chosen[k] = v
        else:
            figures[k] = v
    return figures, chosen


def split_results(results: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """{"ijepa": ..., "random": ...}, leaves holding per-item results (`evals.paired.PER_ITEM`) ->
    (figures plus their "paired" comparison, chosen hyper-parameters): what a stage writes and logs."""
    paired = pair_up(results)
    figures, chosen = split_hparams(results)
    figures["paired"] = paired
    return figures, chosen


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        out.update(flatten(v, key) if isinstance(v, dict) else {key: v})
    return out


def write_json(obj: Any, path: Path) -> Path:
    """Atomic JSON write (a temporary sibling, then a rename; 0644 under the default umask)."""
    return atomic_write_json(path, obj)


def finish(cfg: Config, ctx: EvalContext, name: str, metrics: dict[str, Any], params: dict[str, Any],
           artifacts: list[Path] = ()) -> Path:
    """Write metrics/<name>.json and log the child run `name` of the pretrain run; returns the json path."""
    from pipeline import tracking

    params = {**params, "encoder": {"path": str(encoder_source(cfg, ctx.root)), "format": ctx.source.get("format"),
                                    "which": ctx.source.get("which")}}
    path = write_json(metrics, ctx.root / METRICS_DIR / f"{name}.json")
    tracking.connect(cfg.mlflow, ctx.root)
    with tracking.child_run(ctx.run_id, name, flatten(params)):
        tracking.log_metrics({k: v for k, v in flatten(metrics).items() if v == v})  # NaN: not logged
        tracking.log_artifact(path)
        for a in artifacts:
            tracking.log_artifact(a)
    return path


def section_params(section: Any, prefix: str) -> dict[str, Any]:
    """A config section as {"eval_linear.epochs": 60, ...} for the child run's params."""
    return {f"{prefix}.{k}": v for k, v in vars(section).items()}
