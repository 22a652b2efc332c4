"""CLEVR count_all and closest_object_distance probes, frozen encoder vs a random-init twin.

Stage eval_clevr: reads params.yaml, models/encoder/ and models/run_id.txt (pretrain's outputs); writes
metrics/eval_clevr.json and logs an MLflow child run of the pretrain run. The work is in evals/clevr.py.
"""

from evals.clevr import run
from pipeline.cli import run_stage
from pipeline.config import Config


def main(cfg: Config) -> None:
    metrics = run(cfg)
    print(f"eval_clevr: {metrics}")


if __name__ == "__main__":
    run_stage(main, __doc__.splitlines()[0])
