"""`mmkit validate|test|predict --ckpt_path` on a finished fit, run as the README shows them:
they write to a folder of their own and leave every file of the fit as it was, and what the
recipe and the command line say is what they use, whatever the checkpoint was trained with."""

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from mmkit.cli import main, run_cli

REPO = Path(__file__).parents[2]
RUN = Path("runs/default")  # the default recipe's run folder, relative to the working directory
CKPT = str(RUN / "checkpoints" / "last.ckpt")
README_EVAL = ["--config", "recipes/default.yaml", "--ckpt_path", CKPT]
# Tiny splits and no loader workers: the README's commands at test size.
SMALL = [
    "--data.init_args.val.init_args.size", "64", "--data.init_args.test.init_args.size", "64",
    "--data.init_args.num_workers", "0", "--trainer.enable_progress_bar", "false",
]
PREDICT = ["--data.init_args.predict", "{class_path: mmkit.data.SyntheticShapes, init_args: {size: 48}}"]  # README: size 1000
TEMPLATES = ["a drawing of a {}"]  # not the recipe's (nor the checkpoint's) templates


def snapshot(folder: Path, skip: str | None = None) -> dict[str, str]:
    """Every file under ``folder`` (links as their target) by relative path, with its content hash."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if skip and (rel == skip or rel.startswith(skip + "/")):
            continue
        if path.is_symlink():
            out[rel] = "-> " + str(path.readlink())
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A finished short fit of the default recipe in ``<base>/runs/default``, and the snapshot of
    its folder taken right after it."""
    base = tmp_path_factory.mktemp("readme")
    (base / "recipes").mkdir()
    shutil.copy(REPO / "recipes" / "default.yaml", base / "recipes" / "default.yaml")
    with contextlib.chdir(base):
        main(["fit", "--config", "recipes/default.yaml", *SMALL,
              "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
              "--data.init_args.train.init_args.size", "128", "--data.init_args.batch_size", "64"])
    run = base / RUN
    assert (run / "checkpoints" / "last.ckpt").is_file() and "val/loss" in (run / "metrics.csv").read_text()
    return base, snapshot(run)


def _eval_folders(run: Path) -> set[Path]:
    return set((run / "eval").iterdir()) if (run / "eval").is_dir() else set()


@pytest.mark.slow
def test_eval_subcommands_leave_the_fit_alone_and_write_to_folders_of_their_own(fitted, monkeypatch, capsys):
    """The README's order: fit, validate, test, predict, export, then the export loaded by
    open_clip gives predict's embeddings; the fit's folder is intact at the end."""
    base, fit_files = fitted
    monkeypatch.chdir(base)
    run = base / RUN
    written = {}
    for subcommand, extra in [("validate", []), ("test", []), ("predict", PREDICT), ("validate", [])]:
        before = _eval_folders(run)
        main([subcommand, *README_EVAL, *SMALL, *extra])
        new = _eval_folders(run) - before
        assert len(new) == 1, (subcommand, new)
        folder = new.pop()
        assert folder.name.startswith(f"{subcommand}-")
        assert f"mmkit: {subcommand} writes to {RUN / 'eval' / folder.name}" in capsys.readouterr().out
        # Each its own record: its config (with the checkpoint it evaluated), and its outputs.
        config = yaml.safe_load((folder / "config.yaml").read_text())
        assert config["ckpt_path"] == CKPT
        if subcommand == "predict":
            emb = load_file(str(folder / "embeddings" / "embeddings_rank0.safetensors"))
            assert emb["image_features"].shape[0] == 48 and emb["index"].tolist() == list(range(48))
        else:
            split = "val" if subcommand == "validate" else "test"
            assert f"{split}/i2t_R@1" in (folder / "metrics.csv").read_text()
        written.setdefault(subcommand, []).append((folder, snapshot(folder)))

    # `mmkit export` as the README shows it; open_clip's own loader and transforms on the export
    # reproduce predict's embeddings of the same samples.
    main(["export", "--config", "recipes/default.yaml", "--ckpt_path", CKPT, "--out", "my_model"])
    _assert_open_clip_gives_predicts_embeddings(base / "my_model", written["predict"][0][0])

    # The fit's files: all there, byte for byte.
    assert snapshot(run, skip="eval") == fit_files
    # The second validate did not touch the first's folder.
    (first, first_files), (second, _) = written["validate"]
    assert first != second and snapshot(first) == first_files


def _assert_open_clip_gives_predicts_embeddings(export: Path, predict_folder: Path) -> None:
    import open_clip
    import torch

    from mmkit.data import SyntheticShapes

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{export}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{export}")
    samples = [SyntheticShapes(48)[i] for i in range(48)]  # PREDICT's source
    with torch.no_grad():
        image = model.encode_image(torch.stack([preprocess(s["image"]) for s in samples]), normalize=True)
        text = model.encode_text(tokenizer([s["caption"] for s in samples]), normalize=True)
    emb = load_file(str(predict_folder / "embeddings" / "embeddings_rank0.safetensors"))
    assert torch.allclose(image, emb["image_features"], atol=1e-5), (image - emb["image_features"]).abs().max()
    assert torch.allclose(text, emb["text_features"], atol=1e-5), (text - emb["text_features"]).abs().max()


