"""Progress bars are silent in CI and in pipes, and still iterate everything."""

from pipeline import progress


def test_quiet_in_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    assert not progress.enabled()
    bar = progress.progress(range(5), desc="x")
    assert bar.disable and list(bar) == [0, 1, 2, 3, 4]


def test_off_switch(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setenv("IJEPA_PROGRESS", "0")
    assert not progress.enabled()
