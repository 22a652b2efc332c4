"""Masking ablations (the paper's Tables 6, 8-10) and the anti-collapse regulariser (`tune.reg`: paper
I-JEPA against VICReg / SIGReg) as one Ray Tune sweep: search space, trial configs, table.

    run(cfg, root, score, to_markdown) -> summary   the sweep stage: validate, run (or resume), write outputs

Each trial is a short pretraining with the pretrain stage's own loop (`pipeline.ray_train.build_trainer`),
its mask keys, `optim.reg` and `pretrain.seed` replaced by the trial's values (`trial_config`), for
`tune.epochs` epochs; a grid's `tune.num_samples` repeats are pretraining seeds (`search_axes`).
After every epoch rank 0 scores the target encoder with the `score` the stage passes in
(`evals.sweep_score.ProbeScore`): a linear probe on the pooled features of the 1% train list, top-1 on
val (`probe_top1`, what ASHA compares, higher is better) with its standard error, and RankMe of the val
features (`val_rankme`, label-free). Each trial's worker also scores its own model once at the seeded init,
before training (`init_probe_top1`, ...: `pipeline.train.train_worker`), so each trial's `margin` is over the
random-init level of its seed, measured where the trial runs, and a second table gives each setting's mean
and std over its seeds (`over_seeds`). A sweep is named by the hash of the tune, training and 1%-probe
sections and the records' format (`sweep_name`); rerunning the stage resumes an interrupted sweep and only
rewrites the outputs of a finished one.

Resources. `tune.resources_per_trial` is what one trial's TorchTrainer workers hold together: each of the
`ray.num_workers` workers asks for an equal share (on 2 cores the default {CPU: 1} over 2 workers gives
{CPU: 0.5} each, the layout checked in ENV-NOTES; a worker then runs 1 torch thread). The trial's driver
process only waits on its trainer and holds a token CPU_TRIAL_DRIVER. So `max_concurrent_trials` trials
run at once as long as the cluster has their shares; a trial asking for more than the whole cluster is
refused before any trial starts (`check_resources`).

Outputs (relative to root): reports/sweep.csv, reports/sweep.md, reports/sweep.png (score vs target and
context scale), reports/sweep_masks.png (the strategies), metrics/sweep.json (the best trial); all are
logged to the sweep's parent MLflow run, each trial being a child run with its mask settings as params.
Nothing here imports Ray (`pipeline.ray_tune` does) or the evaluations (the stage passes them in).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import Dataset

from pipeline.atomic import atomic_write, atomic_write_json, atomic_write_text
from pipeline.config import Config, TuneConfig
from pipeline.errors import PipelineError

SCORE = "probe_top1"  # ASHA's metric (mode max): 1% linear probe top-1 on val, in %
# The keys a trial sets: search axis -> the dotted config key it replaces.
AXES = {"strategy": "mask.strategy", "num_targets": "mask.num_targets", "pred_scale": "mask.pred_scale",
        "enc_scale": "mask.enc_scale", "reg": "optim.reg", "seed": "pretrain.seed"}
CONFIG_AXES = tuple(axis for axis in AXES if axis != "seed")  # a trial's setting, seeds aside
SCORE_KEYS = (SCORE, SCORE + "_se", "probe_top5", "val_rankme")  # what the score gives (EpochScore)
INIT = "init_"  # a trial's report carries its seeded init's SCORE_KEYS under this prefix (pipeline.train)
HISTORY_KEYS = ("epoch", "step", "epoch_loss", "rankme", *SCORE_KEYS, *(INIT + k for k in SCORE_KEYS))  # per epoch
SWEEP_SECTIONS = ("tune", "data", "mask", "model", "optim", "pretrain", "eval_semi")
# In the sweep's name: a new value starts a fresh sweep where the trials' records changed (2: the init's score
# in every report), instead of resuming or re-tabulating records that lack it.
RECORD_FORMAT = 2
CPU_TRIAL_DRIVER = 0.01  # the trial's driver only waits on its TorchTrainer; Ray refuses {"CPU": 0}
CSV, MARKDOWN, PLOT, MASKS = (Path("reports") / f for f in ("sweep.csv", "sweep.md", "sweep.png", "sweep_masks.png"))
METRICS_JSON = Path("metrics/sweep.json")


def sweep_name(cfg: Config) -> str:
    """`sweep-<hash>`: the Ray storage folder a rerun resumes from."""
    return f"sweep-{cfg.hash(*SWEEP_SECTIONS)}-r{RECORD_FORMAT}"


# ------------------------------------------------------------------------------------------ the space


def search_axes(tune: TuneConfig, seed: int) -> dict[str, list[Any]]:
    """The axes as plain lists (Tune grid_search / choice values): {"pred_scale": [[0.15, 0.2], ...], ...}.

    `seed` is the pretraining seed axis. A grid's `num_samples` repeats are pretraining seeds `seed`,
    `seed + 1`, ... (the same config and seed would only train the same trial again); a random search
    draws `num_samples` settings, each at `seed`.
    """
    axes = {"strategy": list(tune.strategy), "num_targets": list(tune.num_targets),
            "pred_scale": [list(p) for p in tune.pred_scale], "enc_scale": [list(p) for p in tune.enc_scale],
            "reg": list(tune.reg),
            "seed": [seed + i for i in range(tune.num_samples)] if tune.search == "grid" else [seed]}
    for key, values in axes.items():  # TuneConfig checks this too; a space built by hand may not have been
        if not values:
            raise PipelineError(f"tune.{key} = [] is an empty search axis; expected at least one value")
    return axes


def num_trials(tune: TuneConfig) -> int:
    """Grid: every combination, `num_samples` times each; random: `num_samples` draws."""
    if tune.search == "random":
        return tune.num_samples
    return int(np.prod([len(v) for v in search_axes(tune, 0).values()]))  # the seed axis holds the repeats


def worker_resources(cfg: Config) -> dict[str, float]:
    """One TorchTrainer worker's share of `tune.resources_per_trial`."""
    n = cfg.ray.num_workers
    return {k: v / n for k, v in cfg.tune.resources_per_trial.items() if v > 0}


