"""The evaluation report: one table of every figure, I-JEPA vs the random-init encoder, both views.

Rows are (evaluation, metric), the linear probe's first; columns

    ijepa.last  ijepa.last4  random.last  random.last4  margin.last  margin.last4  p.last  p.last4  baseline

`margin` is I-JEPA minus random for higher-is-better figures (accuracies, d1..d3) and random minus
I-JEPA for errors (abs_rel, rmse, log10): positive always means that pretraining helped. `p` is the
two-sided p-value of the margin, the two encoders' probes being paired on the same val items
(`evals.paired`, from the metrics files' "paired" section): McNemar for top-1, the sign test over
images for depth AbsRel; above 0.05 the margin is noise. `baseline`
holds a figure-specific baseline: the same probe on 16x16 downscaled pixels for the classification
evaluations (`evals.pixels`: does the encoder beat the pixels, not only noise?), the train-mean depth map
for depth. Depth has a
single view (patch tokens + pooled token of the last layer), filed under "last".

The classification evaluations hold three probes; the metric names which (the metrics files nest the
second and third under each encoder as "attentive" and "knn", `evals.attentive`, `evals.knn`):

    top1, top5                      the linear probe on the pooled views (last, last4); baseline: pixels
    attentive_top1, attentive_top5  V-JEPA's attentive probe on the last layer's patch tokens: .last only
    knn_top1, knn_top5              cosine k-NN (DINO's weighted vote) on the pooled views (last, last4)

Written as reports/evals.csv, reports/evals.md and reports/evals.png, then logged into the pretrain MLflow
run as the child run "report".
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from evals import attentive, common, knn
from evals.depth import LOWER_IS_BETTER
from evals.features import VIEWS
from pipeline.atomic import atomic_write, atomic_write_text
from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.viz import table_image

NAME = "report"
EVALS = {"eval_linear": "linear", "eval_semi": "semi_1pct", "eval_clevr": "clevr", "eval_depth": "depth"}
REPORT_DIR = "reports"
PAIRED = "paired"  # the metrics files' section of paired statistics (evals.paired); p-values go to p.<view>
PROBES = (attentive.NAME, knn.NAME)  # sections beside the linear probe's views; rows in this order after its own
COLUMNS = ([f"{e}.{v}" for e in common.ENCODERS for v in VIEWS] + [f"margin.{v}" for v in VIEWS]
           + [f"p.{v}" for v in VIEWS] + ["baseline"])


def _leaves(d: dict[str, Any], path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], float]]:
    out = []
    for k, v in d.items():
        out += _leaves(v, (*path, k)) if isinstance(v, dict) else [((*path, k), float(v))]
    return out


def _row(label: str, task: list[str], metric: str) -> tuple[str, str, int]:
    """(evaluation, metric, probe rank) of a figure: the section of a probe other than the linear one
    (PROBES) becomes a prefix of the metric, ranked after the linear probe's figures."""
    if task and task[-1] in PROBES:
        *task, probe = task
        return ".".join([label, *task]), f"{probe}_{metric}", 1 + PROBES.index(probe)
    return ".".join([label, *task]), metric, 0


