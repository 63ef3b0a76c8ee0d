"""The repository stands alone: nothing in it points at files a user who clones it does not have."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Written in two pieces, so that this file does not match itself.
OUTSIDE = re.compile("SPEC" + r"\.md|\.\./" + "shared|/work/" + "shared")
PLACES = ["src", "docs", "configs", "tests", "benchmarks", "README.md", "pyproject.toml"]
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".toml", ".txt", ".cfg"}


def files():
    for place in PLACES:
        path = ROOT / place
        if path.is_file():
            yield path
            continue
        for f in sorted(path.rglob("*")):
            # benchmarks/results record where each measurement read its data: history, not a reference
            if f.is_file() and f.suffix in SUFFIXES and "results" not in f.relative_to(ROOT).parts[:2] \
                    and ".egg-info" not in str(f):
                yield f


def test_no_reference_to_files_outside_the_repository():
    bad = [f"{f.relative_to(ROOT)}:{n}" for f in files()
           for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1) if OUTSIDE.search(line)]
    assert not bad, "refers to files outside the repository (cite docs/spec.md, use $ATTNREID_DATA): " + ", ".join(bad)


def test_the_pattern_finds_each_form():
    assert all(OUTSIDE.search(s) for s in ("see " + "SPEC" + ".md 1", "--root ../" + "shared/data", "/work/" + "shared/x"))
    assert not OUTSIDE.search("docs/spec.md §1")
