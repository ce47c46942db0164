"""Every command shown in a ```bash block of README.md and docs/*.md is either run by a test
(`RUN_BY`: a pattern of the command -> the tests that run it, at test size) or cannot run on a CPU
machine (`NOT_ON_CPU`, or a `<!-- not-on-cpu: REASON -->` line right before its block), with the
reason. A command with neither fails here, as does a registry row that matches no command or names
a test that does not exist. Also: every internal link and anchor of the docs resolves, and the
README opens with the two commands that CI and the Docker images use."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import tomllib

REPO = Path(__file__).parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

CLI_EVAL = "tests/e2e/test_cli_eval_runs.py::test_eval_subcommands_leave_the_fit_alone_and_write_to_folders_of_their_own"
DEFAULT_FIT = "tests/e2e/test_default_recipe.py::test_default_recipe_learns_reports_and_serves_the_other_subcommands"
TOP_COMMANDS = "tests/docs/test_docs_commands.py::test_readme_opens_with_the_two_commands_ci_and_the_images_use"
RUN_BY: list[tuple[str, list[str]]] = [
    # The README's two commands: the fit at test size; the install step is the one .ci/run and the
    # images use (checked there); `pytest` is the suite itself.
    (r"python3 -m venv \.venv && \.venv/bin/pip install -q -e '\.\[recipes\]' && \.venv/bin/mmkit fit --config recipes/default\.yaml",
     [DEFAULT_FIT, TOP_COMMANDS]),
    (r"python3 -m venv \.venv && \.venv/bin/pip install -q -e '\.\[dev\]' && \.venv/bin/python -m pytest -q", [TOP_COMMANDS]),
    (r"\.venv/bin/python -m pytest -q( -m \"not slow\"| tests/losses)?", [TOP_COMMANDS]),  # subsets of what CI runs
    (r"mmkit fit --config recipes/default\.yaml", [DEFAULT_FIT]),
    (r"mmkit (validate|test|export) --config recipes/default\.yaml --ckpt_path runs/default/checkpoints/last\.ckpt( --out my_model/)?",
     [CLI_EVAL]),
    (r"mmkit predict --config recipes/default\.yaml --ckpt_path \.\.\. --data\.init_args\.predict .*",
     [CLI_EVAL, "tests/e2e/test_cli_eval_runs.py::test_predict_on_two_processes_writes_one_folder"]),
    (r"mmkit fit --config recipes/default\.yaml --ckpt_path last",
     ["tests/reliability/test_reliability_kill_resume.py::test_sigkill_mid_epoch_then_resume_last_matches_the_uninterrupted_run"]),
    (r"mmkit fit --config recipes/default\.yaml --print_config",
     ["tests/docs/test_docs_commands_run.py::test_fit_print_config_shows_every_knob_with_its_default"]),
    (r"mmkit fit --config recipes/default\.yaml --config recipes/siglip\.yaml",
     ["tests/recipes/test_recipes_run.py::test_siglip_overlay_runs_after_the_default_recipe"]),
    ((r"mmkit fit --config recipes/own_data\.yaml --data\.init_args\.train\.init_args\.path my_data/train\.csv "
      r"--data\.init_args\.val\.init_args\.path my_data/val\.csv --trainer\.default_root_dir runs/my_data"),
     ["tests/recipes/test_recipes_run.py::test_own_data_recipe_with_its_placeholders_filled"]),
    (r"mmkit fit --config recipes/kd_student\.yaml",
     ["tests/techniques/test_kd_student.py::test_recipe_runs_through_the_cli_live_and_from_precomputed_embeddings"]),
    (r"mmkit fit --config recipes/metric_align\.yaml", ["tests/techniques/test_metric_align.py::test_recipe_runs_three_steps_through_the_cli"]),
    (r"mmkit fit --config recipes/align_gan\.yaml", ["tests/techniques/test_align_gan.py::test_recipe_runs_through_the_cli"]),
    (r"mmkit fit --config recipes/ewc_incremental\.yaml",
     ["tests/techniques/test_ewc_incremental.py::test_recipe_runs_a_few_steps_through_the_cli"]),
    (r"mmkit fit --config recipes/default\.yaml --trainer\.strategy fsdp2 --trainer\.devices 2",
     ["tests/docs/test_docs_commands_run.py::test_default_recipe_under_fsdp2_on_two_cpu_processes"]),
    # GPU-sized as written (ViT-L/14, bf16); the test runs the recipe itself on 2 CPU processes.
    (r"mmkit (fit|export) --config recipes/clip_fsdp\.yaml( --ckpt_path runs/clip_fsdp/checkpoints/last\.ckpt --out my_model/)?",
     ["tests/techniques/test_fsdp_recipe.py::test_fsdp2_recipe_on_two_processes_matches_one_process_and_exports_its_sharded_checkpoint"]),
    (r"PYTHONPATH=\. mmkit fit --config recipes/default\.yaml --config my_loss\.yaml",
     ["tests/losses/test_loss_protocol.py::test_docs_example_loss_runs_in_a_recipe_through_the_cli"]),
    (r"PYTHONPATH=\. mmkit fit --config recipes/default\.yaml --config my_data\.yaml --trainer\.default_root_dir runs/my_data",
     ["tests/docs/test_extending.py::test_own_data_source_trains_and_is_a_zero_shot_set"]),
    (r"PYTHONPATH=\. mmkit fit --config recipes/default\.yaml --config my_technique\.yaml --trainer\.default_root_dir runs/my_technique",
     ["tests/docs/test_extending.py::test_own_technique_adds_its_penalty_to_the_step"]),
    (r"mmkit benchmark --model (runs/default/checkpoints/last\.ckpt|runs/default/export|my_recipe\.yaml) --benchmarks .*",
     ["tests/benchmarks/test_callback_and_command.py::test_callback_numbers_equal_the_command_on_checkpoint_and_export"]),
    (r"mmkit benchmark --model ViT-B-32 --pretrained weights\.safetensors .*",
     ["tests/benchmarks/test_open_clip_reference.py::test_open_clip_pretrained_equals_open_clip_zero_shot"]),
    (r"torchrun --nproc_per_node 2 -m mmkit\.cli benchmark .*",
     ["tests/benchmarks/test_benchmarks_multiprocess_runs.py::test_ddp_callback_and_torchrun_command_equal_one_process"]),
    (r"mmkit explain (--config recipes/default\.yaml --ckpt_path runs/default/checkpoints/last\.ckpt|--model local-dir:my_model/) .*",
     ["tests/explain/test_docs_explain_commands.py::test_docs_explain_commands_run_as_written"]),
]

DEEPSPEED_ON_CPU = ("Lightning refuses DeepSpeed on CPU; tests/techniques/test_deepspeed.py and "
                    "test_deepspeed_modules.py run these recipes and modules on 2 CPU processes with that check removed")
NOT_ON_CPU: list[tuple[str, str]] = [
    (r"(NNODES=4 NODE_RANK=0 )?NPROC_PER_NODE=8 .*bash recipes/launch/torchrun\.sh recipes/webdataset_vitb32_ddp\.yaml",
     ("8 GPUs per node; the launcher itself runs with 2 CPU processes in "
      "tests/e2e/test_multiprocess_defaults.py::test_torchrun_launcher_with_two_processes_exits_by_itself")),
    (r"sbatch .*recipes/launch/slurm\.sbatch recipes/webdataset_vitb32_ddp\.yaml",
     "needs a SLURM cluster; tests/launch/test_launch_scripts.py checks the script"),
    (r"mmkit fit --config recipes/clip_deepspeed_zero[23]\.yaml( --trainer\.strategy\.init_args\.config recipes/deepspeed/zero3_offload\.json)?",
     DEEPSPEED_ON_CPU),
    (r"mmkit fit --config recipes/(metric_align|align_gan)\.yaml .*--trainer\.accelerator gpu .*DeepSpeedStrategy.*", DEEPSPEED_ON_CPU),
    (r"mmkit export --config recipes/clip_deepspeed_zero3\.yaml .*|python -c \"from lightning\.pytorch\.utilities\.deepspeed .*",
     ("needs a ZeRO checkpoint from a GPU run; consolidating and exporting one is tested in "
      "tests/techniques/test_deepspeed.py::test_zero_checkpoint_consolidates_and_exports")),
]


def _comment_free(line: str) -> str:
    """The command without its trailing comment (a `#` outside quotes), spaces collapsed."""
    lexer = shlex.shlex(line, posix=False)
    lexer.whitespace_split, lexer.commenters = True, "#"
    return " ".join(lexer)


def commands() -> list[tuple[str, str, str | None]]:
    """(where, command, not-on-cpu reason from a marker before its block) for every command line."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for match in re.finditer(r"(?:<!-- not-on-cpu: (.+?) -->\s*\n)?^ *```bash\n(.*?)^ *```", text,
                                 flags=re.DOTALL | re.MULTILINE):
            reason, block = match.group(1), match.group(2).replace("\\\n", " ")
            line_no = text[: match.start(2)].count("\n") + 1
            for offset, line in enumerate(block.splitlines()):
                command = _comment_free(line.strip())
                if command:
                    found.append((f"{doc.relative_to(REPO)}:{line_no + offset}", command, reason))
    return found


