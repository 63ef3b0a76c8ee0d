"""Dataset loaders: a registry from benchmark name to loader class.

``build_dataset(name, root, **options)`` returns a :class:`ReIDDataset` (train / query /
gallery lists of ``(path, pid, camid)``). Every loader takes ``skip_bad_images``; the
``synthetic`` entry also takes the generator's parameters (see :mod:`.synthetic`).
"""

from __future__ import annotations

import inspect
from typing import Any, Dict, Type

from attnreid.data.datasets.base import Item, ReIDDataset
from attnreid.data.datasets.cuhk03 import CUHK03Detected, CUHK03Labeled
from attnreid.data.datasets.dukemtmcreid import DukeMTMCreID
from attnreid.data.datasets.folder import FolderDataset
from attnreid.data.datasets.image_list import ListDataset
from attnreid.data.datasets.market1501 import Market1501
from attnreid.data.datasets.msmt17 import MSMT17
from attnreid.data.datasets.occluded_duke import OccludedDuke
from attnreid.data.datasets.occluded_reid import OccludedREID
from attnreid.data.datasets.p_dukemtmc import PDukeMTMC
from attnreid.data.datasets.partial import PartialILIDS, PartialREID
from attnreid.data.datasets.synthetic import SyntheticDataset, generate_synthetic
from attnreid.errors import DataError

DATASETS: Dict[str, Type[ReIDDataset]] = {
    cls.name: cls
    for cls in (
        Market1501, DukeMTMCreID, CUHK03Labeled, CUHK03Detected, OccludedDuke, PDukeMTMC,
        PartialREID, PartialILIDS, OccludedREID, MSMT17, SyntheticDataset, FolderDataset, ListDataset,
    )
}


def build_dataset(name: str, root: str, **options: Any) -> ReIDDataset:
    """Load the dataset registered as ``name`` from the data ``root`` (a folder or a .zip)."""
    cls = DATASETS.get(name)
    if cls is None:
        import difflib

        close = difflib.get_close_matches(str(name).lower().replace("-", ""), list(DATASETS), n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise DataError(f"unknown dataset '{name}'; {hint}expected one of: {', '.join(DATASETS)}")
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "root"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise DataError(f"dataset '{name}' does not take option(s) {', '.join(unknown)}; it takes: {', '.join(sorted(accepted))}")
    return cls(str(root), **options)


def build_dataset_from_config(data_cfg: Any) -> ReIDDataset:
    """``build_dataset`` from ``cfg.data`` (``dataset``, ``root``, ``skip_bad_images``, ``synthetic``)."""
    options: Dict[str, Any] = {"skip_bad_images": bool(getattr(data_cfg, "skip_bad_images", False))}
    if data_cfg.dataset == "synthetic":
        syn = data_cfg.synthetic
        options.update(
            num_ids=syn.num_ids, images_per_id=syn.images_per_id, num_cameras=syn.num_cameras,
            height=syn.height, width=syn.width, occluded_query_share=syn.occluded_query_share, seed=syn.seed,
        )
    return build_dataset(data_cfg.dataset, data_cfg.root, **options)


__all__ = ["DATASETS", "Item", "ReIDDataset", "build_dataset", "build_dataset_from_config", "generate_synthetic"]
