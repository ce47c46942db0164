"""Continual-learning summary metrics on hand-made matrices (numbers worked out by hand below)."""

import csv
import json
import math

import pytest

from mmkit.reports.continual import write_continual_report
from mmkit.metrics.continual import ContinualMatrix, continual_summary

# R[t][d]: score on task d after training on task t.
R = [
    [0.8, 0.1, 0.2],
    [0.6, 0.9, 0.3],
    [0.5, 0.7, 0.95],
]
BEFORE = [0.05, 0.1, 0.1]


def test_summary_of_a_full_matrix():
    s = continual_summary(R, BEFORE)
    # Avg: mean of the last row = (0.5 + 0.7 + 0.95) / 3 = 2.15 / 3
    assert s["avg"] == pytest.approx(2.15 / 3)
    # Last: the newest task right after training on it
    assert s["last"] == pytest.approx(0.95)
    # BWT: ((0.5 - 0.8) + (0.7 - 0.9)) / 2 = -0.25
    assert s["bwt"] == pytest.approx(-0.25)
    # Forgetting: task 0 best before the end is max(0.8, 0.6) = 0.8 -> 0.3; task 1: 0.9 - 0.7 = 0.2
    assert s["forgetting"] == pytest.approx(0.25)
    # FWT: task 1 after task 0 (0.1) vs before (0.1) = 0; task 2 after task 1 (0.3) vs 0.1 = 0.2
    assert s["fwt"] == pytest.approx(0.1)


def test_forgetting_uses_the_best_earlier_score_not_the_first():
    rows = [[0.4, 0.0], [0.7, 0.5]]  # task 0 improved while learning task 1: no forgetting
    rows3 = [[0.4, 0.0, 0.0], [0.7, 0.5, 0.0], [0.6, 0.5, 0.9]]
    assert continual_summary(rows3)["forgetting"] == pytest.approx(((0.7 - 0.6) + (0.5 - 0.5)) / 2)
    assert continual_summary(rows3)["bwt"] == pytest.approx(((0.6 - 0.4) + (0.5 - 0.5)) / 2)
    assert continual_summary(rows)["forgetting"] == pytest.approx(-0.3)  # 0.4 - 0.7: it improved


def test_partial_matrix_after_the_first_task():
    s = continual_summary(R[:1], BEFORE)
    assert s["avg"] == pytest.approx(0.8) and s["last"] == pytest.approx(0.8)
    assert math.isnan(s["bwt"]) and math.isnan(s["forgetting"])
    # Transfer to the next, unseen task is already known: 0.1 - 0.1
    assert s["fwt"] == pytest.approx(0.0)
    assert math.isnan(continual_summary(R)["fwt"])  # no before row


def test_partial_matrix_after_two_tasks():
    s = continual_summary(R[:2], BEFORE)
    assert s["avg"] == pytest.approx((0.6 + 0.9) / 2)
    assert s["bwt"] == pytest.approx(0.6 - 0.8) and s["forgetting"] == pytest.approx(0.2)
    assert s["fwt"] == pytest.approx(((0.1 - 0.1) + (0.3 - 0.1)) / 2)


def test_matrix_rows_in_order_and_state_round_trip():
    m = ContinualMatrix(3, ["a", "b", "c"])
    m.set_before({"R@1": BEFORE})
    with pytest.raises(ValueError, match="before the row for task 0"):
        m.add_row(1, {"R@1": R[1]})
    for t in range(3):
        m.add_row(t, {"R@1": R[t]})
    m.add_row(2, {"R@1": R[2]})  # re-adding a row replaces it
    assert m.tasks_done == 3 and m.rows["R@1"] == R
    with pytest.raises(ValueError, match="3 values"):
        m.add_row(0, {"R@1": [1.0]})
    other = ContinualMatrix(3)
    other.load_state_dict(m.state_dict())
    assert other.summary("R@1") == m.summary("R@1") and other.task_names == ["a", "b", "c"]


def test_report_files(tmp_path):
    m = ContinualMatrix(3, ["a", "b", "c"])
    m.set_before({"R@1": BEFORE})
    for t in range(2):
        m.add_row(t, {"R@1": R[t], "i2t_R@1": R[t]})
    summary = write_continual_report(tmp_path, m)
    with open(tmp_path / "R_at_1.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["after", "a", "b", "c"]
    assert [r[0] for r in rows[1:]] == ["before", "after a", "after b"]
    assert [float(x) for x in rows[3][1:]] == R[1]
    assert (tmp_path / "R_at_1.png").stat().st_size > 1000
    assert (tmp_path / "i2t_R_at_1.csv").exists() and not (tmp_path / "i2t_R_at_1.png").exists()
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["tasks_done"] == 2
    assert saved["summary"]["R@1"]["bwt"] == pytest.approx(-0.2) == summary["R@1"]["bwt"]
