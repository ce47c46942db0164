"""The shipped benchmarks example and the callback's settings, as a recipe gives them."""

from pathlib import Path

import pytest
from jsonargparse import ArgumentParser

from mmkit.benchmarks import load_benchmarks
from mmkit.callbacks import Benchmarks

EXAMPLE = Path(__file__).parents[2] / "recipes" / "benchmarks" / "example.yaml"


def test_shipped_example_lists_runnable_benchmarks():
    benchmarks = load_benchmarks(str(EXAMPLE))
    assert [(b.task, b.name) for b in benchmarks] == [
        ("zeroshot", "shapes"), ("zeroshot", "colors"), ("retrieval", "shapes_captions")]
    assert benchmarks[1].size() == {"images": 500, "classes": 6, "prompts": 3}
    assert benchmarks[2].size() == {"images": 500, "captions": 500}


def test_callback_from_recipe_settings_inline_or_file():
    parser = ArgumentParser()
    parser.add_class_arguments(Benchmarks, "benchmarks_callback")
    inline = [{"task": "retrieval", "name": "r", "shapes": {"size": 4}}]
    for given in (inline, str(EXAMPLE)):
        cfg = parser.parse_object({"benchmarks_callback": {"benchmarks": given, "every_n_steps": 5, "every_n_epochs": None}})
        callback = parser.instantiate_classes(cfg).benchmarks_callback
        assert callback.every_n_steps == 5 and callback.benchmarks
    with pytest.raises(ValueError, match="both are null"):
        Benchmarks(inline, every_n_epochs=None)
    with pytest.raises(ValueError, match="every_n_steps must be a positive integer"):
        Benchmarks(inline, every_n_steps=0)


def test_mmkit_help_lists_the_benchmark_command(capsys):
    from mmkit.cli import command

    with pytest.raises(SystemExit):
        command(["--help"])
    assert "benchmark (mmkit benchmark --help)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        command(["benchmark", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: mmkit benchmark") and "torchrun" in out
