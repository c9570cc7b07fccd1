"""The project stands alone: no file cites notes that live outside the repository, and every
``docs/theory.md §N`` citation names a section that docs/theory.md has.

The notes the project was designed from (its theory, design and performance notes) are not
shipped; what the code relies on is in docs/theory.md, docs/architecture.md and
docs/benchmarks.md. Walks the tracked text files (``git ls-files``).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = (".py", ".rs", ".md", ".pyi", ".ipynb", ".toml", ".sh")
THEORY = ROOT / "docs" / "theory.md"

# Built from pieces so that this file does not cite them itself.
_T = "THEORY"
FORBIDDEN = re.compile(
    "|".join(
        [
            re.escape(_T + ".md"),
            re.escape(_T) + r"\s*§",
            re.escape(_T + "'s"),
            re.escape("DESIGN" + ".md"),
            re.escape("PERF" + "_NOTES"),
            re.escape("STYLE" + ".md"),
            re.escape("../" + "shared"),
            re.escape("/work/" + "shared"),
        ]
    )
)
SECTION = r"\d+[a-z]?(?:\.\d+)*(?![A-Za-z0-9])"
# "docs/theory.md §5.1", "docs/theory.md §5.1 / §5.2", "docs/theory.md §2, §6", "... section 3".
CITATION = re.compile(r"docs/theory\.md((?:\s*(?:,|/|and|or)?\s*(?:§\s*|section\s+)" + SECTION + r")+)")
HEADING = re.compile(r"^#{1,6}\s+(" + SECTION + r")[.\s]")
# Sections the code and the other docs rely on (the numbering of the original notes).
REQUIRED = {"1", "2", "2b", "3", "4", "5", "5.1", "5.2", "5.3", "5.4", "6"}


def tracked_files() -> list[Path]:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except subprocess.CalledProcessError:
        pytest.skip("not a git checkout")
    names = [n for n in out.decode().split("\0") if n]
    return [ROOT / n for n in names if n.endswith(SUFFIXES) or n.startswith(".ci/")]


def lines_of(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []


def theory_sections() -> set[str]:
    return {m.group(1) for line in lines_of(THEORY) if (m := HEADING.match(line))}


def test_no_citation_of_notes_outside_the_project():
    offenders = [
        f"{path.relative_to(ROOT)}:{i}: {line.strip()[:120]}"
        for path in tracked_files()
        for i, line in enumerate(lines_of(path), 1)
        if FORBIDDEN.search(line)
    ]
    assert not offenders, (
        "cite docs/theory.md §N, docs/architecture.md or docs/benchmarks.md instead of notes that "
        "are not in the repository:\n" + "\n".join(offenders)
    )


def test_theory_has_the_cited_numbering():
    missing = REQUIRED - theory_sections()
    assert not missing, f"docs/theory.md lacks the sections {sorted(missing)}"


def test_every_theory_citation_names_an_existing_section():
    sections = theory_sections()
    bad = []
    for path in tracked_files():
        own = path == THEORY
        for i, line in enumerate(lines_of(path), 1):
            cited = [n for m in CITATION.finditer(line) for n in re.findall(SECTION, m.group(1))]
            if own and not HEADING.match(line):
                # Inside docs/theory.md a bare "§N" refers to its own sections.
                cited += re.findall(r"§\s*(" + SECTION + ")", line)
            bad += [f"{path.relative_to(ROOT)}:{i}: §{n}" for n in cited if n not in sections]
    assert not bad, f"citations of sections docs/theory.md does not have ({sorted(sections)}):\n" + "\n".join(bad)
