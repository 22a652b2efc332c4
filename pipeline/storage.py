"""Run storage on a local folder or an object store (`s3://bucket/prefix`), through `pyarrow.fs`.

`pyarrow.fs` is the layer Ray Train itself stores checkpoints with, so the pretrain stage's own files
(state, NaN stop, worker PIDs) sit beside Ray's in the same place, and every node reaches them alike.
Credentials and a custom endpoint come from the standard variables that pyarrow, boto3 and DVC all
read: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL`
(e.g. `http://minio-host:9000` for MinIO or another S3-compatible server).

A location is a string: an object-store URI, or an absolute local path (`resolve` makes one).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs as pafs

from pipeline.atomic import atomic_write_text


def scheme(location: str | Path) -> str | None:
    """`"s3"` for `s3://bucket/x`, None for a local path."""
    head, sep, _ = str(location).partition("://")
    return head if sep else None


def is_uri(location: str | Path) -> bool:
    return scheme(location) is not None


def resolve(root: Path, location: str | Path) -> str:
    """An object-store URI unchanged; a local path made absolute against `root`."""
    if is_uri(location):
        return str(location).rstrip("/")
    path = Path(location)
    return str((path if path.is_absolute() else root / path).resolve())


def join(location: str, *parts: str) -> str:
    if is_uri(location):
        return "/".join([location.rstrip("/"), *parts])
    return str(Path(location, *parts))


def _fs(location: str) -> tuple[pafs.FileSystem, str]:
    if not is_uri(location):
        return pafs.LocalFileSystem(), location
    return pafs.FileSystem.from_uri(location)


def problem(location: str) -> str | None:
    """Why `location` cannot hold a run (the store unreachable, no such bucket, refused), None if it can."""
    if not is_uri(location):
        return None
    try:
        fs, path = _fs(location)
        bucket = path.split("/")[0]
        if fs.get_file_info(bucket).type != pafs.FileType.Directory:
            return f"there is no bucket {bucket!r}"
    except (OSError, ValueError) as e:
        return str(e).splitlines()[0]
    return None


def read_text(location: str) -> str | None:
    """The file's text, None when there is none."""
    fs, path = _fs(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def write_text(location: str, text: str) -> None:
    """Write the whole file at once: an object is replaced in one PUT; a local file by a rename, so a
    reader never sees half of it."""
    fs, path = _fs(location)
    if isinstance(fs, pafs.LocalFileSystem):
        atomic_write_text(path, text)
        return
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def delete(location: str) -> None:
    """Remove a file; nothing when there is none."""
    fs, path = _fs(location)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def is_dir(location: str) -> bool:
    """A folder (on an object store: a prefix with objects under it)."""
    if not location:
        return False
    fs, path = _fs(location)
    return fs.get_file_info(path).type == pafs.FileType.Directory


@contextlib.contextmanager
def local_dir(location: str) -> Iterator[Path]:
    """The folder on local disk: a local one as it is, an object-store one downloaded into a temporary
    folder for the duration of the block."""
    fs, path = _fs(location)
    if isinstance(fs, pafs.LocalFileSystem):
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="ijepa-storage-") as d:
        pafs.copy_files(path, d, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield Path(d)
