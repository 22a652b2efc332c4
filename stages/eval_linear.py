"""Linear probe of the frozen encoder vs a random-init twin (top-1/top-5 on val, both views).

Stage eval_linear: reads params.yaml, data.root and the encoder `evaluate.encoder` names (pretrain's, or any
file); writes metrics/eval_linear.json and logs an MLflow child run of the encoder's run. The work: evals/linear.py.
"""

from evals.linear import run
from pipeline.cli import run_stage
from pipeline.config import Config


def main(cfg: Config) -> None:
    metrics = run(cfg)
    print(f"eval_linear: {metrics}")


if __name__ == "__main__":
    run_stage(main, __doc__.splitlines()[0])
