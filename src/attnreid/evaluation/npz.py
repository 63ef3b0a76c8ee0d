"""The metrics ``.npz`` format: ids, cameras and a distance matrix or features, read and evaluated.

What ``attnreid metrics`` and ``attnreid compare`` read (and ``attnreid extract --split query
--split gallery`` writes): ``query_pids``, ``gallery_pids``, ``query_camids``, ``gallery_camids``
(camera ids may be left out for the partial protocol), and either ``distmat`` (Q x G) or
``query_features`` + ``gallery_features``; optionally ``query_paths`` / ``gallery_paths``.
Every problem is one line naming the file and the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

from attnreid.errors import AttnReidError
from attnreid.evaluation.options import RankingOptions

_ID_KEYS = ("query_pids", "gallery_pids", "query_camids", "gallery_camids")
_PATH_KEYS = ("query_paths", "gallery_paths")  # optional; `attnreid extract` writes them


def load_metrics_npz(path: Path, need_features: bool, need_cameras: bool = True) -> Dict:
    """Read and check the arrays of a metrics npz; every problem is one line naming the key.

    Read with :func:`attnreid.safe_io.load_npz` (declared sizes checked before reading, no
    pickle, a corrupt file is one line). Identities and cameras must be integers, paths
    strings, features and distances numbers (finite: checked where they are used), features
    at least one number per image.
    """
    from attnreid.safe_io import load_npz, npz_names

    path = Path(path)
    keys = set(npz_names(path))
    needed = _ID_KEYS if need_cameras else _ID_KEYS[:2]
    for key in needed:
        if key not in keys:
            raise AttnReidError(f"{path}: missing key '{key}' (has: {', '.join(sorted(keys)) or 'nothing'})")
    has_feats = "query_features" in keys and "gallery_features" in keys
    if need_features and not has_feats:
        missing = "query_features" if "query_features" not in keys else "gallery_features"
        raise AttnReidError(f"{path}: --rerank needs features; missing key '{missing}'")
    if not has_feats and "distmat" not in keys:
        raise AttnReidError(f"{path}: missing key 'distmat' (or both 'query_features' and 'gallery_features')")
    wanted = list(_ID_KEYS + _PATH_KEYS) + (["query_features", "gallery_features"] if has_feats else ["distmat"])
    arrays = load_npz(path, wanted)
    _check_kinds(path, arrays)
    for key in _ID_KEYS + _PATH_KEYS:
        if key in arrays and arrays[key].ndim != 1:
            raise AttnReidError(f"{path}: '{key}' must be 1-D, got shape {arrays[key].shape}")
    for side in ("query", "gallery"):
        n = len(arrays[f"{side}_pids"])
        if f"{side}_camids" in arrays and len(arrays[f"{side}_camids"]) != n:
            raise AttnReidError(
                f"{path}: '{side}_camids' has shape {arrays[f'{side}_camids'].shape} but '{side}_pids' has {n} entries"
            )
        paths = arrays.get(f"{side}_paths")
        if paths is not None and len(paths) != n:
            raise AttnReidError(f"{path}: '{side}_paths' has {len(paths)} entries but '{side}_pids' has {n}")
        feats = arrays.get(f"{side}_features")
        if feats is not None and (feats.ndim != 2 or feats.shape[0] != n):
            raise AttnReidError(
                f"{path}: '{side}_features' has shape {feats.shape}; expected {n} rows (one per '{side}_pids' entry)"
            )
    if "distmat" in arrays and not (need_features or "query_features" in arrays):
        d = arrays["distmat"]
        expected = (len(arrays["query_pids"]), len(arrays["gallery_pids"]))
        if d.ndim != 2 or d.shape != expected:
            raise AttnReidError(f"{path}: 'distmat' has shape {d.shape}; expected {expected} (query_pids x gallery_pids)")
    if len(arrays["query_pids"]) == 0:
        raise AttnReidError(f"{path}: 'query_pids' is empty: the query set is empty")
    return arrays


def _check_kinds(path: Path, arrays: Dict) -> None:
    """Each array of the kind its key needs (before anything computes with it)."""
    import numpy as np

    for key, arr in arrays.items():
        kind = arr.dtype.kind
        whole = kind == "f" and bool(np.isfinite(arr).all()) and bool((arr == np.round(arr)).all())
        if key in _ID_KEYS and kind not in "iub" and not whole:
            raise AttnReidError(f"{path}: '{key}' holds {arr.dtype} values; expected integer ids")
        if key in _PATH_KEYS and kind not in "US":
            raise AttnReidError(f"{path}: '{key}' holds {arr.dtype} values; expected file names (strings)")
        if key in ("distmat", "query_features", "gallery_features"):
            if kind not in "fiu":
                raise AttnReidError(f"{path}: '{key}' holds {arr.dtype} values; expected numbers")
            if key != "distmat" and (arr.ndim != 2 or arr.shape[1] == 0):
                raise AttnReidError(f"{path}: '{key}' has shape {arr.shape}; expected one row of at least "
                                    f"one number per image")


def evaluate_npz(file: Path, protocol: str = "market", ranking: Optional[RankingOptions] = None,
                 max_rank: int = 50, per_query: bool = False, save_distmat: Optional[Path] = None) -> Dict:
    """Metrics of a metrics npz (:func:`load_metrics_npz`) in one pass, as
    :func:`attnreid.evaluation.protocols.evaluate` returns them; ``per_query`` adds the per-query
    arrays, ``save_distmat`` writes the (re-ranked) Q x G distances to that ``.npy`` file. The loaded
    arrays are under ``"arrays"``. ``ranking`` (default: squared Euclidean, no re-ranking) applies
    to features; a stored ``distmat`` is used as it is (re-ranking needs the features)."""
    from attnreid.evaluation.protocols import PROTOCOLS, evaluate, evaluate_blocks
    from attnreid.evaluation.rank import _default_chunk, check_rank_inputs, iter_rank_chunks

    if protocol not in PROTOCOLS:
        raise AttnReidError(f"unknown --protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    ranking = ranking or RankingOptions()
    arrays = load_metrics_npz(file, need_features=ranking.rerank, need_cameras=protocol != "partial")
    cams = (None, None) if protocol == "partial" else (arrays["query_camids"], arrays["gallery_camids"])
    ids = (arrays["query_pids"], arrays["gallery_pids"], *cams)
    if ranking.rerank or "distmat" not in arrays:
        qf, gf = arrays["query_features"], arrays["gallery_features"]
        if qf.shape[1] != gf.shape[1]:
            raise AttnReidError(f"{file}: 'query_features' has shape {qf.shape} but 'gallery_features' has "
                                f"{gf.shape} (dimensions differ)")
        res = evaluate(arrays["query_features"], arrays["gallery_features"], *ids, protocol=protocol, ranking=ranking,
                       max_rank=max_rank, per_query=per_query, save_distmat=save_distmat,
                       names=(f"{file}: 'query_features'", f"{file}: 'gallery_features'"))
        for key in ("protocol", "metric", "rerank"):  # the caller knows them; the output stays the metrics
            res.pop(key)
    else:
        names = {
            "distmat": f"{file}: 'distmat'",
            "q_pids": "'query_pids'",
            "g_pids": "'gallery_pids'",
            "q_camids": "'query_camids'",
            "g_camids": "'gallery_camids'",
        }
        d, *checked = check_rank_inputs(arrays["distmat"], *ids, names=names, finite=False)  # blocks checked below
        res = evaluate_blocks(iter_rank_chunks(d, _default_chunk(d.shape[1])), tuple(checked), d.shape, protocol,
                              max_rank, per_query=per_query, save_distmat=save_distmat, name=names["distmat"])
    res["arrays"] = arrays
    return res
