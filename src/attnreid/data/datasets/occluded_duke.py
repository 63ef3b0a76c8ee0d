"""Occluded-DukeMTMC (Miao et al., ICCV 2019): DukeMTMC-reID re-split so that queries are occluded.

Layout: ``Occluded_Duke/{bounding_box_train,bounding_box_test,query}``, Duke-style names
``0001_c2_f0046182.jpg``. Accepted: ``Occluded_Duke/``, ``occluded_duke/Occluded_Duke/``,
``Occluded-DukeMTMC/``, the root itself, or a ``.zip`` whose name contains "occluded".
Official counts: train 15,618 / 702, query 2,210 / 519, gallery 17,661 / 1,110.
"""

from __future__ import annotations

from attnreid.data.datasets.base import MarketStyleDataset


class OccludedDuke(MarketStyleDataset):
    name = "occluded_duke"
    title = "Occluded-DukeMTMC"
    candidates = (
        "Occluded_Duke",
        "occluded_duke/Occluded_Duke",
        "Occluded-DukeMTMC",
        "Occluded_DukeMTMC",
        "Occluded-Duke",
        "",
    )
    zip_hints = ("occluded",)
    example = "0001_c2_f0046182.jpg"
