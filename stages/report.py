"""Report: one table of every evaluation, I-JEPA vs random init, both views, margins.

Stage report: reads metrics/eval_*.json and `evaluate.encoder`; writes reports/evals.{csv,md,png} and logs
them to the encoder's MLflow run. The work is in evals/report.py.
"""

from evals.report import run
from pipeline.cli import run_stage
from pipeline.config import Config


def main(cfg: Config) -> None:
    table = run(cfg)
    print(table.to_string(float_format=lambda v: f"{v:.4g}"))


if __name__ == "__main__":
    run_stage(main, __doc__.splitlines()[0])
