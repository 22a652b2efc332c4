"""The report table: rows, columns, margin signs, markdown / CSV output."""

import math

import pandas as pd
import pytest

from evals.report import COLUMNS, build_table, diagnostics_table, to_markdown, write_report

RESULTS = {
    "eval_linear": {"ijepa": {"attentive": {"last": {"top1": 70.0, "top5": 95.0}},
                              "knn": {"last": {"top1": 50.0, "top5": 80.0}, "last4": {"top1": 52.0, "top5": 81.0}},
                              "last": {"top1": 60.0, "top5": 90.0}, "last4": {"top1": 65.0, "top5": 92.0}},
                    "random": {"attentive": {"last": {"top1": 30.0, "top5": 60.0}},
                               "knn": {"last": {"top1": 21.0, "top5": 51.0}, "last4": {"top1": 22.0, "top5": 52.0}},
                               "last": {"top1": 20.0, "top5": 50.0}, "last4": {"top1": 25.0, "top5": 55.0}},
                    "paired": {"attentive": {"last": {"top1": {"margin": 40.0, "p_value": 3e-9}}},
                               "knn": {"last": {"top1": {"margin": 29.0, "p_value": 4e-9}},
                                       "last4": {"top1": {"margin": 30.0, "p_value": 5e-9}}},
                               "last": {"top1": {"margin": 40.0, "p_value": 1e-9}},
                               "last4": {"top1": {"margin": 40.0, "p_value": 2e-9}}},
                    "pixels": {"top1": 30.0, "top5": 70.0},
                    "diagnostics": {"ijepa": {"rankme": 20.0, "position_share": 0.3},
                                    "random": {"rankme": 31.0, "position_share": 0.45}}},
    "eval_clevr": {"ijepa": {"count_all": {"knn": {"last": {"top1": 33.0}}, "last": {"top1": 40.0},
                                           "last4": {"top1": 45.0}}},
                   "random": {"count_all": {"knn": {"last": {"top1": 31.0}}, "last": {"top1": 30.0},
                                            "last4": {"top1": 28.0}}},
                   "paired": {"count_all": {"knn": {"last": {"top1": {"margin": 2.0, "p_value": 0.6, "n": 100}}},
                                            "last": {"top1": {"margin": 10.0, "p_value": 0.3, "n": 100}}}},
                   "pixels": {"count_all": {"top1": 35.0}}},
    "eval_depth": {"ijepa": {"last": {"rmse": 0.8, "d1": 0.7}}, "random": {"last": {"rmse": 1.0, "d1": 0.6}},
                   "mean_depth": {"rmse": 1.2, "d1": 0.5},
                   "paired": {"last": {"abs_rel": {"margin": 0.01, "p_value": 0.04}}}},
}


def test_rows_columns_and_margins():
    t = build_table(RESULTS)
    assert list(t.columns) == COLUMNS
    assert list(t.index) == [("linear", "top1"), ("linear", "top5"),  # the linear probe first, then the others
                             ("linear", "attentive_top1"), ("linear", "attentive_top5"),
                             ("linear", "knn_top1"), ("linear", "knn_top5"),
                             ("clevr.count_all", "top1"), ("clevr.count_all", "knn_top1"),
                             ("depth", "rmse"), ("depth", "d1")]
    assert t.loc[("linear", "top1"), "margin.last4"] == pytest.approx(40.0)
    assert t.loc[("clevr.count_all", "top1"), "margin.last4"] == pytest.approx(17.0)
    assert t.loc[("depth", "rmse"), "margin.last"] == pytest.approx(0.2)  # lower error: a positive margin
    assert t.loc[("depth", "d1"), "margin.last"] == pytest.approx(0.1)
    assert t.loc[("depth", "rmse"), "baseline"] == pytest.approx(1.2)
    assert math.isnan(t.loc[("depth", "rmse"), "ijepa.last4"])  # depth has one view
    assert t.loc[("linear", "top1"), "baseline"] == pytest.approx(30.0)  # raw pixels, no view level
    assert t.loc[("linear", "top5"), "baseline"] == pytest.approx(70.0)
    assert t.loc[("clevr.count_all", "top1"), "baseline"] == pytest.approx(35.0)  # under its task
    assert t.loc[("linear", "top1"), "p.last4"] == pytest.approx(2e-9)  # the paired test lands on the top-1 row
    assert t.loc[("clevr.count_all", "top1"), "p.last"] == pytest.approx(0.3)
    assert math.isnan(t.loc[("clevr.count_all", "top1"), "p.last4"])  # not in the file: not made up
    assert math.isnan(t.loc[("linear", "top5"), "p.last"])  # top-5 is not tested
    assert ("depth", "abs_rel") not in t.index  # a p-value alone does not make a row


def test_attentive_and_knn_rows_for_both_encoders():
    t = build_table(RESULTS)
    knn, att = t.loc[("linear", "knn_top1")], t.loc[("linear", "attentive_top1")]
    assert (knn["ijepa.last4"], knn["random.last4"], knn["margin.last4"]) == (52.0, 22.0, 30.0)
    assert (knn["p.last"], knn["p.last4"]) == (4e-9, 5e-9)  # its own paired test, not the linear probe's
    assert (att["ijepa.last"], att["random.last"], att["margin.last"], att["p.last"]) == (70.0, 30.0, 40.0, 3e-9)
    assert math.isnan(att["ijepa.last4"])  # one view: the last layer's patch tokens
    assert math.isnan(knn["baseline"]) and math.isnan(att["baseline"])  # the pixel baseline is the linear probe's
    assert t.loc[("clevr.count_all", "knn_top1"), "p.last"] == pytest.approx(0.6)
    assert "| linear | knn_top1 | 50 | 52 | 21 | 22 | 29 | 30 |" in to_markdown(t)


def test_markdown_and_csv(tmp_path):
    t = build_table(RESULTS)
    md = to_markdown(t)
    lines = md.strip().splitlines()
    assert lines[0].startswith("| evaluation | metric | ijepa.last |")
    assert len(lines) == 2 + len(t)
    assert "| depth | rmse | 0.8 | - |" in md
    assert ("linear", "rankme") not in t.index  # diagnostics are not probe figures: their own table
    diag = diagnostics_table(RESULTS)
    assert diag.loc[("linear", "random"), "rankme"] == pytest.approx(31.0)
    assert diagnostics_table({"eval_depth": RESULTS["eval_depth"]}) is None
    files = write_report(t, tmp_path, diag)
    assert "| linear | ijepa | 20 | 0.3 |" in (tmp_path / "evals.md").read_text()
    assert [f.name for f in files] == ["evals.csv", "evals.md", "evals.png"]
    assert all(f.parent == tmp_path and f.is_file() for f in files)
    assert (tmp_path / "evals.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    back = pd.read_csv(tmp_path / "evals.csv", index_col=[0, 1])
    assert back.loc[("linear", "top1"), "ijepa.last"] == pytest.approx(60.0)
