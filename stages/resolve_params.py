"""Stage `params`: validate params.yaml and write the fully resolved config (preset applied).

Out: reports/params.resolved.json, what every later stage will actually use, with its hash.
"""

import json
from pathlib import Path

from pipeline.atomic import atomic_write_text
from pipeline.cli import run_stage
from pipeline.config import Config

OUT = Path("reports/params.resolved.json")


def main(cfg: Config) -> None:
    # atomic: never a half-written file where dvc expects a finished one
    atomic_write_text(OUT, json.dumps({"hash": cfg.hash(), "config": cfg.to_dict()}, indent=2, default=list) + "\n")
    print(f"params ok (preset {cfg.preset}, hash {cfg.hash()}) -> {OUT}")


if __name__ == "__main__":
    run_stage(main, __doc__.splitlines()[0])
