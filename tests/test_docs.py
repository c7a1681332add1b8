"""Citations of the project's own documents resolve (docs/design.md §11).

Code and docs cite sections as `docs/<path>.md §N` (or `§N.M`, or a list `§N, §M`); each cited file must exist
under the repository root and have a heading line `## §N …` / `### §N.M …`. The first plan's file names are not
the project's documents: a citation of a bare `DESIGN.md` or `STYLE.md` (not `docs/…`) points at nothing.
Scans every *.py and *.md file except hidden and build directories, generated benchmark outputs under
docs/benchmarks/ (the hand-written notes/ are scanned) and this file, whose examples are deliberately broken.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
THIS_FILE = Path(__file__).resolve()
SKIPPED_DIRS = {"__pycache__", "node_modules", "many-store", "build", "dist", "out"}
GENERATED = ("docs/benchmarks/",)  # benchmark outputs (report.md per run) …
HAND_WRITTEN = ("docs/benchmarks/notes/",)  # … except the commentary appended to BENCHMARKS.md

_SECTION = r"§\d+(?:\.\d+)?"
CITATION = re.compile(
    rf"(?<![\w-])docs/(?P<path>[\w./-]+?\.md) +(?P<sections>{_SECTION}(?:(?:, *| and | / ){_SECTION})*)"
)
HEADING = re.compile(r"^#{1,6} (§\d+(?:\.\d+)?)(?=\s|$)", re.MULTILINE)
BARE = re.compile(r"(?<!docs/)(?<![\w/.-])(?:DESIGN|STYLE)\.md", re.IGNORECASE)


def _skipped(directory: str) -> bool:
    return directory.startswith(".") or directory in SKIPPED_DIRS or directory.endswith(".egg-info")


def source_files(root: Path) -> Iterator[Path]:
    """Every *.py and *.md file under `root` that the checks read, in a stable order. Skipped directories are
    pruned, not walked (a .venv or a local store holds many thousands of files)."""
    for parent, directories, names in os.walk(root):
        directories[:] = sorted(d for d in directories if not _skipped(d))
        for name in sorted(names):
            path = Path(parent, name)
            posix = path.relative_to(root).as_posix()
            if path.suffix not in (".py", ".md") or path.resolve() == THIS_FILE:
                continue
            if posix.startswith(GENERATED) and not posix.startswith(HAND_WRITTEN):
                continue
            yield path


def headings(doc: Path) -> set[str]:
    """The section numbers of `doc`'s headings, "§N" and "§N.M"."""
    return set(HEADING.findall(doc.read_text(encoding="utf-8")))


def citations(text: str) -> Iterator[tuple[int, str, str]]:
    """(line number, cited path under the root, "§N" or "§N.M") for every section of every citation in `text`."""
    for line_no, line in enumerate(text.splitlines(), start=1):
        for match in CITATION.finditer(line):
            for section in re.findall(_SECTION, match["sections"]):
                yield line_no, f"docs/{match['path']}", section


def broken_citations(root: Path, files: list[Path]) -> list[str]:
    """`file:line  docs/x.md §N: why` for each citation whose file or heading does not exist."""
    known: dict[str, set[str] | None] = {}
    broken = []
    for path in files:
        for line_no, doc, section in citations(path.read_text(encoding="utf-8", errors="replace")):
            if doc not in known:
                target = root / doc
                known[doc] = headings(target) if target.is_file() else None
            sections = known[doc]
            if sections is None:
                why = "no such file"
            elif section not in sections:
                why = f"no heading {section} (has {', '.join(sorted(sections, key=_order)) or 'none'})"
            else:
                continue
            broken.append(f"{path.relative_to(root)}:{line_no}  {doc} {section}: {why}")
    return broken


def bare_citations(root: Path, files: list[Path]) -> list[str]:
    """`file:line  text` for each mention of DESIGN.md / STYLE.md not written as docs/<path>.md."""
    found = []
    for path in files:
        for line_no, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
            for match in BARE.finditer(line):
                found.append(f"{path.relative_to(root)}:{line_no}  {match[0]}")
    return found


def _order(section: str) -> tuple[int, ...]:
    return tuple(int(part) for part in section.removeprefix("§").split("."))


# -- the repository -----------------------------------------------------------------------------------------------


def test_design_doc_keeps_its_numbering() -> None:
    """docs/design.md has the top-level sections §1..§11, in order (code cites them by number)."""
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    top = re.findall(r"^## §(\d+) ", text, re.MULTILINE)
    assert top == [str(n) for n in range(1, 12)]


def test_every_docs_citation_resolves() -> None:
    files = list(source_files(ROOT))
    assert files, f"no *.py or *.md files found under {ROOT}"
    broken = broken_citations(ROOT, files)
    assert not broken, "citations of missing documents or sections:\n" + "\n".join(broken)


def test_no_bare_design_or_style_citation() -> None:
    """The first plan's names must not be cited; cite docs/design.md §N instead."""
    bare = bare_citations(ROOT, list(source_files(ROOT)))
    assert not bare, f"{len(bare)} citations of a bare DESIGN/STYLE file (write docs/design.md §N):\n" + "\n".join(bare)


# -- the checks themselves ------------------------------------------------------------------------------------------


def test_citation_regex_finds_sections_and_lists() -> None:
    text = 'x = 1  # (docs/design.md §2 "Cache key", §5)\n"""See docs/design.md §3.2, §4 and docs/other.md §1."""\n'
    assert list(citations(text)) == [
        (1, "docs/design.md", "§2"),
        (2, "docs/design.md", "§3.2"),
        (2, "docs/design.md", "§4"),
        (2, "docs/other.md", "§1"),
    ]
    assert list(citations("mydocs/design.md §1, design.md §2, docs/design.md without a section")) == []


def test_wrong_section_and_missing_file_are_reported(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "design.md").write_text("# title\n\n## §1 The method\n\n### §1.2 CPM\n\n## §2 The pipeline\n")
    source = tmp_path / "module.py"
    source.write_text(
        '"""Good: docs/design.md §1, §1.2 and docs/design.md §2."""\n'
        "# bad: docs/design.md §3 and docs/design.md §1.5\n"
        "# missing: docs/nowhere.md §1\n"
    )
    assert broken_citations(tmp_path, [source]) == [
        "module.py:2  docs/design.md §3: no heading §3 (has §1, §1.2, §2)",
        "module.py:2  docs/design.md §1.5: no heading §1.5 (has §1, §1.2, §2)",
        "module.py:3  docs/nowhere.md §1: no such file",
    ]


def test_bare_first_plan_names_are_reported(tmp_path: Path) -> None:
    source = tmp_path / "notes.md"
    source.write_text("cites DESIGN.md §3 and (STYLE.md \"Tests\")\nfine: docs/design.md §3, docs/style.md\n")
    assert bare_citations(tmp_path, [source]) == ["notes.md:1  DESIGN.md", "notes.md:1  STYLE.md"]


def test_generated_and_hidden_files_are_skipped(tmp_path: Path) -> None:
    for rel in ("a.py", "docs/benchmarks/run/report.md", "docs/benchmarks/notes/n.md", ".venv/x.py", "b/__pycache__/c.py",
                "many.egg-info/d.md", "e.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("")
    assert [p.relative_to(tmp_path).as_posix() for p in source_files(tmp_path)] == ["a.py", "docs/benchmarks/notes/n.md"]
