"""Partial-REID (Zheng et al., ICCV 2015) and Partial-iLIDS (Zheng et al., ICCV 2015).

Test-only sets: a model trained on Market-1501 is evaluated with query = partial bodies,
gallery = whole bodies, Rank-1 and Rank-3 (``protocol = "partial"``). ``train`` is empty.
Query images get camera 0 and gallery images camera 1, so the cross-camera rule of the
Market protocol never removes a true match.

- Partial-REID: ``Partial-REID_Dataset/{partial_body_images,whole_body_images}``, names
  ``001_01.jpg`` (pid, index). Also accepted: ``Partial_REID/``, ``Partial-REID/``,
  ``partial_reid/Partial-REID_Dataset/``; 60 ids, 300 + 300 images.
- Partial-iLIDS: ``Partial_iLIDS/{Probe,Gallery}``, names ``001.jpg`` (pid). Also accepted:
  ``Partial-iLIDS/``, ``partial_ilids/Partial_iLIDS/``; 119 ids, 119 + 119 images.
"""

from __future__ import annotations

import re
from typing import List

from attnreid.data.datasets.base import BadImages, Item, ReIDDataset, list_images, locate, resolve
from attnreid.data.io import Tree, join

_LEADING_PID = re.compile(r"^(\d+)")


def parse_pid_split(tree: Tree, rel: str, bad: BadImages, camid: int, example: str) -> List[Item]:
    """Images named ``<pid>...`` in one folder, all given camera ``camid``."""
    items: List[Item] = []
    for path in list_images(tree, rel, bad, example):
        m = _LEADING_PID.match(path.rsplit("/", 1)[-1])
        if m is None:
            bad.report(tree.path(path), f"cannot parse file name (expected <pid>..., like {example})")
            continue
        items.append((tree.path(path), int(m.group(1)), camid))
    return items


class _PartialDataset(ReIDDataset):
    protocol = "partial"
    title = ""
    candidates: tuple = ()
    zip_hints: tuple = ()
    query_folder = ""
    gallery_folder = ""
    example = ""

    def __init__(self, root: str, skip_bad_images: bool = False):
        tree, base = locate(str(root), self.title, self.candidates, (self.query_folder, self.gallery_folder), self.zip_hints)
        bad = BadImages(skip_bad_images)
        query = parse_pid_split(tree, resolve(tree, join(base, self.query_folder)) or "", bad, 0, self.example)
        gallery = parse_pid_split(tree, resolve(tree, join(base, self.gallery_folder)) or "", bad, 1, self.example)
        super().__init__([], query, gallery, root=tree.path(base) if base else tree.location, bad_images=bad.items)


class PartialREID(_PartialDataset):
    name = "partial_reid"
    title = "Partial-REID"
    candidates = ("Partial-REID_Dataset", "partial_reid/Partial-REID_Dataset", "Partial_REID", "Partial-REID",
                  "partial_reid", "")
    zip_hints = ("partialreid",)
    query_folder = "partial_body_images"
    gallery_folder = "whole_body_images"
    example = "001_01.jpg"


class PartialILIDS(_PartialDataset):
    name = "partial_ilids"
    title = "Partial-iLIDS"
    candidates = ("Partial_iLIDS", "partial_ilids/Partial_iLIDS", "Partial-iLIDS", "PartialiLIDS", "")
    zip_hints = ("partialilids",)
    query_folder = "Probe"
    gallery_folder = "Gallery"
    example = "001.jpg"