def check_resources(cfg: Config, cluster: dict[str, float]) -> int:
    """How many trials run at once: `tune.max_concurrent_trials`, capped by what the cluster holds.

    PipelineError (one line) when one trial asks for more of a resource than the whole cluster has.
    """
    need = dict(cfg.tune.resources_per_trial)
    need["CPU"] = need.get("CPU", 0.0) + CPU_TRIAL_DRIVER
    for key, amount in need.items():
        have = float(cluster.get(key, 0.0))
        if amount > have + 1e-9:
            room = max(0.0, have - (CPU_TRIAL_DRIVER if key == "CPU" else 0.0))
            raise PipelineError(f"tune.resources_per_trial.{key} = {cfg.tune.resources_per_trial.get(key, 0):g} "
                                f"is more than the Ray cluster's {have:g} {key} (a trial's driver also holds "
                                f"{CPU_TRIAL_DRIVER:g} CPU); ask for at most {room:g}")
    fits = min(int(float(cluster.get(k, 0.0)) / v + 1e-9) for k, v in need.items() if v > 0)
    return max(1, min(cfg.tune.max_concurrent_trials, fits))


def trial_config(cfg: Config, params: dict[str, Any]) -> Config:
    """The trial's Config: its mask keys and regulariser, a `tune.epochs` schedule, and its share of the
    resources.

    The whole LR / weight-decay / EMA schedule is squeezed into `tune.epochs` (a short run that ends its
    cosine, as the paper's short ablations), not cut out of the pretrain stage's longer schedule.
    """
    over: dict[str, Any] = {key: params[axis] for axis, key in AXES.items() if axis in params}
    unknown = set(params) - set(AXES)
    if unknown:
        raise PipelineError(f"sweep trial params {sorted(unknown)} are not search axes; expected keys of {list(AXES)}")
    res = worker_resources(cfg)
    over.update({"pretrain.epochs": cfg.tune.epochs, "ray.resources_per_worker": res,
                 "ray.use_gpu": cfg.ray.use_gpu or res.get("GPU", 0) > 0})
    return cfg.replace(**over)


