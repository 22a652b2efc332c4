"""Stage `sweep`: Ray Tune sweep over the masking (target/context block scale, number of targets, strategy).

Each trial pretrains for `tune.epochs` with the pretrain stage's loop and is scored every epoch by a linear
probe on the 1% split (ASHA stops the weak ones); MLflow holds a parent run and one child run per trial.
An interrupted sweep resumes (Tuner.restore); a finished one only rewrites its outputs. Outs:
reports/sweep.csv, reports/sweep.md, reports/sweep.png, reports/sweep_masks.png, metrics/sweep.json.
The work is in pipeline/sweep.py; the score (evals/sweep_score.py) and the table format (evals/report.py)
come from the evaluations.
"""

from pathlib import Path

from evals.report import to_markdown
from evals.sweep_score import probe_score
from pipeline.cli import run_stage
from pipeline.config import Config
from pipeline.sweep import run


def main(cfg: Config) -> None:
    root = Path.cwd()
    summary = run(cfg, root, probe_score(cfg, root), to_markdown)
    print(f"sweep: best {summary['best']['trial']} probe_top1 {summary['best']['probe_top1']:.2f} "
          f"({summary['trials']} trials, {summary['stopped_early']} stopped early)")


if __name__ == "__main__":
    run_stage(main, __doc__.splitlines()[0])
