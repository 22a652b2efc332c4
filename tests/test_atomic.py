"""pipeline.atomic: outputs appear whole or not at all, with the modes the umask gives ordinary files."""

import os

import pytest

from pipeline.atomic import atomic_dir, atomic_write, atomic_write_json, atomic_write_text


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_files_and_folders_get_the_umask_modes_not_mkstemps(tmp_path, umask_022):
    f = atomic_write_text(tmp_path / "a" / "x.txt", "hi")
    assert f.read_text() == "hi" and f.stat().st_mode & 0o777 == 0o644
    j = atomic_write_json(tmp_path / "m.json", {"b": 1, "a": 2})
    assert j.read_text() == '{\n  "a": 2,\n  "b": 1\n}\n' and j.stat().st_mode & 0o777 == 0o644
    with atomic_dir(tmp_path / "enc") as d:
        (d / "w.pt").write_bytes(b"w")
    assert (tmp_path / "enc").stat().st_mode & 0o777 == 0o755 and (tmp_path / "enc" / "w.pt").read_bytes() == b"w"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "enc", "m.json"]  # no temporary left


def test_a_failed_write_leaves_the_old_output_and_no_temporary(tmp_path):
    out = atomic_write_text(tmp_path / "x.txt", "old")

    def boom(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt  # a killed stage

    with pytest.raises(KeyboardInterrupt):
        atomic_write(out, boom)
    assert out.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["x.txt"]
    (tmp_path / "enc").mkdir()
    (tmp_path / "enc" / "keep").write_text("k")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "enc") as d:
        (d / "new").write_text("n")
        raise RuntimeError
    assert [p.name for p in (tmp_path / "enc").iterdir()] == ["keep"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc", "x.txt"]
