"""MSMT17 (Wei et al., CVPR 2018), version 1 or 2, read through its list files.

Layout (as torchreid): ``msmt17/MSMT17_V2/{mask_train_v2,mask_test_v2,list_train.txt,
list_val.txt,list_query.txt,list_gallery.txt}`` or ``msmt17/MSMT17_V1/{train,test,...}``;
the ``msmt17/`` level may be left out, and a ``.zip`` whose name contains "msmt" is read
too. A list line is ``0000/0000_000_01_0303morning_0015_0.jpg 0`` (path relative to the
train or test folder, then the pid label); the camera is the third ``_`` field (1..15).
As torchreid does, ``train`` is ``list_train`` + ``list_val`` (``list_val.txt`` may be
missing). MSMT17 has no distractors: pid 0 is an ordinary identity.
Official counts: train 32,621 / 1,041, query 11,659 / 3,060, gallery 82,161 / 3,060.
"""

from __future__ import annotations

from typing import List

from attnreid.data.datasets.base import ReIDDataset, resolve
from attnreid.data.datasets.base import Item
from attnreid.data.io import Tree, join, open_trees
from attnreid.errors import DataError

_VERSIONS = (("MSMT17_V2", "mask_train_v2", "mask_test_v2"), ("MSMT17_V1", "train", "test"), ("MSMT17", "train", "test"))
_PARENTS = ("msmt17", "")
_LISTS = ("list_train.txt", "list_query.txt", "list_gallery.txt")


def parse_list(tree: Tree, list_rel: str, image_dir: str) -> List[Item]:
    """Read one MSMT17 list file into ``(path, pid, camid)`` items."""
    items: List[Item] = []
    where = tree.path(list_rel)
    for n, line in enumerate(tree.read_text(list_rel).splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        fields = parts[0].rsplit("/", 1)[-1].split("_") if parts else []
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or len(fields) < 3 or not fields[2].isdigit():
            raise DataError(
                f"cannot parse line {n} of {where}: {line.strip()!r}; expected "
                "'0000/0000_000_01_0303morning_0015_0.jpg 0' (path, pid)"
            )
        items.append((tree.path(join(image_dir, parts[0])), int(parts[1]), int(fields[2]) - 1))
    if not items:
        raise DataError(f"list file {where} is empty; expected lines like '0000/0000_000_01_0303morning_0015_0.jpg 0'")
    return items


class MSMT17(ReIDDataset):
    name = "msmt17"
    distractor_pid = None  # pid 0 is an ordinary identity

    def __init__(self, root: str, skip_bad_images: bool = False):
        for tree in open_trees(str(root), ("msmt",)):
            for parent in _PARENTS:
                for version, train_name, test_name in _VERSIONS:
                    base = resolve(tree, join(parent, version))
                    if base is None:
                        continue
                    self._load(tree, base, train_name, test_name)
                    return
        raise DataError(
            f"no MSMT17 data under {root}; expected msmt17/MSMT17_V2/{{mask_train_v2,mask_test_v2,list_*.txt}} "
            "or msmt17/MSMT17_V1/{train,test,list_*.txt} (the msmt17/ level is optional)"
        )

    def _load(self, tree: Tree, base: str, train_name: str, test_name: str) -> None:
        for folder in (train_name, test_name):
            if resolve(tree, join(base, folder)) is None:
                raise DataError(f"missing split folder {tree.path(join(base, folder))}; MSMT17 needs {train_name}, {test_name}")
        for lst in _LISTS:
            if tree.size(join(base, lst)) < 0:
                raise DataError(f"missing list file {tree.path(join(base, lst))}; MSMT17 needs {', '.join(_LISTS)}")
        train_dir = resolve(tree, join(base, train_name)) or ""
        test_dir = resolve(tree, join(base, test_name)) or ""
        train = parse_list(tree, join(base, "list_train.txt"), train_dir)
        if tree.size(join(base, "list_val.txt")) >= 0:
            train += parse_list(tree, join(base, "list_val.txt"), train_dir)
        query = parse_list(tree, join(base, "list_query.txt"), test_dir)
        gallery = parse_list(tree, join(base, "list_gallery.txt"), test_dir)
        super().__init__(train, query, gallery, root=tree.path(base))