def _mapped(command: str) -> list[str] | str | None:
    for pattern, tests in RUN_BY:
        if re.fullmatch(pattern, command):
            return tests
    for pattern, reason in NOT_ON_CPU:
        if re.fullmatch(pattern, command):
            return reason
    return None


def test_every_command_is_run_by_a_test_or_says_why_it_cannot_run_on_cpu():
    found = commands()
    assert len(found) > 20  # the parser sees the blocks
    unmapped = [f"{where}: {command}" for where, command, reason in found if not reason and _mapped(command) is None]
    assert not unmapped, "commands in the docs with no test and no not-on-cpu reason " \
                         "(add a row to RUN_BY or NOT_ON_CPU):\n" + "\n".join(unmapped)


def test_every_registry_row_matches_a_command():
    shown = [command for _, command, _ in commands()]
    for pattern, _ in [*RUN_BY, *NOT_ON_CPU]:
        assert any(re.fullmatch(pattern, c) for c in shown), f"no command in the docs matches {pattern!r}"


def _defines(path: Path, name: str) -> bool:
    tree = ast.parse(path.read_text())
    return any(isinstance(node, ast.FunctionDef) and node.name == name for node in ast.walk(tree))


def test_the_tests_named_exist():
    ids = {test for _, tests in RUN_BY for test in tests}
    ids |= {m for _, reason in NOT_ON_CPU for m in re.findall(r"tests/\S+\.py::\w+", reason)}
    for test_id in ids:
        file, name = test_id.split("::")
        assert (REPO / file).is_file(), test_id
        assert _defines(REPO / file, name), f"{file} defines no {name}"


