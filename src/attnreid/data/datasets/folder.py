"""Your own data as folders of crops: ``data.dataset: folder``, ``data.root: DIR``.

Layout: ``DIR`` (a folder or a ``.zip``) holds the split folders ``train/``, ``query/`` and
``gallery/`` (names matched case-insensitively; Market's ``bounding_box_train/`` and
``bounding_box_test/`` are accepted for train and gallery, so a Market-style copy reads as
is). ``train/`` may be missing (a test-only set); ``query/`` and ``gallery/`` come together or
not at all. Inside a split folder the images may lie at any depth.

Identity and camera of an image (docs/data.md):

- in a per-person folder, i.e. one whose name is an integer (``train/0007/any_name.jpg``),
  the identity is the folder's name;
- otherwise the file name starts with it: ``0007_c2s1_000151_01.jpg``, ``0007_frame3.jpg``
  or ``7.jpg`` (Market-style names);
- the camera is a ``c<N>`` token right after the identity (``0007_c2s1_...``, Duke's
  ``0007_c2_f0046182.jpg``) or, in a per-person folder, at the start of the name
  (``train/0007/c2_000123.jpg``). Either every image has a camera or none has; without
  cameras each file is its own pseudo-camera (:func:`attnreid.data.datasets.base.file_cameras`).

Identity ``-1`` is junk (dropped, as in Market); every other identity, 0 included, is a
person: there is no distractor label (a gallery identity without queries is a distractor
in effect). A file name without an identity, in a folder that is not a person's, is a bad
file: one line naming it, or skipped with ``data.skip_bad_images``.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Tuple

from attnreid.data.datasets.base import JUNK_PID, BadImages, Parsed, ReIDDataset, resolve, with_cameras
from attnreid.data.io import Tree, is_image_name, join, open_trees
from attnreid.errors import DataError

SPLIT_FOLDERS = {"train": ("train", "bounding_box_train"), "query": ("query",),
                 "gallery": ("gallery", "bounding_box_test")}
_PID = re.compile(r"^(-?\d+)(?=[_\-]|$)")  # matched on the name without its extension
_CAMERA = re.compile(r"^c(\d+)")
_INTEGER = re.compile(r"^\d+$")
EXAMPLE = "0007_c2s1_000151_01.jpg, 0007_frame3.jpg or train/0007/frame3.jpg"

def walk_images(tree: Tree, rel: str) -> List[str]:
    """Relative paths of the images under ``rel``, at any depth, sorted."""
    out: List[str] = []
    for sub in tree.subdirs(rel):
        out.extend(walk_images(tree, join(rel, sub)))
    out.extend(join(rel, n) for n in tree.files(rel) if is_image_name(n))
    return sorted(out)


def parse_name(rel_in_split: str) -> Tuple[Optional[int], Optional[int], str]:
    """``(pid, camera, problem)`` of a path relative to its split folder (see the module doc)."""
    parts = rel_in_split.split("/")
    stem = parts[-1].rsplit(".", 1)[0]
    folder = parts[-2] if len(parts) > 1 else ""
    m = _PID.match(stem)
    name_pid = int(m.group(1)) if m else None
    rest = stem[m.end():].lstrip("_-") if m else stem
    if _INTEGER.match(folder):
        pid = int(folder)
        if name_pid is not None and name_pid != pid and _CAMERA.match(rest):
            return None, None, f"the name says identity {name_pid} but the folder says {pid}"
        if name_pid is not None and name_pid != pid:
            rest = stem  # a frame number, not an identity: the camera token would lead the name
    elif name_pid is None:
        return None, None, f"cannot parse the identity (expected a name like {EXAMPLE})"
    else:
        pid = name_pid
    cam = _CAMERA.match(rest)
    return pid, (int(cam.group(1)) if cam else None), ""


def read_split(tree: Tree, rel: str, bad: BadImages) -> List[Parsed]:
    items: List[Parsed] = []
    for path in walk_images(tree, rel):
        full = tree.path(path)
        if tree.size(path) == 0:
            bad.report(full, "empty image file (0 bytes; expected a JPEG/PNG image)")
            continue
        pid, cam, problem = parse_name(path[len(rel):].lstrip("/"))
        if pid is None:
            bad.report(full, problem)
            continue
        if pid == JUNK_PID:
            continue
        if pid < JUNK_PID:
            bad.report(full, f"negative identity {pid} (only -1, junk, is allowed)")
            continue
        items.append((full, pid, cam))
    return items


class FolderDataset(ReIDDataset):
    name = "folder"
    distractor_pid = None

    def __init__(self, root: str, skip_bad_images: bool = False):
        tree = open_trees(str(root))[0]
        found = {split: next((r for r in (resolve(tree, n) for n in names) if r is not None), None)
                 for split, names in SPLIT_FOLDERS.items()}
        if not any(found.values()):
            raise DataError(f"no train/, query/ or gallery/ folder in {tree.location}; data.dataset=folder "
                            f"expects DIR/{{train,query,gallery}}/ holding images named like {EXAMPLE}")
        if (found["query"] is None) != (found["gallery"] is None):
            missing = "query" if found["query"] is None else "gallery"
            raise DataError(f"missing split folder {tree.path(missing)}: query/ and gallery/ go together "
                            f"(a training-only set has train/ alone)")
        bad = BadImages(skip_bad_images)
        parsed: Dict[str, List[Parsed]] = {}
        for split, rel in found.items():
            parsed[split] = [] if rel is None else read_split(tree, rel, bad)
            if rel is not None and not parsed[split]:
                raise DataError(f"split folder {tree.path(rel)} holds no usable images; expected files like {EXAMPLE}")
        lists, known = with_cameras(parsed, tree.location)
        super().__init__(lists["train"], lists["query"], lists["gallery"], root=tree.location, bad_images=bad.items)
        self.cameras_known = known
