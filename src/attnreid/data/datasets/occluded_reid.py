"""Occluded-REID (Zhuo et al., ICME 2018): 200 people, 5 occluded and 5 whole-body images each.

Layout: ``Occluded_REID/{occluded_body_images,whole_body_images}/<pid>/*`` (the release's
images are ``.tif``, e.g. ``001/001_01.tif``; converted ``.jpg`` copies are read too).
Also accepted: ``Occluded-REID/``, ``occluded_reid/Occluded_REID/``, the
``ICME2018_Occluded-Person-Reidentification_datasets/Occluded_REID/`` of the authors'
repository, or a ``.zip`` whose name contains "occludedreid". 1,000 + 1,000 images.

A test-only set, like Partial-REID: the model is trained on Market-1501 and ``train`` is
empty. Query = the occluded images, gallery = the whole-body images; CMC and mAP
(``protocol = "market"``: the literature reports Rank-1 and mAP).

Camera convention (the literature's): the set has no camera labels; every query gets
camera 0 and every gallery image camera 1, as light-reid's and the TransReID-family
loaders do. A query therefore never meets an image of its own split (the gallery holds
whole-body images only) and the same-(pid, camera) removal of the Market protocol never
removes one of its true matches. Names are not searched for ``_c<N>``.
"""

from __future__ import annotations

from typing import List

from attnreid.data.datasets.base import BadImages, Item, ReIDDataset, locate, resolve
from attnreid.data.datasets.p_dukemtmc import parse_pdukemtmc_folder
from attnreid.data.io import join

QUERY_CAMERA, GALLERY_CAMERA = 0, 1


class OccludedREID(ReIDDataset):
    name = "occluded_reid"
    title = "Occluded-REID"
    candidates = ("Occluded_REID", "occluded_reid/Occluded_REID", "Occluded-REID",
                  "ICME2018_Occluded-Person-Reidentification_datasets/Occluded_REID", "occluded_reid", "")
    required = ("occluded_body_images", "whole_body_images")
    example = "<pid>/001_01.tif"

    def __init__(self, root: str, skip_bad_images: bool = False):
        tree, base = locate(str(root), self.title, self.candidates, self.required, ("occludedreid",))
        bad = BadImages(skip_bad_images)

        def read(folder: str, cam: int) -> List[Item]:
            return parse_pdukemtmc_folder(tree, resolve(tree, join(base, folder)) or "", bad, cam,
                                          example=self.example, camera_from_name=False)

        query = read("occluded_body_images", QUERY_CAMERA)
        gallery = read("whole_body_images", GALLERY_CAMERA)
        super().__init__([], query, gallery, root=tree.path(base) if base else tree.location, bad_images=bad.items)
