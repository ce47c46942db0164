"""The continual-learning matrix and its summary metrics.

``R[t, d]`` is a score (Recall@1, zero-shot accuracy, ...) on task ``d``'s validation split,
measured after training on tasks ``0..t``; ``b[d]`` is the same score before any training. With
``k`` the last task trained so far (``k = T - 1`` at the end of the stream):

- ``avg``: mean of row ``k`` over the tasks seen so far, ``mean_{d<=k} R[k, d]`` (at the end of
  the stream: the mean of the last row);
- ``last``: ``R[k, k]``, the newest task's score right after training on it;
- ``bwt`` (backward transfer, Lopez-Paz & Ranzato 2017): ``mean_{d<k} R[k, d] - R[d, d]``,
  negative when learning later tasks hurt earlier ones;
- ``forgetting`` (Chaudhry et al. 2018): ``mean_{d<k} max_{d<=t<k} R[t, d] - R[k, d]``, the drop
  of each old task from its best score after it was learnt to its final score;
- ``fwt`` (forward transfer): ``mean_{1<=d<=min(k+1, T-1)} R[d-1, d] - b[d]``, how much training
  on the earlier tasks alone helps a task not yet seen (needs the ``before`` row).

A metric that needs an old task (bwt, forgetting) or a task after the first (fwt) is NaN until
one exists. Plain floats in, plain floats out: no tensors, no devices, no distributed code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

Matrix = Sequence[Sequence[float]]


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def continual_summary(rows: Matrix, before: Sequence[float] | None = None) -> dict[str, float]:
    """Summary metrics of a (possibly partial) continual-learning matrix.

    Args:
        rows: ``rows[t][d]`` = score on task ``d`` after training on task ``t``; one row per task
            trained so far (``k + 1`` rows, each with one entry per task of the stream).
        before: score on each task before any training, or None (then ``fwt`` is NaN).

    Returns:
        ``avg``, ``last``, ``bwt``, ``forgetting``, ``fwt`` (see the module docstring).
    """
    if not rows:
        raise ValueError("continual_summary needs at least one row (one task trained)")
    k = len(rows) - 1
    if any(len(r) < len(rows) for r in rows):
        raise ValueError(f"each row needs an entry for each of the {len(rows)} tasks trained so far")
    R = [[float(x) for x in r] for r in rows]
    out = {
        "avg": _mean([R[k][d] for d in range(k + 1)]),
        "last": R[k][k],
        "bwt": _mean([R[k][d] - R[d][d] for d in range(k)]),
        "forgetting": _mean([max(R[t][d] for t in range(d, k)) - R[k][d] for d in range(k)]),
        "fwt": math.nan,
    }
    if before is not None:
        # every task d >= 1 whose predecessor has been trained, including the next, unseen one
        out["fwt"] = _mean([R[d - 1][d] - float(before[d]) for d in range(1, min(k + 2, len(R[0])))])
    return out


class ContinualMatrix:
    """Accumulates the matrix of every tracked score over a task stream.

    ``set_before`` records the scores before training and ``add_row`` the scores after each task,
    each as ``{score name: [value per task]}``. Rows must arrive in task order; re-adding a row
    (a task evaluated again after a resume) replaces it.

    Args:
        num_tasks: number of tasks in the stream.
        task_names: one name per task (for reports); default ``task0``, ``task1``, ...
    """

    def __init__(self, num_tasks: int, task_names: Sequence[str] | None = None) -> None:
        if num_tasks < 1:
            raise ValueError(f"ContinualMatrix needs at least one task, got {num_tasks}")
        self.num_tasks = num_tasks
        self.task_names = list(task_names) if task_names is not None else [f"task{i}" for i in range(num_tasks)]
        if len(self.task_names) != num_tasks:
            raise ValueError(f"{len(self.task_names)} task names for {num_tasks} tasks")
        self.before: dict[str, list[float]] = {}
        self.rows: dict[str, list[list[float]]] = {}

    @property
    def scores(self) -> list[str]:
        return sorted(set(self.rows) | set(self.before))

    @property
    def tasks_done(self) -> int:
        return max((len(r) for r in self.rows.values()), default=0)

    def set_before(self, values: dict[str, Sequence[float]]) -> None:
        for name, row in values.items():
            self.before[name] = self._check(row)

    def add_row(self, task: int, values: dict[str, Sequence[float]]) -> None:
        """Scores on every task after training on ``task``."""
        for name, row in values.items():
            rows = self.rows.setdefault(name, [])
            if task > len(rows):
                raise ValueError(f"row for task {task} added before the row for task {len(rows)} ({name})")
            rows[task:] = [self._check(row)]

    def summary(self, name: str) -> dict[str, float]:
        return continual_summary(self.rows[name], self.before.get(name))

    def _check(self, row: Sequence[float]) -> list[float]:
        if len(row) != self.num_tasks:
            raise ValueError(f"a row needs {self.num_tasks} values, got {len(row)}")
        return [float(x) for x in row]

    def state_dict(self) -> dict[str, Any]:
        return {"num_tasks": self.num_tasks, "task_names": self.task_names, "before": self.before, "rows": self.rows}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["num_tasks"]) != self.num_tasks:
            raise ValueError(f"saved matrix has {state['num_tasks']} tasks, this stream has {self.num_tasks}")
        self.task_names = list(state["task_names"])
        self.before = {k: list(v) for k, v in state["before"].items()}
        self.rows = {k: [list(r) for r in v] for k, v in state["rows"].items()}
