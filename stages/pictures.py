"""Pictures: mask overlays, every masking strategy, PCA feature maps of the I-JEPA and random encoders.

Stage pictures: reads params.yaml, data.root and `evaluate.encoder`; writes reports/masks.png,
reports/mask_strategies.png, reports/pca_ijepa.png and reports/pca_random.png and logs them to MLflow.
The work is in evals/pictures.py.
"""

from evals.pictures import run
from pipeline.cli import run_stage
from pipeline.config import Config


def main(cfg: Config) -> None:
    for path in run(cfg):
        print(f"pictures: {path}")


if __name__ == "__main__":
    run_stage(main, __doc__.splitlines()[0])
