"""NYU Depth v2 linear head on frozen patch tokens vs a random-init twin and the mean depth.

Stage eval_depth: reads params.yaml, data.root and the encoder `evaluate.encoder` names (pretrain's, or any
file); writes metrics/eval_depth.json and logs an MLflow child run of the encoder's run. The work is in evals/depth.py.
"""

from evals.depth import run
from pipeline.cli import run_stage
from pipeline.config import Config


def main(cfg: Config) -> None:
    metrics = run(cfg)
    print(f"eval_depth: {metrics}")


if __name__ == "__main__":
    run_stage(main, __doc__.splitlines()[0])