def test_not_on_cpu_markers_give_a_reason():
    for doc in DOCS:
        for reason in re.findall(r"<!-- not-on-cpu:(.*?)-->", doc.read_text()):
            assert len(reason.strip()) > 10, f"{doc.name}: a not-on-cpu marker without a reason"


# -- links ---------------------------------------------------------------------------------------
def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, -1, -2 for repeats."""
    text = re.sub(r"^ *```.*?^ *```", "", path.read_text(), flags=re.DOTALL | re.MULTILINE)
    anchors, counts = set(), {}
    for heading in re.findall(r"^#{1,6} +(.+?) *$", text, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        n = counts.get(slug, 0)
        counts[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_internal_links_and_anchors_resolve():
    broken = []
    for doc in DOCS:
        text = re.sub(r"^ *```.*?^ *```", "", doc.read_text(), flags=re.DOTALL | re.MULTILINE)
        text = re.sub(r"`[^`\n]*`", "", text)  # inline code is not a link
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s):, mailto:
            path, _, anchor = target.partition("#")
            file = (doc.parent / path).resolve() if path else doc
            if not file.exists():
                broken.append(f"{doc.relative_to(REPO)}: {target} (no such file)")
            elif anchor and (file.suffix != ".md" or anchor not in _anchors(file)):
                broken.append(f"{doc.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_anchor_rule_follows_github():
    assert {"exports", "models-mmkitmodels"} <= _anchors(REPO / "docs" / "models.md")
    assert "what-a-checkpoint-holds-and-why-it-is-that-big" in _anchors(REPO / "docs" / "checkpoints.md")


# -- the README's two commands -------------------------------------------------------------------
def _readme_top_block() -> list[str]:
    block = re.search(r"^```bash\n(.*?)^```", (REPO / "README.md").read_text(), flags=re.DOTALL | re.MULTILINE).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_opens_with_the_two_commands_ci_and_the_images_use():
    text = (REPO / "README.md").read_text()
    assert text.startswith("# mmkit\n\n```bash\n")  # the commands come first
    main_job, test_suite = _readme_top_block()  # exactly two
    assert main_job.startswith("python3 -m venv .venv && ") and test_suite.startswith("python3 -m venv .venv && ")
    assert "pip install -q -e '.[recipes]'" in main_job and main_job.endswith("mmkit fit --config recipes/default.yaml")
    assert "pip install -q -e '.[dev]'" in test_suite and test_suite.endswith("python -m pytest -q")
    # .ci/run is exactly the test command (from a fresh clone)
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert ci[-1] == test_suite, ci
    # the test install has everything the user install has
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras["recipes"]) <= set(extras["dev"])
    assert set(extras["minilm"]) | set(extras["deepspeed"]) <= set(extras["recipes"])
