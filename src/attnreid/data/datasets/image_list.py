"""Your own data as a list file: ``data.dataset: list``, ``data.root: LIST.csv`` (or ``.tsv``).

The first line names the columns, in any order: ``path``, ``pid``, ``camid``, ``split``
(more columns are allowed and ignored). Each further line is one image:

- ``path``: relative to the list file's folder, or absolute;
- ``pid``: an integer identity (``-1`` = junk, dropped; every other value, 0 included, is
  a person: there is no distractor label);
- ``camid``: an integer camera, or empty; either every line has one or none has (without
  cameras each file is its own pseudo-camera, docs/data.md);
- ``split``: ``train``, ``query`` or ``gallery``.

``.csv`` is comma-separated, ``.tsv`` tab-separated (Python's csv dialect: fields may be
quoted). A missing column, a non-integer pid or camid, an unknown split or a missing
image stops with one line naming the file and the line (a missing or empty image is
skipped instead with ``data.skip_bad_images``).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from attnreid.data.datasets.base import JUNK_PID, BadImages, Parsed, ReIDDataset, with_cameras
from attnreid.errors import DataError

COLUMNS = ("path", "pid", "camid", "split")
SPLITS = ("train", "query", "gallery")
DELIMITERS = {".csv": ",", ".tsv": "\t"}


def _integer(value: str, column: str, where: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise DataError(f"{where}: {column} {value!r} is not an integer") from None


def _parse_row(row: Dict[str, str], folder: Path, where: str) -> Tuple[str, str, int, Optional[int]]:
    """``(split, absolute path, pid, camera or None)`` of one line."""
    split = (row["split"] or "").strip().lower()
    if split not in SPLITS:
        raise DataError(f"{where}: split {row['split']!r} is not one of {', '.join(SPLITS)}")
    rel = (row["path"] or "").strip()
    if not rel:
        raise DataError(f"{where}: the path is empty")
    pid = _integer(row["pid"] or "", "pid", where)
    if pid < JUNK_PID:
        raise DataError(f"{where}: pid {pid} is negative (only -1, junk, is allowed)")
    cam_text = (row["camid"] or "").strip()
    cam = _integer(cam_text, "camid", where) if cam_text else None
    return split, os.path.normpath(os.path.join(folder, os.path.expanduser(rel))), pid, cam


def read_list(list_file: Path, bad: BadImages) -> Dict[str, List[Parsed]]:
    """The images of each split; every problem one line naming ``list_file`` and the line."""
    delimiter = DELIMITERS.get(list_file.suffix.lower())
    if delimiter is None:
        raise DataError(f"data.root {list_file} must be a .csv or .tsv list file (columns {', '.join(COLUMNS)})")
    try:
        text = list_file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read list file {list_file}: {getattr(exc, 'strerror', None) or exc}") from None
    reader = csv.reader(text.splitlines(), delimiter=delimiter)
    header = next(reader, None)
    names = [h.strip().lower() for h in header or []]
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise DataError(f"{list_file} line 1: missing column(s) {', '.join(missing)}; the first line must name "
                        f"the columns {', '.join(COLUMNS)} (found: {', '.join(names) or 'nothing'})")
    splits: Dict[str, List[Parsed]] = {s: [] for s in SPLITS}
    first: Dict[bool, int] = {}  # the first line with a camid (True) and without one (False)
    for line, fields in enumerate(reader, start=2):
        if not any(f.strip() for f in fields):
            continue
        where = f"{list_file} line {line}"
        if len(fields) < len(names):
            raise DataError(f"{where}: {len(fields)} field(s), but the header names {len(names)}")
        split, path, pid, cam = _parse_row(dict(zip(names, fields)), list_file.parent, where)
        first.setdefault(cam is not None, line)
        if cam is None and True in first or cam is not None and False in first:
            raise DataError(f"{where}: camid is {'empty' if cam is None else 'given'} but line {first[cam is None]} "
                            f"{'has one' if cam is None else 'has none'}; give every line a camid or none")
        if pid == JUNK_PID:
            continue
        try:
            size = os.path.getsize(path)
        except OSError:
            bad.report(path, f"{where}: image not found")
            continue
        if size == 0:
            bad.report(path, f"{where}: empty image file (0 bytes)")
            continue
        splits[split].append((path, pid, cam))
    return splits


class ListDataset(ReIDDataset):
    name = "list"
    distractor_pid = None

    def __init__(self, root: str, skip_bad_images: bool = False):
        list_file = Path(root).expanduser()
        if not list_file.is_file():
            raise DataError(f"list file not found: {root}; data.dataset=list needs data.root to name a .csv or "
                            f".tsv file with the columns {', '.join(COLUMNS)}")
        bad = BadImages(skip_bad_images)
        parsed = read_list(list_file, bad)
        if not any(parsed.values()):
            raise DataError(f"{list_file} lists no usable image")
        if bool(parsed["query"]) != bool(parsed["gallery"]):
            missing = "query" if not parsed["query"] else "gallery"
            raise DataError(f"{list_file} has no {missing} images: query and gallery go together "
                            f"(a training-only list has train lines alone)")
        lists, known = with_cameras(parsed, str(list_file))
        super().__init__(lists["train"], lists["query"], lists["gallery"], root=str(list_file), bad_images=bad.items)
        self.cameras_known = known
