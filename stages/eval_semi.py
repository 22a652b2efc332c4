"""1% semi-supervised probe of the frozen encoder vs a random-init twin (top-1 on val).

Stage eval_semi: reads params.yaml, data.root and the encoder `evaluate.encoder` names (pretrain's, or any
file); writes metrics/eval_semi.json and logs an MLflow child run of the encoder's run. The work is in evals/semi.py.
"""

from evals.semi import run
from pipeline.cli import run_stage
from pipeline.config import Config


def main(cfg: Config) -> None:
    metrics = run(cfg)
    print(f"eval_semi: {metrics}")


if __name__ == "__main__":
    run_stage(main, __doc__.splitlines()[0])
