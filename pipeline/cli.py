"""Shared entry logic of the DVC stages: load params, run, turn bad input into one line + exit 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from pipeline.config import Config, load_config
from pipeline.errors import PipelineError

EXIT_BAD_INPUT = 2


def run_stage(main: Callable[[Config], None], description: str, argv: list[str] | None = None) -> None:
    """Parse `--params`, load and validate the config, call `main(cfg)`.

    A `PipelineError` (bad params, missing data, ...) prints `error: <one line>` to stderr and exits 2
    before or instead of writing outputs; other exceptions keep their traceback (they are bugs).
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.params)
        main(cfg)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except FileNotFoundError as e:
        print(f"error: {e.filename or e}: no such file", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
