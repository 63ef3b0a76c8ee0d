"""What every dataset loader shares: the dataset object, folder lookup, name parsing.

A loader returns a :class:`ReIDDataset` whose ``train``, ``query`` and ``gallery`` are
lists of ``(path, pid, camid)``: ``path`` is a file path or ``"<zip>::<member>"``, camids
are 0-based, train pids are relabelled 0..C-1 (query/gallery keep the dataset's own pids
so that distractors stay recognisable), junk images (pid -1) are dropped everywhere and
distractors (pid 0) are kept in the gallery only.
"""

from __future__ import annotations

import re
import sys
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from attnreid.data.io import Tree, is_image_name, join, open_trees
from attnreid.errors import DataError

Item = Tuple[str, int, int]

# <pid>_c<cam>..., the Market-1501 / DukeMTMC-reID / CUHK03-NP convention.
MARKET_NAME = re.compile(r"^(-?\d+)_c(\d+)")
JUNK_PID = -1
DISTRACTOR_PID = 0


class ReIDDataset:
    """Train / query / gallery lists of one benchmark.

    Attributes: ``name``, ``protocol`` (``"market"``: cross-camera single-query, CMC and
    mAP; ``"partial"``: query = partial bodies, gallery = whole bodies, Rank-1/3),
    ``root`` (where the data was found: a folder or ``zip::folder``), ``bad_images``
    (``(path, reason)`` pairs skipped because ``skip_bad_images`` was set) and ``extras``
    (optional additional lists, e.g. Market's ``gt_bbox`` for multi-query).
    """

    name: str = "dataset"
    protocol: str = "market"

    def __init__(
        self,
        train: List[Item],
        query: List[Item],
        gallery: List[Item],
        root: str = "",
        bad_images: Optional[List[Tuple[str, str]]] = None,
        extras: Optional[Dict[str, List[Item]]] = None,
    ):
        self.train = relabel(train)
        self.query = query
        self.gallery = gallery
        self.root = root
        self.bad_images = list(bad_images or [])
        self.extras = dict(extras or {})

    @property
    def num_train_pids(self) -> int:
        return len({pid for _, pid, _ in self.train})

    @property
    def num_train_cams(self) -> int:
        return len({cam for _, _, cam in self.train})

    def stats(self) -> Dict[str, Dict[str, int]]:
        """``{"train"|"query"|"gallery": {"images", "ids", "cams"}}``; distractors count as one id."""
        return {split: split_stats(getattr(self, split)) for split in ("train", "query", "gallery")}

    def __repr__(self) -> str:
        s = self.stats()
        parts = ", ".join(f"{k}={v['images']}/{v['ids']}/{v['cams']}" for k, v in s.items())
        return f"<{type(self).__name__} {self.name} {parts} (images/ids/cams)>"


def split_stats(items: Sequence[Item]) -> Dict[str, int]:
    return {
        "images": len(items),
        "ids": len({pid for _, pid, _ in items}),
        "cams": len({cam for _, _, cam in items}),
    }


def relabel(items: Iterable[Item]) -> List[Item]:
    """Map the pids of ``items`` to 0..C-1 in increasing order of the original pid."""
    items = list(items)
    mapping = {pid: i for i, pid in enumerate(sorted({pid for _, pid, _ in items}))}
    return [(path, mapping[pid], cam) for path, pid, cam in items]