@pytest.mark.slow
def test_command_line_overrides_apply_with_a_checkpoint_and_print_config_shows_them(fitted, monkeypatch, capsys):
    base, _ = fitted
    monkeypatch.chdir(base)
    templates = ["--model.init_args.zero_shot_templates", json.dumps(TEMPLATES)]
    cli = run_cli(["validate", *README_EVAL, *SMALL, *templates])
    assert cli.trainer.ckpt_path == CKPT  # the trained weights were loaded...
    assert cli.model.zero_shot_templates == TEMPLATES  # ...and the templates given are the ones scored with
    assert 0.0 <= float(cli.trainer.callback_metrics["val/zeroshot_top1"]) <= 1.0
    out = capsys.readouterr().out
    assert f"mmkit: {CKPT} was trained with other values of model.init_args.zero_shot_templates;" in out

    # One class name for data labelled with five shapes: refused, naming both lists.
    with pytest.raises(ValueError, match=r"zero_shot_classes \['circle'\] do not match the class names of the val data"):
        main(["validate", *README_EVAL, *SMALL, "--model.init_args.zero_shot_classes", "[circle]"])

    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["validate", *README_EVAL, *SMALL, *templates, "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["zero_shot_templates"] == TEMPLATES


@pytest.mark.slow
def test_predict_on_two_processes_writes_one_folder(fitted):
    base, fit_files = fitted
    run = base / RUN
    before = _eval_folders(run)
    # Lightning launches the second rank as a new process running the same command line.
    cmd = [sys.executable, "-m", "mmkit.cli", "predict", *README_EVAL, *SMALL, *PREDICT,
           "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(cmd, cwd=base, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (folder,) = _eval_folders(run) - before
    assert done.stdout.count("mmkit: predict writes to") == 1
    rows = [load_file(str(folder / "embeddings" / f"embeddings_rank{r}.safetensors"))["index"] for r in (0, 1)]
    assert sorted(i for r in rows for i in r.tolist()) == list(range(48))
    assert snapshot(run, skip="eval") == fit_files


@pytest.mark.slow
def test_validate_with_the_fit_config_loads_no_checkpoint(fitted, monkeypatch):
    base, _ = fitted
    monkeypatch.chdir(base)
    trained = run_cli(["validate", *README_EVAL, *SMALL])  # the README's command, first
    assert yaml.safe_load((base / RUN / "config.yaml").read_text())["ckpt_path"] is None

    # The fit's own config, e.g. for a random-init baseline: no checkpoint comes with it.
    baseline = run_cli(["validate", "--config", str(RUN / "config.yaml"), *SMALL])
    assert baseline.trainer.ckpt_path is None
    loss = {name: float(cli.trainer.callback_metrics["val/loss"]) for name, cli in [("trained", trained), ("baseline", baseline)]}
    assert loss["trained"] != loss["baseline"], loss


def test_eval_folder_choice_logger_redirect_and_claim(tmp_path, monkeypatch):
    from jsonargparse import Namespace

    from mmkit.run_config import EVAL_DIR_ENV, claim_eval_dir, redirect_eval_outputs

    def config(**extra):
        csv = Namespace(class_path="lightning.pytorch.loggers.CSVLogger",
                        init_args=Namespace(save_dir=str(tmp_path), name="", version=""))
        other = Namespace(class_path="lightning.pytorch.loggers.MLFlowLogger", init_args=Namespace(save_dir="./mlruns"))
        return Namespace(trainer=Namespace(default_root_dir=str(tmp_path), logger=[csv, other]), eval_dir=None, **extra)

    monkeypatch.setattr("mmkit.run_config.time.strftime", lambda fmt: "20260101-000000")  # all in one second
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv(EVAL_DIR_ENV, "/stale/from/an/earlier/run")  # only a launched rank reads it
    cfg = config()
    folder = redirect_eval_outputs(cfg, "test")
    assert folder == str(tmp_path / "eval" / "test-20260101-000000")
    assert cfg.trainer.default_root_dir == folder
    csv, other = cfg.trainer.logger
    assert (csv.init_args.save_dir, csv.init_args.name, csv.init_args.version) == (folder, "", "")
    assert other.init_args.save_dir == "./mlruns"  # its own store: a new run there overwrites nothing
    claim_eval_dir(folder, fresh=True)
    assert redirect_eval_outputs(config(), "test") == folder + "-1"  # taken: the next free name
    with pytest.raises(FileExistsError, match="created by another run"):
        claim_eval_dir(folder, fresh=True)

    # A rank Lightning launched writes where rank zero chose.
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv(EVAL_DIR_ENV, folder)
    assert redirect_eval_outputs(config(), "test") == folder

    # --eval_dir: new or empty only.
    (Path(folder) / "metrics.csv").write_text("x")
    with pytest.raises(FileExistsError, match="--eval_dir .* already holds files"):
        claim_eval_dir(folder, fresh=False)
    claim_eval_dir(str(tmp_path / "empty"), fresh=False)
    assert (tmp_path / "empty").is_dir()


def test_checkpoint_differences_name_the_keys():
    from jsonargparse import Namespace

    from mmkit.run_config import checkpoint_differences

    model = Namespace(class_path="mmkit.CLIPPretrain",
                      init_args=Namespace(lr=1e-3, betas=(0.9, 0.98), zero_shot_classes=["a", "b"]))
    same = {"_class_path": "mmkit.techniques.clip_pretrain.CLIPPretrain", "_instantiator": "x",
            "lr": 1e-3, "betas": [0.9, 0.98], "zero_shot_classes": ["a", "b"]}
    assert checkpoint_differences(same, model) == []
    assert checkpoint_differences({**same, "lr": 0.1, "gone": 1}, model) == ["model.init_args.lr", "model.init_args.gone"]
    assert checkpoint_differences({**same, "_class_path": "mmkit.MetricAlign"}, model) == ["model.class_path"]
