"""Issue 12's attacks on mmkit, each run as the test that reproduces it, with the outcome written
as a table to benchmarks/RESULTS.md (section "Reliability: attacks and results").

    .venv/bin/python benchmarks/reliability_attacks.py

Every attack is a real run: crafted pickles in real FSDP2 / DeepSpeed folders (a payload that
would create a marker file), real signals to real `mmkit fit` processes with loader workers,
flipped bytes in a checkpoint, truncated shards, two fits in one folder. A row passes when mmkit
behaves as the "expected" column says; the test's own assertions are the check.
"""

from __future__ import annotations

import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from results_file import write_section

ROOT = Path(__file__).resolve().parents[1]
R = "tests/reliability/"
ATTACKS = [
    ("Crafted `.metadata` pickle in an FSDP2 folder: `mmkit export`, `--ckpt_path last`, explicit folder, strategy load",
     "refused naming the file and the global; payload never runs",
     R + "test_reliability_checkpoint_safety.py::test_crafted_dcp_metadata_is_refused_and_never_unpickled"),
    ("Crafted non-tensor item inside a DCP shard", "refused before torch unpickles it",
     R + "test_reliability_checkpoint_safety.py::test_crafted_non_tensor_item_in_a_dcp_shard_is_refused"),
    ("DCP index pointing outside its folder", "refused",
     R + "test_reliability_checkpoint_safety.py::test_a_dcp_index_that_points_outside_its_folder_is_refused"),
    ("Crafted DeepSpeed `mp_rank_00_model_states.pt`", "refused; payload never runs",
     R + "test_reliability_checkpoint_safety.py::test_crafted_deepspeed_model_states_are_refused_and_never_unpickled"),
    ("Single-file checkpoint carrying code (`os.system`, `exec`)", "called code, not 'corrupt'; no weights_only=False advice",
     R + "test_reliability_checkpoint_safety.py::test_a_checkpoint_file_that_references_code_is_refused_as_such_not_called_corrupt"),
    ("Sharded-looking folder in a one-device run's checkpoints/", "`last` skips and names it",
     R + "test_reliability_checkpoint_safety.py::test_last_skips_sharded_folders_a_one_device_run_cannot_load"),
    ("SIGTERM to the main process during validation, `num_workers=1`", "saves, exits 0 within 60 s, no worker left",
     R + "test_reliability_signals_with_workers.py::test_sigterm_in_validation_saves_and_exits_0"),
    ("SIGINT during validation", "exits within 60 s, no worker left",
     R + "test_reliability_signals_with_workers.py::test_sigint_in_validation_exits"),
    ("SIGTERM in a training step / during a checkpoint write / in the test after fit",
     "saves (where documented) and exits with the documented status",
     R + "test_reliability_signals_with_workers.py::test_sigterm_in_a_training_step_saves_and_exits_143 "
     + R + "test_reliability_signals_with_workers.py::test_sigterm_during_a_checkpoint_write_finishes_it_and_exits_143 "
     + R + "test_reliability_signals_with_workers.py::test_sigterm_in_the_test_after_fit_exits_0"),
    ("Flipped bytes in a checkpoint's tensor data", "digest mismatch: skipped by `last`, refused when loaded or exported",
     R + "test_reliability_checksums.py::test_flipped_bytes_in_tensor_data_are_caught_when_choosing_and_when_loading "
     + R + "test_reliability_checksums.py::test_export_refuses_a_damaged_checkpoint"),
    ("Tar shard truncated at a 512-byte boundary", "counted as a bad item naming the shard",
     "tests/data/test_data_shards.py::test_shard_cut_at_a_block_boundary_is_counted"),
    ("50 % / 100 % bad validation or test samples", "counted and logged; over the limit or all bad: fails naming reasons",
     "tests/callbacks/test_bad_eval_samples.py"),
    ("`metrics.csv` after a SIGKILL and resume", "history before the restart kept, re-run steps replaced",
     R + "test_reliability_run_folder.py::test_after_a_sigkill_a_new_fit_takes_the_lock_and_continues_metrics_csv"),
    ("60,000-letter caption, 200 KB CSV cell, 1x30000-pixel PNG, oversized tar member", "skipped before the cost, counted, named",
     "tests/data/test_fuzz_inputs.py::test_costly_samples_are_skipped_before_they_cost"),
    ("`grad_clip_norm: -1`, `max_bad_fraction: -1`, `warmup_steps: -10`, `eval_batch_size: 0`, `accumulate_chunks: 0`, "
     "`image_size: 0` / negative, negative `init_temperature`", "refused at construction naming setting and range",
     "tests/test_numeric_settings.py::test_bad_value_fails_at_construction tests/test_misconfiguration.py"),
    ("`cp -r` of a run folder, then `--ckpt_path last`", "resumes the furthest step (60), not the newest file (50)",
     R + "test_reliability_checkpoint_choice.py::test_a_copied_run_folder_resumes_its_furthest_checkpoint_not_the_file_copied_last"),
    ("Two `mmkit fit` in one run folder", "the second stops at once naming the first's pid; the first is untouched",
     R + "test_reliability_run_folder.py::test_a_second_fit_in_a_folder_in_use_fails_fast_naming_the_first_and_touches_nothing"),
]


def main() -> None:
    rows, start = [], time.time()
    for attack, expected, tests in ATTACKS:
        report = ROOT / "benchmarks" / "_work" / "attack.xml"
        report.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", *tests.split()],
                       cwd=ROOT, capture_output=True, text=True)
        suite = ET.parse(report).getroot().find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        held = counts["tests"] > 0 and counts["failures"] == counts["errors"] == counts["skipped"] == 0
        result = "held" if held else f"BROKEN ({counts['failures']} failed, {counts['errors']} errors, {counts['skipped']} skipped)"
        rows.append(f"| {attack} | {expected} | {result} ({counts['tests']} runs, {time.time() - t0:.0f} s) | `{tests.split()[0].split('::')[0]}` |")
        print(rows[-1], flush=True)
    section = "\n".join([
        "## Reliability: attacks and results (issue 12)",
        "",
        "Command: `.venv/bin/python benchmarks/reliability_attacks.py` (each attack is the test named in the last column;"
        f" {time.strftime('%Y-%m-%d')}, 2-core CPU machine, {time.time() - start:.0f} s in all).",
        "",
        "| attack | expected | result | test |",
        "| --- | --- | --- | --- |",
        *rows,
        "",
    ])
    write_section(ROOT / "benchmarks" / "RESULTS.md", "## Reliability: attacks and results (issue 12)", section)


if __name__ == "__main__":
    main()
