"""Market-1501 (Zheng et al., ICCV 2015).

Layout: ``Market-1501-v15.09.15/{bounding_box_train,bounding_box_test,query[,gt_bbox]}``,
names ``0002_c1s1_000451_03.jpg`` (pid, camera, sequence, frame, box). Accepted under the
data root, as torchreid does: ``Market-1501-v15.09.15/``, ``market1501/Market-1501-v15.09.15/``,
``market1501/`` (folders directly inside), the root itself, or a ``.zip`` whose name contains
"market" lying in the root (or given as the root), read without extracting.

Counts of the official release: train 12,936 images / 751 ids, query 3,368 / 750,
gallery 15,913 / 751 (750 test ids + the 0000 distractor id; 3,819 junk images dropped).
``extras["gt_bbox"]`` holds the hand-drawn boxes (multi-query, HA-CNN Table 2) when the
folder is present.
"""

from __future__ import annotations

from typing import Dict, List

from attnreid.data.datasets.base import BadImages, Item, MarketStyleDataset, parse_market_split, resolve
from attnreid.data.io import Tree, join


class Market1501(MarketStyleDataset):
    name = "market1501"
    title = "Market-1501"
    candidates = (
        "Market-1501-v15.09.15",
        "market1501/Market-1501-v15.09.15",
        "market1501",
        "Market-1501",
        "",
    )
    zip_hints = ("market",)
    example = "0002_c1s1_000451_03.jpg"

    def _extras(self, tree: Tree, base: str, bad: BadImages) -> Dict[str, List[Item]]:
        rel = resolve(tree, join(base, "gt_bbox"))
        if rel is None or not tree.files(rel):
            return {}
        return {"gt_bbox": parse_market_split(tree, rel, bad, keep_distractors=False, example=self.example)}
