"""CLEVR count_all and closest_object_distance probes, frozen encoder vs a random-init twin.

Stage eval_clevr: reads params.yaml, data.root and the encoder `evaluate.encoder` names (pretrain's, or any
file); writes metrics/eval_clevr.json and logs an MLflow child run of the encoder's run. The work is in evals/clevr.py.
"""

from evals.clevr import run
from pipeline.cli import run_stage
from pipeline.config import Config


def main(cfg: Config) -> None:
    metrics = run(cfg)
    print(f"eval_clevr: {metrics}")


if __name__ == "__main__":
    run_stage(main, __doc__.splitlines()[0])
