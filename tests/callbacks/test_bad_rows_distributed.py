"""Bad-data counts are of distinct rows across ranks: a 21-row manifest with 3 bad rows, trained
for 3 epochs on 2 DDP processes (gloo) whose sampler pads each epoch to 24 visits, reports "3 of
21 rows skipped" on every rank (visits would say 9 of 72), and so does its validation pass.

Run as a script by the test: Lightning's DDP launcher starts the second process by running it again."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROWS, BAD_ROWS = 21, (4, 11, 17)


def _write_manifest(folder: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
    from datafakes import write_csv, write_images

    names = [f"{i}.png" for i in range(ROWS) if i not in BAD_ROWS]
    write_images(folder, names, fmt="PNG")
    rows = [{"image": f"{i}.png" if i not in BAD_ROWS else f"missing-{i}.png", "caption": f"picture {i}"} for i in range(ROWS)]
    write_csv(folder / "m.csv", rows)
    return folder / "m.csv"


def _main(manifest: str, out: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
    import lightning as L
    from test_data_datamodule import RecordingModule

    from datafakes import FakePreprocessing
    from mmkit.callbacks import BadSampleCallback
    from mmkit.data import ImageTextDataModule, ManifestDataset

    dm = ImageTextDataModule(train=ManifestDataset(manifest), val=ManifestDataset(manifest), batch_size=4,
                             eval_batch_size=4, max_bad_fraction=0.5, preprocessing=FakePreprocessing())
    callback = BadSampleCallback(min_samples=1, check_every_n_steps=2)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, use_distributed_sampler=False, callbacks=[callback],
                        default_root_dir=out)
    model = RecordingModule()
    trainer.fit(model, datamodule=dm)
    visits = sum(len(v) for v in model.train_seen.values())  # good rows this rank trained on, with repeats
    Path(out, f"rank{trainer.global_rank}.json").write_text(json.dumps(
        {"seen": callback.tracker.seen, "skipped": callback.tracker.skipped, "good_visits": visits}))


@pytest.mark.slow
def test_bad_rows_are_counted_once_over_epochs_padding_and_ranks(tmp_path):
    manifest = _write_manifest(tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    done = subprocess.run([sys.executable, __file__, str(manifest), str(out)], capture_output=True, text=True, timeout=600,
                          check=False)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all((r["seen"], r["skipped"]) == (ROWS, len(BAD_ROWS)) for r in ranks)
    # the rows were met again and again: every good row in each of the 3 epochs (and padding on top)
    assert sum(r["good_visits"] for r in ranks) >= 3 * (ROWS - len(BAD_ROWS))
    assert "3 of 21 rows skipped so far (14.29%)" in log
    assert "val: 3 of 21 rows skipped (14.29%)" in log
    assert all(f"missing-{i}.png" in log for i in BAD_ROWS)  # the reasons, gathered from both ranks


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2])
