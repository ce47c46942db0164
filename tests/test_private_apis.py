"""Every private name of another library that mmkit uses is listed, with its reason, in
docs/private-apis.md, and every listed name is still used (the list stays true both ways)."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "private-apis.md"


def _listed() -> dict[str, list[str]]:
    rows = re.findall(r"^\| (`[^|]+`) \| ([^|]+) \|", DOC.read_text(), re.M)
    # Each underscore-named part of a row's dotted names counts as listed (a private module and its member).
    return {part: re.findall(r"`([^`]+)`", files) for names, files in rows
            for name in re.findall(r"`([^`]+)`", names) for part in name.split(".") if part.startswith("_")}


def _foreign_private_uses() -> dict[str, set[str]]:
    """Underscore names used in mmkit/ that mmkit does not define itself: another library's."""
    sources = {p.relative_to(REPO).as_posix(): p.read_text() for p in sorted((REPO / "mmkit").rglob("*.py"))}
    own: set[str] = set()
    for text in sources.values():
        own.update(re.findall(r"\b(?:def|class)\s+(_\w+)", text))  # functions, methods, classes
        own.update(re.findall(r"^\s*(_\w+)\s*[:=]", text, re.M))  # module-level names
        own.update(re.findall(r"\bas\s+(_\w+)", text))  # import aliases
        own.update(re.findall(r"^from mmkit[\w.]* import \(?([^)\n]*)", text, re.M) and
                   [n for line in re.findall(r"^from mmkit[\w.]* import \(?([^)\n]*)", text, re.M) for n in re.findall(r"_\w+", line)])
        own.update(re.findall(r"^from mmkit[\w.]*\.(_\w+)", text, re.M))  # mmkit's own private modules
        for lhs in re.findall(r"^\s*((?:\w+\.\w+\s*,\s*)*\w+\.\w+)\s*(?::[^=\n]+)?=(?!=)", text, re.M):
            own.update(re.findall(r"\.(_\w+)", lhs))  # attributes mmkit assigns (its objects' own)
        own.update(re.findall(r"__setattr__\([^,]+,\s*\"(_\w+)\"", text))
    uses: dict[str, set[str]] = {}
    for path, text in sources.items():
        code = re.sub(r'"""[\s\S]*?"""|#[^\n]*|"[^"\n]*"', "", text)  # prose and strings may name private things
        found = re.findall(r"\.(_[a-z]\w*)", code) + re.findall(r"import\s+\(?([^)\n]*)", code)
        for item in found:
            for name in re.findall(r"\b(_[a-z]\w*)", item):
                if name not in own and not name.startswith("__"):
                    uses.setdefault(name, set()).add(path)
        for name in re.findall(r"(?:getattr|hasattr)\([^,]+,\s*\"(_[a-z]\w*)\"", re.sub(r'"""[\s\S]*?"""|#[^\n]*', "", text)):
            if name not in own:
                uses.setdefault(name, set()).add(path)
    return uses


def test_every_private_name_used_is_listed_with_its_files():
    listed, uses = _listed(), _foreign_private_uses()
    unlisted = {n: sorted(f) for n, f in uses.items() if n not in listed}
    assert not unlisted, f"private names of other libraries used but not listed in {DOC.name}: {unlisted}"
    for name, files in uses.items():
        assert set(files) <= set(listed[name]), f"{name} is used in {sorted(files)}, listed for {listed[name]}"


def test_every_listed_name_is_still_used_where_the_list_says():
    for name, files in _listed().items():
        for file in files:
            assert name in (REPO / file).read_text(), f"{DOC.name} lists {name} in {file}, which no longer uses it"
