"""Training-set splits: a validation query/gallery held out of the training identities, and subsets.

Model selection on the test split reports an optimistic number, so
``data.val_ids: N`` moves N training identities out of training into a validation split
evaluated like a benchmark's query/gallery:

- the N identities are drawn at random among the training identities seen by at least two
  cameras (with one camera a query could never be matched under the cross-camera
  protocol), with a fixed seed (``VAL_SEED``), not ``train.seed``: runs with different seeds
  then share one validation split and their numbers can be compared;
- per held-out identity, one image per camera (drawn with the same seed) is a query and
  every other image of that identity is in the gallery, so each query has a same-identity
  gallery image in another camera (Market protocol: same identity and camera is ignored);
  a set without cameras (per-file pseudo-cameras) has one query per held-out identity;
- the validation pids are the identities' training labels + 1 (0 is the Market
  distractor label), and the remaining training identities are relabelled 0..C-1.

``data.max_ids: N`` then keeps the first N remaining training identities (in label order,
i.e. the dataset's own pid order), for subsets and laptop recipes.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np

from attnreid.data.datasets.base import Item, ReIDDataset, relabel
from attnreid.errors import DataError

VAL_SEED = 20240


def _by_pid(items: List[Item]) -> Dict[int, List[Item]]:
    out: Dict[int, List[Item]] = {}
    for item in items:
        out.setdefault(item[1], []).append(item)
    return out


def hold_out_validation(dataset: ReIDDataset, num_ids: int) -> Tuple[ReIDDataset, Optional[ReIDDataset]]:
    """``(training set without the held-out identities, validation set)``; ``(dataset, None)`` for 0."""
    if num_ids <= 0:
        return dataset, None
    groups = _by_pid(list(dataset.train))
    # Without cameras (per-file pseudo-cameras) any identity with two images can be matched.
    eligible = sorted(pid for pid, items in groups.items() if len({cam for _, _, cam in items}) >= 2)
    if len(eligible) < num_ids or len(groups) - num_ids < 2:
        raise DataError(
            f"data.val_ids is {num_ids} but dataset '{dataset.name}' has {len(groups)} training identities "
            f"({len(eligible)} seen by 2+ cameras); lower data.val_ids")
    rng = np.random.default_rng(VAL_SEED)
    held = set(int(p) for p in rng.choice(eligible, size=num_ids, replace=False))
    query: List[Item] = []
    gallery: List[Item] = []
    for pid in sorted(held):
        items = sorted(groups[pid])
        by_cam: Dict[int, List[int]] = {}
        for i, (_, _, cam) in enumerate(items):
            by_cam.setdefault(cam, []).append(i)
        if getattr(dataset, "cameras_known", True):
            chosen = {int(rng.choice(idx)) for _, idx in sorted(by_cam.items())}
        else:  # one query per identity: a query per pseudo-camera would leave no gallery
            chosen = {int(rng.integers(len(items)))}
        for i, (path, _, cam) in enumerate(items):
            (query if i in chosen else gallery).append((path, pid + 1, cam))
    train = [item for item in dataset.train if item[1] not in held]
    return _with_train(dataset, train), _validation_set(dataset, num_ids, query, gallery)


def limit_identities(dataset: ReIDDataset, max_ids: int) -> ReIDDataset:
    """The dataset with only its first ``max_ids`` training identities (0: unchanged)."""
    if max_ids <= 0:
        return dataset
    keep = set(sorted({pid for _, pid, _ in dataset.train})[:max_ids])
    if len(keep) < 2:
        raise DataError(f"data.max_ids is {max_ids}: at least 2 training identities are needed")
    return _with_train(dataset, [item for item in dataset.train if item[1] in keep])


def _with_train(dataset: ReIDDataset, train: List[Item]) -> ReIDDataset:
    """A shallow copy of ``dataset`` (same query/gallery and protocol) with a new training list."""
    import copy

    out = copy.copy(dataset)
    kept = sorted({pid for _, pid, _ in train})
    source = getattr(dataset, "train_source_pids", None)
    out.train_source_pids = [source[p] for p in kept] if source else kept
    out.train = relabel(train)
    return out


def _validation_set(dataset: ReIDDataset, num_ids: int, query: List[Item], gallery: List[Item]) -> ReIDDataset:
    val = ReIDDataset([], query, gallery, root=dataset.root)
    val.name = f"{dataset.name}-val{num_ids}"
    val.protocol = "market"
    val.cameras_known = getattr(dataset, "cameras_known", True)
    val.distractor_pid = None  # validation pids are training labels + 1, every one a person
    return val
