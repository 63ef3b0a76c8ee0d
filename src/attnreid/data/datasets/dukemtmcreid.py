"""DukeMTMC-reID (Zheng et al., ICCV 2017; Ristani et al., ECCVW 2016).

Layout: ``DukeMTMC-reID/{bounding_box_train,bounding_box_test,query}``, names
``0001_c2_f0046182.jpg``. Accepted: ``DukeMTMC-reID/``, torchreid's
``dukemtmc-reid/DukeMTMC-reID/`` and ``dukemtmc-reid/``, the root itself, or a ``.zip`` whose
name contains "duke". Official counts: train 16,522 / 702, query 2,228 / 702,
gallery 17,661 / 1,110.
"""

from __future__ import annotations

from attnreid.data.datasets.base import MarketStyleDataset


class DukeMTMCreID(MarketStyleDataset):
    name = "dukemtmcreid"
    title = "DukeMTMC-reID"
    candidates = (
        "DukeMTMC-reID",
        "dukemtmc-reid/DukeMTMC-reID",
        "dukemtmc-reid",
        "dukemtmcreid/DukeMTMC-reID",
        "dukemtmcreid",
        "",
    )
    zip_hints = ("dukemtmcreid",)
    example = "0001_c2_f0046182.jpg"
