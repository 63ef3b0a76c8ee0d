"""P-DukeMTMC-reID (Zhuo et al., ICME 2018): occluded and whole-body images of DukeMTMC people.

Layout: ``P-DukeMTMC-reid/{train,test}/{occluded_body_images,whole_body_images}/<pid>/*.jpg``
(images directly in the folder, named ``<pid>_...``, are read too). Also accepted:
``P-DukeMTMC-reID/`` (any case), ``p_dukemtmc/P-DukeMTMC-reid/``, ``P-DukeMTMC/``, or a
``.zip`` whose name contains "pdukemtmc". Train = both kinds of training images; test:
query = occluded bodies, gallery = whole bodies.

The camera is read from ``_c<N>`` in the file name when present (0-based). When a name
has none, occluded images get camera 0 and whole-body images camera 1: the set is then
evaluated as occluded-to-whole matching with no same-camera removal.
"""

from __future__ import annotations

import re
from typing import List

from attnreid.data.datasets.base import BadImages, Item, ReIDDataset, list_images, locate, resolve
from attnreid.data.io import Tree, is_image_name, join
from attnreid.errors import DataError

_CAMERA = re.compile(r"_c(\d+)")
_LEADING_PID = re.compile(r"^(\d+)_")
EXAMPLE = "<pid>/0005_c2_f0046985.jpg"


def parse_pdukemtmc_folder(tree: Tree, rel: str, bad: BadImages, default_cam: int, example: str = EXAMPLE,
                           camera_from_name: bool = True) -> List[Item]:
    """Images under ``<pid>/`` sub-folders (or named ``<pid>_...``) of ``rel``.

    The camera comes from ``_c<N>`` in the name when ``camera_from_name`` and present,
    else ``default_cam``.
    """
    def camera(path: str) -> int:
        return _camera(path, default_cam) if camera_from_name else default_cam

    items: List[Item] = []
    subdirs = tree.subdirs(rel)
    direct = [n for n in tree.files(rel) if is_image_name(n)]
    if not subdirs and not direct:
        raise DataError(f"split folder {tree.path(rel)} holds no images; expected <pid>/ folders of images like {example}")
    for sub in subdirs:
        if not sub.isdigit():
            bad.report(tree.path(join(rel, sub)), "cannot parse identity folder name (expected digits, like 0005)")
            continue
        for path in list_images(tree, join(rel, sub), bad, example):
            items.append((tree.path(path), int(sub), camera(path)))
    if direct:
        for path in list_images(tree, rel, bad, example):
            m = _LEADING_PID.match(path.rsplit("/", 1)[-1])
            if m is None:
                bad.report(tree.path(path), f"cannot parse file name (expected <pid>_..., like {example})")
                continue
            items.append((tree.path(path), int(m.group(1)), camera(path)))
    if not items:
        raise DataError(f"split folder {tree.path(rel)} holds no usable images; expected files like {example}")
    return items


def _camera(path: str, default_cam: int) -> int:
    m = _CAMERA.search(path.rsplit("/", 1)[-1])
    return int(m.group(1)) - 1 if m and int(m.group(1)) >= 1 else default_cam


class PDukeMTMC(ReIDDataset):
    name = "p_dukemtmc"
    title = "P-DukeMTMC-reID"
    candidates = ("P-DukeMTMC-reid", "p_dukemtmc/P-DukeMTMC-reid", "P-DukeMTMC", "p_dukemtmc", "")
    required = ("train/occluded_body_images", "train/whole_body_images",
                "test/occluded_body_images", "test/whole_body_images")

    def __init__(self, root: str, skip_bad_images: bool = False):
        tree, base = locate(str(root), self.title, self.candidates, self.required, ("pdukemtmc",))
        bad = BadImages(skip_bad_images)

        def read(folder: str, cam: int) -> List[Item]:
            return parse_pdukemtmc_folder(tree, resolve(tree, join(base, folder)) or "", bad, cam)

        train = read("train/occluded_body_images", 0) + read("train/whole_body_images", 1)
        query = read("test/occluded_body_images", 0)
        gallery = read("test/whole_body_images", 1)
        super().__init__(train, query, gallery, root=tree.path(base) if base else tree.location, bad_images=bad.items)