class BadImages:
    """Collects skipped files when ``skip_bad_images`` is set, raises otherwise."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.items: List[Tuple[str, str]] = []

    def report(self, path: str, reason: str) -> None:
        if not self.skip:
            raise DataError(f"{reason}: {path}")
        self.items.append((path, reason))


def resolve(tree: Tree, rel: str) -> Optional[str]:
    """``rel`` inside ``tree`` with each component matched case-insensitively, or None."""
    current = ""
    for part in [p for p in rel.split("/") if p]:
        found = tree.find_child(current, part)
        if found is None:
            return None
        current = found
    return current


def locate(
    root: str,
    title: str,
    candidates: Sequence[str],
    required: Sequence[str],
    zip_hints: Sequence[str],
) -> Tuple[Tree, str]:
    """Find the dataset folder under ``root`` (a folder or a zip).

    Tries each tree (the folder, then matching zips inside it) and each candidate relative
    folder (torchreid's names and the dataset's own), case-insensitively, and returns the
    first holding every ``required`` sub-folder. A candidate holding only some of them is
    a "missing split folder" error naming the first missing one.
    """
    trees = open_trees(root, tuple(zip_hints))
    for tree in trees:
        for cand in candidates:
            base = resolve(tree, cand)
            if base is None:
                continue
            present = [resolve(tree, join(base, r)) for r in required]
            if all(p is not None for p in present):
                return tree, base
            if any(p is not None for p in present):
                missing = next(r for r, p in zip(required, present) if p is None)
                raise DataError(
                    f"missing split folder {tree.path(join(base, missing))}; {title} needs "
                    f"{', '.join(required)} in {tree.path(base) if base else tree.location}"
                )
    shown = ", ".join(f"{c}/" if c else "the root itself" for c in candidates[1:4])
    raise DataError(
        f"no {title} data under {root}; expected {candidates[0]}/{{{','.join(required)}}} "
        f"(also accepted: {shown + ', ' if shown else ''}or a .zip of it)"
    )


def list_images(tree: Tree, rel: str, bad: BadImages, example: str) -> List[str]:
    """Relative paths of the images directly in ``rel``; empty files are reported as bad."""
    names = [n for n in tree.files(rel) if is_image_name(n)]
    out = []
    for name in names:
        path = join(rel, name)
        if tree.size(path) == 0:
            bad.report(tree.path(path), "empty image file (0 bytes; expected a JPEG/PNG image)")
            continue
        out.append(path)
    if not out:
        raise DataError(f"split folder {tree.path(rel)} holds no images; expected files like {example}")
    return out


def parse_market_split(
    tree: Tree,
    rel: str,
    bad: BadImages,
    keep_distractors: bool,
    example: str = "0002_c1s1_000451_03.jpg",
    pattern: "re.Pattern[str]" = MARKET_NAME,
) -> List[Item]:
    """Read one split folder of Market-style names (``<pid>_c<cam>...``).

    Junk (pid -1) is dropped; distractors (pid 0) are kept only if ``keep_distractors``.
    """
    items: List[Item] = []
    for path in list_images(tree, rel, bad, example):
        name = path.rsplit("/", 1)[-1]
        m = pattern.match(name)
        cam = int(m.group(2)) if m else 0
        if m is None or cam < 1:
            bad.report(tree.path(path), f"cannot parse file name (expected <pid>_c<camera>..., like {example})")
            continue
        pid = int(m.group(1))
        if pid == JUNK_PID or (pid == DISTRACTOR_PID and not keep_distractors):
            continue
        if pid < JUNK_PID:
            bad.report(tree.path(path), f"cannot parse file name (negative pid; expected like {example})")
            continue
        items.append((tree.path(path), pid, cam - 1))
    if not items:
        raise DataError(f"split folder {tree.path(rel)} holds no usable images; expected files like {example}")
    return items


class MarketStyleDataset(ReIDDataset):
    """A dataset in the Market-1501 layout: ``bounding_box_train``, ``query``, ``bounding_box_test``.

    Subclasses set ``name``, ``title``, the accepted folder ``candidates`` (first = the
    dataset's own name), ``zip_hints`` and an ``example`` file name.
    """

    title = "Market-style"
    candidates: Tuple[str, ...] = ("",)
    zip_hints: Tuple[str, ...] = ()
    example = "0002_c1s1_000451_03.jpg"
    splits = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}

    def __init__(self, root: str, skip_bad_images: bool = False):
        tree, base = locate(str(root), self.title, self.candidates, tuple(self.splits.values()), self.zip_hints)
        bad = BadImages(skip_bad_images)
        lists = {}
        for split, folder in self.splits.items():
            rel = resolve(tree, join(base, folder))
            assert rel is not None  # locate() checked it
            lists[split] = parse_market_split(tree, rel, bad, keep_distractors=split == "gallery", example=self.example)
        super().__init__(lists["train"], lists["query"], lists["gallery"], root=tree.path(base) if base else tree.location,
                         bad_images=bad.items, extras=self._extras(tree, base, bad))

    def _extras(self, tree: Tree, base: str, bad: BadImages) -> Dict[str, List[Item]]:
        return {}


def warn_bad(bad_images: List[Tuple[str, str]], out: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> None:
    """List skipped files on stderr (used by the CLI when skip_bad_images is set)."""
    for path, reason in bad_images:
        out(f"skipped: {path} ({reason})")
