"""Every Markdown file a docstring, comment or Markdown page cites exists in the repository.

A citation is a name like `DESIGN.md`, `docs/REFERENCE.md` or `../README.md` whose last character before `.md` is an
upper-case letter or an underscore (the project's convention for documents; lower-case `.md` names are run outputs such
as `report.md`). It resolves when the path exists relative to the repository root or to the citing file, or when a
file of that name exists anywhere in the repository; a path that leaves the repository never resolves.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CITATION = re.compile(r"[A-Za-z0-9_./-]*[A-Z_]\.md\b")
SCANNED = (".py", ".md")
_SKIP_DIRS = {".git", ".venv", "venv", "__pycache__", "node_modules", "runs", ".pytest_cache", ".ruff_cache"}


def repo_files(root: Path) -> list[str]:
    """Paths (relative, '/'-separated) of the repository's files: git's tracked and untracked-but-not-ignored files,
    or, without git, a walk that skips caches and virtual environments."""
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            capture_output=True,
            check=True,
            timeout=30,
        ).stdout.decode("utf-8")
        files = [f for f in out.split("\0") if f]
        if files:
            return sorted(f for f in set(files) if (root / f).is_file())
    except (OSError, subprocess.SubprocessError):
        pass
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
        rel = Path(dirpath).relative_to(root)
        found += [(rel / f).as_posix() for f in filenames]
    return sorted(found)


def _resolves(cited: str, citing: str, files: set[str], basenames: set[str]) -> bool:
    """Whether `cited` (as written in `citing`) names a file of the repository."""
    paths = {os.path.normpath(os.path.join(base, cited)) for base in (".", os.path.dirname(citing))}
    inside = [Path(p).as_posix() for p in paths if not p.startswith("..") and not os.path.isabs(p)]
    if not inside:
        return False  # it points outside the repository
    return any(p in files for p in inside) or os.path.basename(cited) in basenames


def dangling_references(root: Path) -> list[str]:
    """`file:line: cited name` for every cited Markdown file that does not exist in the repository under `root`."""
    files = repo_files(root)
    known, basenames = set(files), {os.path.basename(f) for f in files}
    problems = []
    for rel in files:
        if not rel.endswith(SCANNED):
            continue
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if ".md" not in line:
                continue
            for match in CITATION.finditer(line):
                cited = match.group(0)
                if cited.startswith("//"):
                    continue  # the path of a URL (https://...): not a file of this repository
                if not _resolves(cited, rel, known, basenames):
                    problems.append(f"{rel}:{lineno}: {cited}")
    return problems


def test_planted_dangling_reference_is_reported(tmp_path):
    md = ".md"  # names below are built from it, so this file cites nothing it would have to resolve itself
    missing, outside = f"NOPE{md}", f"../shared/STYLE{md}"
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / f"DESIGN{md}").write_text(f"# Design\n\nSee [the notes](PAPER_NOTES{md}).\n")
    (tmp_path / "docs" / f"PAPER_NOTES{md}").write_text("# Notes\n")
    (tmp_path / f"README{md}").write_text(f"Read docs/DESIGN{md} and [x](docs/DESIGN{md}), and [y](../README{md}).\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(
        f'"""A module.\n\nThe contract (DESIGN{md} section 2).\n"""\n# {missing}\n'
    )
    (tmp_path / f"away{md}").write_text(f"Outside: {outside}\n")
    assert dangling_references(tmp_path) == [
        f"README{md}:1: ../README{md}",
        f"away{md}:1: {outside}",
        f"pkg/mod.py:5: {missing}",
    ]


def test_every_cited_markdown_file_exists():
    problems = dangling_references(REPO)
    assert not problems, "cited Markdown files missing from the repository:\n" + "\n".join(problems)
