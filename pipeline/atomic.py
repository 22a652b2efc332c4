"""Files and folders that appear whole or not at all: written to a temporary sibling, then renamed.

A killed stage leaves at most a hidden `.<name>.*` sibling, never a half-written output that a later
step would take for complete. Files and folders get the modes an ordinary `open()` / `mkdir()` gives under
the process's umask (0644 / 0755 by default), not the 0600 / 0700 of `mkstemp` / `mkdtemp`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` fills a temporary sibling of `path`, which then replaces `path`; returns `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary keeps the suffix: writers that infer the format from it (savefig, to_csv) work.
    fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_write_json(path: str | Path, obj: Any, **dump: Any) -> Path:
    """JSON, indented and key-sorted unless `dump` says otherwise, with a final newline."""
    kw = {"indent": 2, "sort_keys": True, **dump}
    return atomic_write_text(path, json.dumps(obj, **kw) + "\n")


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """`with atomic_dir(out) as tmp:` fill `tmp`; on leaving the block it replaces `out` (an old `out` is
    removed first); on an exception `out` is untouched and `tmp` removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
