"""What every dataset loader shares: the dataset object, folder lookup, name parsing.

A loader returns a :class:`ReIDDataset` whose ``train``, ``query`` and ``gallery`` are
lists of ``(path, pid, camid)``: ``path`` is a file path or ``"<zip>::<member>"``, camids
are 0-based, train pids are relabelled 0..C-1 (query/gallery keep the dataset's own pids
so that distractors stay recognisable), junk images (pid -1) are dropped everywhere and
distractors (pid 0) are kept in the gallery only.

Sets without camera ids (``cameras_known = False``: the ``folder`` and ``list`` kinds when
the names or the list carry none) give every distinct image file its own pseudo-camera
(:func:`file_cameras`), so the Market protocol's same-(identity, camera) removal removes
exactly a query's own file and same-camera matches count (docs/data.md).
"""

from __future__ import annotations

import re
import sys
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from attnreid.data.io import Tree, is_image_name, join, open_trees
from attnreid.errors import DataError

Item = Tuple[str, int, int]
Parsed = Tuple[str, int, Optional[int]]  # path, pid, camera (None: unknown), before with_cameras

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
    # False: the camids are per-file pseudo-cameras (file_cameras), not real cameras.
    cameras_known: bool = True
    # The label of distractor images (Market's 0000), which are no identity; None: every pid is one.
    distractor_pid: Optional[int] = DISTRACTOR_PID

    def __init__(
        self,
        train: List[Item],
        query: List[Item],
        gallery: List[Item],
        root: str = "",
        bad_images: Optional[List[Tuple[str, str]]] = None,
        extras: Optional[Dict[str, List[Item]]] = None,
    ):
        # the dataset's own pid of each training label (relabel keeps their increasing order)
        self.train_source_pids = sorted({pid for _, pid, _ in train})
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

    def stats(self) -> Dict[str, Dict[str, Optional[int]]]:
        """``{"train"|"query"|"gallery": {"images", "ids", "cams"}}``; distractors count as one id;
        ``cams`` is None when the set has no camera ids."""
        out = {split: split_stats(getattr(self, split)) for split in ("train", "query", "gallery")}
        if not self.cameras_known:
            for s in out.values():
                s["cams"] = None
        return out

    def __repr__(self) -> str:
        s = self.stats()
        parts = ", ".join(f"{k}={v['images']}/{v['ids']}/{v['cams']}" for k, v in s.items())
        return f"<{type(self).__name__} {self.name} {parts} (images/ids/cams)>"


def split_stats(items: Sequence[Item]) -> Dict[str, Optional[int]]:
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


def file_cameras(splits: Sequence[List[Tuple[str, int]]]) -> List[List[Item]]:
    """``(path, pid)`` lists -> ``(path, pid, camid)`` lists where camid numbers the distinct files.

    The protocol for sets without cameras: one pseudo-camera per file, numbered over all
    the lists together (in sorted path order), so a file in both query and gallery has one
    camid and the same-(pid, camid) rule removes exactly that file from its own ranking.
    """
    numbers = {path: i for i, path in enumerate(sorted({p for items in splits for p, _ in items}))}
    return [[(p, pid, numbers[p]) for p, pid in items] for items in splits]


def with_cameras(splits: Dict[str, List[Parsed]], where: str) -> Tuple[Dict[str, List[Item]], bool]:
    """Real cameras when every image has one, per-file pseudo-cameras when none has; else one line."""
    every = [item for items in splits.values() for item in items]
    with_cam = next((p for p, _, c in every if c is not None), None)
    without = next((p for p, _, c in every if c is None), None)
    if with_cam is not None and without is not None:
        raise DataError(f"{where}: some images have a camera id in their name (e.g. {with_cam}) and some do not "
                        f"(e.g. {without}); give every image a camera (..._c<N>...) or none")
    if without is None:
        return {s: [(p, pid, int(c)) for p, pid, c in items] for s, items in splits.items()}, True
    names = list(splits)
    lists = file_cameras([[(p, pid) for p, pid, _ in splits[s]] for s in names])
    return dict(zip(names, lists)), False


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


_warned_cameras: set = set()


def camera_warning(dataset) -> Optional[str]:
    """The one-line warning for a set without camera ids (None for a set with cameras)."""
    if getattr(dataset, "cameras_known", True):
        return None
    return (f"warning: dataset {dataset.root} has no camera ids: a query's own file is left out, but "
            f"same-camera matches count, so its numbers are not comparable with the benchmarks' "
            f"cross-camera numbers (docs/data.md)")


def warn_unknown_cameras(dataset, out: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> None:
    """Print :func:`camera_warning` once per data root and process (not again for periodic evaluations
    or for the validation split held out of the same data)."""
    text = camera_warning(dataset)
    key = str(getattr(dataset, "root", ""))
    if text is not None and key not in _warned_cameras:
        _warned_cameras.add(key)
        out(text)
