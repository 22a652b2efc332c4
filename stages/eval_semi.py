"""1% semi-supervised probe of the frozen encoder vs a random-init twin (top-1 on val).

Stage eval_semi: reads params.yaml, models/encoder/ and models/run_id.txt (pretrain's outputs); writes
metrics/eval_semi.json and logs an MLflow child run of the pretrain run. The work is in evals/semi.py.
"""

from evals.semi import run
from pipeline.cli import run_stage
from pipeline.config import Config


def main(cfg: Config) -> None:
    metrics = run(cfg)
    print(f"eval_semi: {metrics}")


if __name__ == "__main__":
    run_stage(main, __doc__.splitlines()[0])
