"""The DVC remote on an object store, as the README sets it up (`dvc remote add -d` + `endpointurl`):
`dvc push` from one clone and `dvc pull` into a fresh clone restore the same files, byte for byte.
The store is a real S3-compatible server on 127.0.0.1 (moto_server, fixture `s3_bucket`)."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest

pytest.importorskip("dvc_s3", reason="dvc-s3 is not installed (pip install dvc-s3): DVC cannot use s3:// remotes")

DVC = str(Path(sys.executable).with_name("dvc"))
GIT_ENV = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com", "GIT_COMMITTER_NAME": "test",
           "GIT_COMMITTER_EMAIL": "test@example.com", "DVC_NO_ANALYTICS": "1"}


def sh(cwd, *args):
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env={**os.environ, **GIT_ENV})
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def hashes(root, *paths):
    """{path relative to root: sha256} of every file under `paths`."""
    files = [p for top in paths for p in ([root / top] if (root / top).is_file() else (root / top).rglob("*"))]
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files if f.is_file()}


def test_push_then_pull_into_a_fresh_clone_restores_the_same_files(s3_bucket, s3_endpoint, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    sh(repo, "git", "init", "-q")
    sh(repo, DVC, "init", "-q")
    for i in range(3):  # a data folder (with a subfolder) and a model file, as the pipeline's outs are
        (repo / "data" / "train" / f"{i}.bin").parent.mkdir(parents=True, exist_ok=True)
        (repo / "data" / "train" / f"{i}.bin").write_bytes(os.urandom(4096 + i))
    (repo / "data" / "labels.csv").write_text("image,label\n0.bin,3\n")
    (repo / "models").mkdir()
    (repo / "models" / "encoder.pt").write_bytes(os.urandom(20_000))
    sh(repo, DVC, "add", "-q", "data", "models/encoder.pt")
    sh(repo, DVC, "remote", "add", "-d", "store", f"{s3_bucket}/dvc")
    sh(repo, DVC, "remote", "modify", "store", "endpointurl", s3_endpoint)
    sh(repo, "git", "add", ".")
    sh(repo, "git", "commit", "-q", "-m", "data and model tracked by dvc, remote on the object store")
    sh(repo, DVC, "push", "-q")

    fs, prefix = pafs.FileSystem.from_uri(f"{s3_bucket}/dvc")
    pushed = [i for i in fs.get_file_info(pafs.FileSelector(prefix, recursive=True))
              if i.type == pafs.FileType.File]
    assert len(pushed) == 5 + 1  # the five files and the listing of data/ (a .dir object), by content hash

    shutil.rmtree(repo / ".dvc" / "cache")  # the clone can only get the files from the store
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", str(repo), str(clone))
    assert not (clone / "data").exists() and not (clone / "models" / "encoder.pt").exists()
    sh(clone, DVC, "pull", "-q")
    want = hashes(repo, "data", "models/encoder.pt")
    assert len(want) == 5 and hashes(clone, "data", "models/encoder.pt") == want
