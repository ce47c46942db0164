"""docs/extending.md's worked examples, run as written: each Python block is saved under the name
its marker gives, and the YAML overlay next to it trains 2 steps through `mmkit fit` on top of
recipes/default.yaml (tiny sizes for the test budget; the documented command runs the same files)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mmkit.cli import main

REPO = Path(__file__).parents[2]
DOC = REPO / "docs" / "extending.md"
ARCH = str(REPO / "tests" / "models" / "tiny_test_arch.json")  # 16 px, 1 layer: the demo's model at test size


def examples() -> dict[str, str]:
    """File name -> the fenced block after its ``<!-- extending-example: NAME -->`` marker."""
    found = re.findall(r"<!-- extending-example: (\S+) -->\n```\w*\n(.*?)^```", DOC.read_text(), flags=re.DOTALL | re.MULTILINE)
    return dict(found)


def _fit(tmp_path: Path, monkeypatch, overlay: str, *extra: str) -> Path:
    for name, code in examples().items():
        (tmp_path / name).write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))  # the docs' PYTHONPATH=.
    run = tmp_path / "run"
    main([
        "fit", "--config", str(REPO / "recipes" / "default.yaml"), "--config", str(tmp_path / overlay),
        "--model.init_args.model.init_args.arch", ARCH, "--model.init_args.model.init_args.image_size", "16",
        "--data.init_args.batch_size", "8", "--data.init_args.eval_batch_size", "8", "--data.init_args.num_workers", "0",
        "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]", "--model.init_args.export_dir", "",
        "--trainer.default_root_dir", str(run), *extra,
    ])
    return run


def _header(run: Path) -> set[str]:
    return set((run / "metrics.csv").read_text().splitlines()[0].split(","))


def test_the_examples_are_all_there():
    assert set(examples()) == {"my_data.py", "my_data.yaml", "my_technique.py", "my_technique.yaml"}


@pytest.mark.slow
def test_own_data_source_trains_and_is_a_zero_shot_set(tmp_path, monkeypatch):
    run = _fit(tmp_path, monkeypatch, "my_data.yaml",
               "--data.init_args.train.init_args.size", "32", "--data.init_args.train.init_args.image_size", "16",
               "--data.init_args.val.init_args.size", "12", "--data.init_args.val.init_args.image_size", "16")
    header = _header(run)
    assert {"train/loss", "val/i2t_R@1"} <= header
    assert "val/zeroshot_top1" in header  # the source's class_names made it a zero-shot set


@pytest.mark.slow
def test_own_technique_adds_its_penalty_to_the_step(tmp_path, monkeypatch):
    small = ("train", 32), ("val", 8), ("test", 8)
    sizes = [a for split, n in small for a in (f"--data.init_args.{split}.init_args.size", str(n),
                                                f"--data.init_args.{split}.init_args.image_size", "16")]
    run = _fit(tmp_path, monkeypatch, "my_technique.yaml", *sizes)
    rows = (run / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert "train/scale_prior_loss" in header
    column = header.index("train/scale_prior_loss")
    values = [float(r.split(",")[column]) for r in rows[1:] if r.split(",")[column]]
    assert values and all(v > 0 for v in values)  # the init scale (1/0.07) is not the target 30
