"""CUHK03 in the new 767/700 protocol (Zhong et al., CVPR 2017), as the CUHK03-NP release ships it.

Layout: ``cuhk03-np/{labeled,detected}/{bounding_box_train,bounding_box_test,query}`` with
Market-style names (``0001_c1_1.png``). Accepted parents of ``labeled``/``detected``:
``cuhk03-np/``, ``cuhk03/cuhk03-np/``, ``CUHK03-NP/``, ``cuhk03_np/``, ``cuhk03/``, the root
itself, or a ``.zip`` whose name contains "cuhk03". (torchreid's other CUHK03 route, the raw
``cuhk-03.mat`` with split files, is not read: convert it to CUHK03-NP first.)
Official counts (labeled): train 7,368 / 767, query 1,400 / 700, gallery 5,328 / 700.
"""

from __future__ import annotations

from attnreid.data.datasets.base import MarketStyleDataset

_PARENTS = ("cuhk03-np", "cuhk03/cuhk03-np", "CUHK03-NP", "cuhk03_np", "cuhk03", "")


class CUHK03Labeled(MarketStyleDataset):
    name = "cuhk03_labeled"
    title = "CUHK03-NP labeled"
    candidates = tuple(f"{p}/labeled".lstrip("/") for p in _PARENTS)
    zip_hints = ("cuhk03",)
    example = "0001_c1_1.png"


class CUHK03Detected(CUHK03Labeled):
    name = "cuhk03_detected"
    title = "CUHK03-NP detected"
    candidates = tuple(f"{p}/detected".lstrip("/") for p in _PARENTS)
