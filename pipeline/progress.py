"""Progress bars for every long step: tqdm on an interactive terminal, silent in CI and in pipes."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm


def enabled() -> bool:
    """True on a TTY unless CI is set (CI=true / CI=1) or IJEPA_PROGRESS=0."""
    if os.environ.get("IJEPA_PROGRESS", "").lower() in ("0", "false", "no"):
        return False
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        return False
    return sys.stderr.isatty()


def progress(iterable: Iterable[Any] | None = None, desc: str = "", total: int | None = None, **kw: Any) -> tqdm:
    """`tqdm(iterable, desc, total)` that is disabled when `enabled()` is False; use `.set_postfix` freely."""
    return tqdm(iterable, desc=desc, total=total, disable=not enabled(), dynamic_ncols=True, leave=False, **kw)