def trial_label(params: dict[str, Any]) -> str:
    """A short run name: `multiblock M4 tgt 0.15-0.2 ctx 0.85-1`, then ` sigreg` when a regulariser is on
    and ` seed 1` when the trial has a seed axis."""
    p, c = params["pred_scale"], params["enc_scale"]
    reg = params.get("reg", "none")
    return (f"{params['strategy']} M{params['num_targets']} tgt {p[0]:g}-{p[1]:g} ctx {c[0]:g}-{c[1]:g}"
            + ("" if reg == "none" else f" {reg}") + (f" seed {params['seed']}" if "seed" in params else ""))


# ----------------------------------------------------------------------------------------- the score


class EpochScore(Protocol):
    """The trials' per-epoch score, `(model, epoch) -> {SCORE_KEYS}` (rank 0, after each epoch, and once at
    the seeded init as epoch 0; `evals.sweep_score.ProbeScore`). Picklable: it travels to the Ray workers."""

    def check(self) -> None:
        """Load what it scores on, once, in the driver: missing data fails before any trial starts."""

    def __call__(self, model: nn.Module, epoch: int) -> dict[str, float]: ...


def references_from_trials(trials: Sequence[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """{seed: the random-init figures (SCORE_KEYS) of that pretraining seed}, read from the first trial of
    that seed whose history carries its init's score (every trial of a seed starts from the same seeded
    init, scored by the same deterministic probe). Seeds no trial reported an epoch for are left out."""
    refs: dict[int, dict[str, float]] = {}
    for t in sorted(trials, key=lambda t: t["trial_id"]):
        seed = t["params"].get("seed")
        row = next((h for h in t.get("history", []) if INIT + SCORE in h), None)
        if seed is not None and row is not None and int(seed) not in refs:
            refs[int(seed)] = {k: float(row[INIT + k]) for k in SCORE_KEYS if INIT + k in row}
    return refs


# ----------------------------------------------------------------------------------------- the table


def results_table(trials: Sequence[dict[str, Any]], epochs: int,
                  references: dict[int, dict[str, float]] | None = None) -> pd.DataFrame:
    """One row per trial, best `probe_top1` (at its last epoch) first.

    `seed`: the trial's pretraining seed (empty for records from before the seed axis). `probe_top1_se`:
    the score's binomial standard error on the val images, in points. With `references` ({seed: the
    random-init encoder's figures at that seed}, `references_from_trials`), `margin` is the score minus
    the `probe_top1` of its seed's random init and `margin_se` the standard error of that difference (the
    two errors in quadrature: an unpaired, conservative figure).

    `trials`: [{"trial_id", "params": {AXES...}, "history": [{"epoch", "probe_top1", ...}], "error"?,
    "mlflow_run_id"?}]. A trial that reported fewer than `epochs` epochs was stopped early (by ASHA, or it
    failed: `error` says which).
    """
    rows = []
    for t in trials:
        p, hist = t["params"], [h for h in t.get("history", []) if SCORE in h]
        last = hist[-1] if hist else {}
        rows.append({
            "trial": t["trial_id"], "strategy": p["strategy"], "num_targets": int(p["num_targets"]),
            "pred_scale": _pair(p["pred_scale"]), "enc_scale": _pair(p["enc_scale"]), "reg": p.get("reg", "none"),
            "seed": p.get("seed"),
            SCORE: float(last.get(SCORE, np.nan)), SCORE + "_se": float(last.get(SCORE + "_se", np.nan)),
            "best_" + SCORE: max((h[SCORE] for h in hist), default=np.nan),
            "probe_top5": float(last.get("probe_top5", np.nan)), "val_rankme": float(last.get("val_rankme", np.nan)),
            "train_rankme": float(last.get("rankme", np.nan)), "epoch_loss": float(last.get("epoch_loss", np.nan)),
            "epochs": int(last.get("epoch", 0)), "stopped_early": int(last.get("epoch", 0)) < epochs,
            "error": t.get("error") or "", "mlflow_run_id": t.get("mlflow_run_id") or "",
        })
    df = pd.DataFrame(rows)
    if df.empty:
        raise PipelineError("the sweep produced no trials; expected at least one")
    df["seed"] = df["seed"].astype("Int64")
    if references is not None:
        ref = {key: [references.get(int(s), {}).get(key, np.nan) if pd.notna(s) else np.nan for s in df["seed"]]
               for key in (SCORE, SCORE + "_se")}
        at = df.columns.get_loc(SCORE + "_se") + 1
        df.insert(at, "margin", df[SCORE] - np.array(ref[SCORE]))
        df.insert(at + 1, "margin_se", np.hypot(df[SCORE + "_se"], np.array(ref[SCORE + "_se"])))
    return df.sort_values([SCORE, "epochs", "trial"], ascending=[False, False, True], na_position="last",
                          ignore_index=True)


def over_seeds(df: pd.DataFrame) -> pd.DataFrame:
    """One row per setting (the CONFIG_AXES), best mean first: `seeds` (trials that scored), the mean and
    standard deviation over them of `probe_top1` and, when the table has it, of `margin`."""
    stats = {SCORE: ["count", "mean", "std"]} | ({"margin": ["mean", "std"]} if "margin" in df else {})
    g = df.groupby(list(CONFIG_AXES), sort=False).agg(stats)
    g.columns = ["seeds", SCORE + "_mean", SCORE + "_std"] + (["margin_mean", "margin_std"] if "margin" in df else [])
    g["seeds"] = g["seeds"].astype(int)
    return g.reset_index().sort_values(SCORE + "_mean", ascending=False, na_position="last", ignore_index=True)


def _pair(v: Sequence[float]) -> str:
    return f"({float(v[0]):g}, {float(v[1]):g})"


def _pair_values(s: str) -> tuple[float, float]:
    a, b = s.strip("()").split(",")
    return float(a), float(b)


def _shown(df: pd.DataFrame) -> pd.DataFrame:
    """The table as sweep.md shows it: one row per trial, indexed by it, without the MLflow run ids."""
    return df.drop(columns=["mlflow_run_id"]).set_index("trial")


def score_plot(df: pd.DataFrame, path: str | Path, references: dict[int, dict[str, float]] | None = None) -> Path:
    """Two panels, probe top-1 vs target block scale and vs context block scale (range midpoints, one
    colour per strategy, hollow markers for trials stopped early, error bars of one standard error); a
    dashed line at the random-init encoder's score (mean over the seeds) when `references` are given."""
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2, sharey=True)
    colours = dict(zip(sorted(df["strategy"].unique()), ["C0", "C3", "C2", "C1", "C4"], strict=False))
    for ax, col, what in ((axes[0], "pred_scale", "target block scale"), (axes[1], "enc_scale", "context block scale")):
        ranges = sorted(df[col].unique(), key=_pair_values)
        for strategy, g in df.groupby("strategy"):
            for stopped in (False, True):
                sub = g[g["stopped_early"] == stopped]
                if sub.empty:
                    continue
                x = [np.mean(_pair_values(s)) for s in sub[col]]
                ax.errorbar(x, sub[SCORE], yerr=sub[SCORE + "_se"], fmt="none", ecolor=colours[strategy], alpha=0.5)
                ax.scatter(x, sub[SCORE], s=50, marker="o", edgecolors=colours[strategy],
                           facecolors="none" if stopped else colours[strategy],
                           label=f"{strategy}{' (stopped early)' if stopped else ''}")
        if references:
            ax.axhline(np.mean([r[SCORE] for r in references.values()]), color="grey", ls="--", lw=1,
                       label="random init")
        ax.set_xticks([np.mean(_pair_values(s)) for s in ranges], ranges, rotation=30, fontsize=8)
        ax.set_xlabel(f"{what} range (at its midpoint)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("1% linear probe top-1 (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    axes[1].legend(unique.values(), unique.keys(), fontsize=8, loc="best")
    fig.suptitle("I-JEPA masking sweep: label-efficient score per trial", fontsize=10)
    fig.subplots_adjust(bottom=0.25, wspace=0.05)
    return atomic_write(Path(path), lambda p: fig.savefig(p, dpi=110))


def best_trial(df: pd.DataFrame, references: dict[int, dict[str, float]] | None = None) -> dict[str, Any]:
    """metrics/sweep.json's content: the top row, the best score of each strategy and regulariser (with
    the standard error of that trial's score), each strategy's best setting over the seeds (`over_seeds`),
    every setting over the seeds, the random-init figures per seed when given, the sweep's size."""
    top = df.iloc[0]
    # df is sorted best first (failed trials last): each value's first row is its best trial
    best_of = {axis: df.drop_duplicates(axis).set_index(axis).sort_index() for axis in ("strategy", "reg")}
    out = {"best": {k: _plain(v) for k, v in top.items()},
           "best_by_strategy": {k: float(v) for k, v in best_of["strategy"][SCORE].items()},
           "best_by_strategy_se": {k: float(v) for k, v in best_of["strategy"][SCORE + "_se"].items()},
           "best_by_reg": {k: float(v) for k, v in best_of["reg"][SCORE].items()},  # paper ("none") vs each
           "trials": len(df), "stopped_early": int(df["stopped_early"].sum())}
    settings = over_seeds(df)
    out["mean_by_strategy"] = {r["strategy"]: {k: _plain(v) for k, v in r.items() if k not in CONFIG_AXES}
                               for r in settings.drop_duplicates("strategy").to_dict("records")}
    out["over_seeds"] = [{k: _plain(v) for k, v in r.items()} for r in settings.to_dict("records")]
    if references is not None:
        out["random_init"] = {str(seed): {k: float(v) for k, v in r.items()} for seed, r in sorted(references.items())}
    return out


def _plain(v: Any) -> Any:
    """A numpy / pandas scalar as the JSON-ready Python value (NaN and NA as None)."""
    if v is pd.NA:
        return None
    v = v.item() if hasattr(v, "item") else v
    return None if isinstance(v, float) and v != v else v


def write_outputs(cfg: Config, root: Path, trials: Sequence[dict[str, Any]], grid: tuple[int, int],
                  to_markdown: Callable[[pd.DataFrame], str], references: dict[int, dict[str, float]] | None = None
                  ) -> dict[str, Any]:
    """CSV, markdown, score plot, mask strategies figure and metrics JSON under `root`; returns the table,
    the best-trial summary and the files written. `to_markdown(table)`: the report's table format
    (`evals.report.to_markdown`); `references`: {seed: the random-init encoder's figures} (`references_from_trials`)."""
    from pipeline.viz import mask_strategies_figure

    df = results_table(trials, cfg.tune.epochs, references)
    title = f"I-JEPA masking sweep ({len(df)} trials, {cfg.tune.epochs} epochs each, {cfg.model.name}/" \
            f"{cfg.model.patch_size} at {cfg.data.image_size} px, search {cfg.tune.search})"
    legend = (f"{SCORE}: the 1% linear probe's top-1 on val (%), at the trial's last epoch; {SCORE}_se: its binomial "
              "standard error.")
    if references:
        levels = ", ".join(f"{r[SCORE]:.2f} +- {r.get(SCORE + '_se', float('nan')):.2f} (seed {seed})"
                           for seed, r in sorted(references.items()))
        legend += (f" margin: {SCORE} minus that of the untrained random-init encoder of the trial's seed: {levels};"
                   " margin_se: both errors in quadrature.")
    settings = "## Over pretraining seeds\n\nmean and std over each setting's seeds (`tune.num_samples`).\n\n" + \
        to_markdown(over_seeds(df).set_index(list(CONFIG_AXES)))
    csv = atomic_write(root / CSV, lambda p: df.to_csv(p, index=False))
    md = atomic_write_text(root / MARKDOWN, f"# {title}\n\n{legend}\n\n" + to_markdown(_shown(df)) + "\n" + settings)
    png = score_plot(df, root / PLOT, references)
    masks = mask_strategies_figure(cfg.mask, grid, root / MASKS)
    summary = best_trial(df, references)
    js = atomic_write_json(root / METRICS_JSON, summary, sort_keys=False, default=str)
    return {"table": df, "summary": summary, "files": [csv, md, png, masks, js]}


# --------------------------------------------------------------------------------------------- stage


def run(cfg: Config, root: str | Path | None, score: EpochScore, to_markdown: Callable[[pd.DataFrame], str],
        dataset_fn: Callable[[], Dataset] | None = None) -> dict[str, Any]:
    """The sweep stage: run or resume the trials on Ray, write and log the outputs; returns the summary.

    `score` rates each trial's epochs (`evals.sweep_score.probe_score(cfg, root)`; tests pass one on tiny
    data); `to_markdown` formats reports/sweep.md (`write_outputs`). `dataset_fn` (pretraining images)
    defaults to the configured data. Bad input (an empty axis, a resource the cluster lacks, missing data,
    an unreachable MLflow) fails in one line before any trial starts.
    """
    from pipeline import ray_tune, tracking  # lazy: Ray and MLflow only for a real run
    from pipeline.batches import pretrain_dataset

    root = Path(root or Path.cwd()).resolve()
    space = search_axes(cfg.tune, cfg.pretrain.seed)  # an empty axis fails here
    if cfg.tune.asha_grace_epochs > cfg.tune.epochs:
        raise PipelineError(f"tune.asha_grace_epochs = {cfg.tune.asha_grace_epochs} is more than tune.epochs = "
                            f"{cfg.tune.epochs}; expected at most the per-trial budget")
    trial_config(cfg, {k: v[0] for k, v in space.items()})  # a bad combination fails here
    tracking.connect(cfg.mlflow, root)
    dataset_fn = dataset_fn or functools.partial(pretrain_dataset, cfg, str(root))
    dataset_fn()  # missing data: one line here, not inside a Ray worker
    score.check()
    spec = ray_tune.SweepSpec(name=sweep_name(cfg), space=space, trial_config=trial_config,
                              label=trial_label, concurrency=check_resources, dataset_fn=dataset_fn, score=score,
                              metric=SCORE, history_keys=HISTORY_KEYS, driver_resources={"CPU": CPU_TRIAL_DRIVER})
    trials, parent_run_id = ray_tune.tune_sweep(cfg, root, spec)
    references = references_from_trials(trials)
    grid = (cfg.data.image_size // cfg.model.patch_size,) * 2
    out = write_outputs(cfg, root, trials, grid, to_markdown, references)
    with tracking.pipeline_run(cfg, "sweep", run_id=parent_run_id, root=root):
        summary = out["summary"]
        tracking.log_metrics({"best_" + SCORE: summary["best"][SCORE], "trials": summary["trials"],
                              "stopped_early": summary["stopped_early"],
                              **{f"random_init_{k}": float(np.mean([r[k] for r in references.values()]))
                                 for k in SCORE_KEYS if references and all(k in r for r in references.values())}})
        for f in out["files"]:
            tracking.log_artifact(f)
    print("# sweep\n\n" + to_markdown(_shown(out["table"])))
    return {**summary, "mlflow_run_id": parent_run_id, "sweep_name": sweep_name(cfg)}