def build_table(results: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """{"eval_linear": <metrics json>, ...} -> DataFrame indexed by (evaluation, metric), COLUMNS as above."""
    cells: dict[tuple[str, str], dict[str, float]] = {}
    pvalues: dict[tuple[str, str], dict[str, float]] = {}
    rank: dict[tuple[str, str], int] = {}
    for stage, doc in results.items():
        label = EVALS.get(stage, stage)
        for top, sub in doc.items():
            if top == common.DIAGNOSTICS:  # not a probe figure: its own table (diagnostics_table)
                continue
            for path, value in _leaves(sub):
                if top == PAIRED:  # (task..., view, figure, stat): the figure's row gets p.<view>
                    *task, view, figure, stat = path
                    if stat == "p_value":
                        pvalues.setdefault(_row(label, task, figure)[:2], {})[f"p.{view}"] = value
                    continue
                if top in common.ENCODERS:
                    *task, view, metric = path
                else:  # a baseline (raw pixels, the train-mean depth map): no view level
                    *task, metric = path
                evaluation, metric, probe_rank = _row(label, task, metric)
                rank[evaluation, metric] = probe_rank
                row = cells.setdefault((evaluation, metric), {})
                row[f"{top}.{view}" if top in common.ENCODERS else "baseline"] = value
    for row, ps in pvalues.items():  # only onto figures the files hold
        if row in cells:
            cells[row].update(ps)
    first = {e: i for i, e in enumerate(dict.fromkeys(e for e, _ in cells))}
    cells = {r: cells[r] for r in sorted(cells, key=lambda r: (first[r[0]], rank[r]))}  # stable: file order
    table = pd.DataFrame.from_dict(cells, orient="index").reindex(columns=COLUMNS)
    table.index = pd.MultiIndex.from_tuples(table.index, names=["evaluation", "metric"])
    sign = pd.Series([-1.0 if m in LOWER_IS_BETTER else 1.0 for _, m in table.index], index=table.index)
    for v in VIEWS:
        table[f"margin.{v}"] = sign * (table[f"ijepa.{v}"] - table[f"random.{v}"])
    return table


def diagnostics_table(results: dict[str, dict[str, Any]]) -> pd.DataFrame | None:
    """{encoder: {rankme, feature_std, position_share, image_share}} of the metrics files -> a DataFrame
    indexed by (evaluation, encoder); None when no file has a diagnostics section."""
    rows = {(EVALS.get(stage, stage), enc): stats for stage, doc in results.items()
            for enc, stats in doc.get(common.DIAGNOSTICS, {}).items()}
    if not rows:
        return None
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index = pd.MultiIndex.from_tuples(table.index, names=["evaluation", "encoder"])
    return table


def to_markdown(table: pd.DataFrame, digits: int = 4) -> str:
    """A GitHub markdown table; NaN as "-"."""
    flat = table.reset_index()

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "-" if math.isnan(v) else f"{v:.{digits}g}"
        return str(v)

    lines = ["| " + " | ".join(map(str, flat.columns)) + " |",
             "|" + "|".join("---" if i < 2 else "---:" for i in range(flat.shape[1])) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in flat.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def read_metrics(root: Path) -> dict[str, dict[str, Any]]:
    """Every metrics/eval_*.json present; PipelineError when there is none."""
    out = {}
    for stage in EVALS:
        path = root / common.METRICS_DIR / f"{stage}.json"
        if path.is_file():
            out[stage] = json.loads(path.read_text())
    if not out:
        raise PipelineError(f"{root / common.METRICS_DIR}: no eval_*.json; run the evaluation stages first")
    return out


def write_report(table: pd.DataFrame, out_dir: Path, diagnostics: pd.DataFrame | None = None) -> list[Path]:
    """evals.csv, evals.md (with the `diagnostics` table when given) and evals.png under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv, md = out_dir / "evals.csv", out_dir / "evals.md"
    atomic_write(csv, lambda tmp: table.to_csv(tmp, float_format="%.6g"))
    intro = ("# Downstream evaluations: I-JEPA vs random init\n\nmargin > 0: pretraining helped "
             "(errors: random - I-JEPA). Accuracies in %, rmse in metres. p: paired test of the margin on "
             "the same val images (McNemar for top-1, sign test for AbsRel); p > 0.05: within noise. baseline: "
             "the same probe on 16x16 downscaled pixels (classification), the train-mean depth map (depth). "
             "top1/top5: linear probe; attentive_*: attentive probe on the last layer's patch tokens; knn_*: "
             "cosine k-NN on the pooled features.\n\n")
    atomic_write_text(md, intro + to_markdown(table) + _diagnostics_markdown(diagnostics))
    return [csv, md, table_image(table, out_dir / "evals.png", title="I-JEPA vs random-init encoder")]


def _diagnostics_markdown(diagnostics: pd.DataFrame | None) -> str:
    if diagnostics is None:
        return ""
    return ("\n## Representations (val images, last layer; no labels)\n\nrankme: effective rank of the centred "
            "pooled features (1: collapsed); position_share / image_share: share of the patch-feature variance "
            "explained by the patch position / by the image (pipeline/diagnostics.py).\n\n"
            + to_markdown(diagnostics))


def run(cfg: Config, root: str | Path | None = None) -> pd.DataFrame:
    """The report stage: read metrics/eval_*.json, write reports/evals.*, log them to MLflow."""
    from pipeline import tracking  # slow to import; the table functions above do not need it

    root = Path.cwd() if root is None else Path(root)
    run_id = common.parent_run(cfg, root, common.encoder_source(cfg, root))
    results = read_metrics(root)
    table = build_table(results)
    files = write_report(table, root / REPORT_DIR, diagnostics_table(results))
    tracking.connect(cfg.mlflow, root)
    margins = {f"{e}.{m}.margin.{v}": table.loc[(e, m), f"margin.{v}"] for e, m in table.index for v in VIEWS}
    with tracking.child_run(run_id, NAME, {"evaluations": ",".join(sorted(results))}):
        tracking.log_metrics({k: v for k, v in margins.items() if v == v})
        for f in files:
            tracking.log_artifact(f)
    return table
