"""NYU Depth v2 linear head on frozen patch tokens vs a random-init twin and the mean depth.

Stage eval_depth: reads params.yaml, models/encoder/ and models/run_id.txt (pretrain's outputs); writes
metrics/eval_depth.json and logs an MLflow child run of the pretrain run. The work is in evals/depth.py.
"""

from evals.depth import run
from pipeline.cli import run_stage
from pipeline.config import Config


def main(cfg: Config) -> None:
    metrics = run(cfg)
    print(f"eval_depth: {metrics}")


if __name__ == "__main__":
    run_stage(main, __doc__.splitlines()[0])
