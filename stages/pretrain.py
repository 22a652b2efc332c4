"""Stage `pretrain`: I-JEPA pretraining on Ray Train (local Ray, or `ray.address`), tracked in MLflow.

Resumes from the last checkpoint of the same params (Ray storage `ray.storage_path`); a finished run is
not retrained, its outputs are written again. Outs: `<pretrain.out_dir>/encoder/` (target encoder),
`<pretrain.out_dir>/run_id.txt` (the MLflow run the evaluations log into), `metrics/pretrain.json`,
`metrics/pretrain_curve.csv` (plot) and `reports/pretrain_curves.png`.
"""

from pathlib import Path

from pipeline.cli import run_stage
from pipeline.config import Config
from pipeline.pretrain import run


def main(cfg: Config) -> None:
    run(cfg, Path.cwd())


if __name__ == "__main__":
    run_stage(main, __doc__.splitlines()[0])
