"""Run open_clip's own trainer on an mmkit preset architecture.

    python open_clip_train_launcher.py [--threads N] [--timing-json PATH] -- <open_clip_train args>

Registers mmkit's preset configs (mmkit/models/presets/*.json) with open_clip, pins the torch
thread count, optionally records epoch timings (see bench_timing.py), then calls
``open_clip_train.main.main(argv)`` unchanged. Runs in the separate open_clip venv, so mmkit is
not imported: the presets folder is found relative to this file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PRESETS = HERE.parent / "mmkit" / "models" / "presets"


def main() -> None:
    argv = sys.argv[1:]
    ours, theirs = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else ([], argv)
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--timing-json", default=None)
    args = ap.parse_args(ours)

    import torch
    import open_clip
    import open_clip_train.main as oc_main

    if args.threads:
        torch.set_num_threads(args.threads)
    open_clip.add_model_config(PRESETS)
    if args.timing_json:
        sys.path.insert(0, str(HERE))
        from bench_timing import time_open_clip_epochs

        time_open_clip_epochs(oc_main, args.timing_json)
    sys.exit(oc_main.main(theirs) or 0)


if __name__ == "__main__":
    main()
