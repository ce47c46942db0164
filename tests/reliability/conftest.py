import os
import sys

# resume_helpers is imported by the tests here and, through PYTHONPATH, by the training
# subprocesses they start (the recipe names its classes by class_path).
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402

from runs import TOTAL_STEPS, finish, output, records_by_process, start, stop, write_config  # noqa: E402


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory) -> list[dict]:
    """The per-step records of a run that was never interrupted (num_workers=0)."""
    run = tmp_path_factory.mktemp("uninterrupted")
    write_config(run, num_workers=0)
    proc = start(run)
    try:
        assert finish(proc) == 0, output(proc)[-4000:]
    finally:
        stop(proc)
    (records,) = records_by_process(run / "steps.jsonl")
    assert [r["step"] for r in records] == list(range(1, TOTAL_STEPS + 1))
    return records
