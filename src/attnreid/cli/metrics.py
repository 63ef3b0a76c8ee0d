"""``attnreid metrics FILE.npz``: re-ID metrics from saved arrays (a thin shell over
:mod:`attnreid.evaluation`)."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Dict

import typer

from attnreid.cli._app import app
from attnreid.errors import AttnReidError

_ID_KEYS = ("query_pids", "gallery_pids", "query_camids", "gallery_camids")


def load_metrics_npz(path: Path, need_features: bool, need_cameras: bool = True) -> Dict:
    """Read and check the arrays of a metrics npz; every problem is one line naming the key."""
    import numpy as np

    if not path.is_file():
        raise AttnReidError(f"{path}: no such file")
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise AttnReidError(f"{path} is not a readable .npz file ({type(exc).__name__})") from None
    if not hasattr(npz, "files"):
        raise AttnReidError(f"{path} holds a single array, not an .npz archive of named arrays")
    try:
        keys = set(npz.files)
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
        try:
            arrays = {k: npz[k] for k in keys if k in _ID_KEYS + ("distmat", "query_features", "gallery_features")}
        except ValueError as exc:  # object arrays need pickle, which is refused
            raise AttnReidError(f"{path}: an array could not be read without pickle ({exc})") from None
    finally:
        npz.close()
    for key in _ID_KEYS:
        if key in arrays and arrays[key].ndim != 1:
            raise AttnReidError(f"{path}: '{key}' must be 1-D, got shape {arrays[key].shape}")
    for side in ("query", "gallery"):
        n = len(arrays[f"{side}_pids"])
        if f"{side}_camids" in arrays and len(arrays[f"{side}_camids"]) != n:
            raise AttnReidError(
                f"{path}: '{side}_camids' has shape {arrays[f'{side}_camids'].shape} but '{side}_pids' has {n} entries"
            )
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


@app.command("metrics")
def metrics(
    file: Path = typer.Argument(..., help="npz with query_pids, gallery_pids, query_camids, gallery_camids and distmat (Q x G) or query_features + gallery_features."),
    rerank: bool = typer.Option(False, "--rerank", help="k-reciprocal re-ranking (needs the features)."),
    k1: int = typer.Option(20, "--k1", help="Re-ranking k1."),
    k2: int = typer.Option(6, "--k2", help="Re-ranking k2 (query expansion)."),
    lambda_value: float = typer.Option(0.3, "--lambda", help="Re-ranking weight of the original distance."),
    rerank_input: str = typer.Option("zhong", "--rerank-input",
                                     help="zhong (Zhong et al., the paper's) or torchreid (squares squared distances, as torchreid's engine)."),
    metric: str = typer.Option("euclidean_sq", "--metric", help="Distance of the features: euclidean_sq or cosine."),
    protocol: str = typer.Option("market", "--protocol", help="market, cuhk03_classic or partial (no camera filtering)."),
    max_rank: int = typer.Option(50, "--max-rank", help="Length of the CMC curve."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """CMC, mAP and mINP (Market single-query protocol) from saved distances or features."""
    from attnreid.cli._util import print_json
    from attnreid.evaluation.distance import METRICS, as_feature_tensor, compute_distance
    from attnreid.evaluation.protocols import PROTOCOLS
    from attnreid.evaluation.rank import evaluate_cuhk03_single_shot, evaluate_rank

    if protocol not in PROTOCOLS:
        raise AttnReidError(f"unknown --protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    if metric not in METRICS:
        raise AttnReidError(f"unknown --metric {metric!r}; expected one of {', '.join(METRICS)}")
    from attnreid.evaluation.rerank import RERANK_INPUTS

    if rerank_input not in RERANK_INPUTS:
        raise AttnReidError(f"unknown --rerank-input {rerank_input!r}; expected one of {', '.join(RERANK_INPUTS)}")
    arrays = load_metrics_npz(file, need_features=rerank, need_cameras=protocol != "partial")
    if rerank or "distmat" not in arrays:
        qf = as_feature_tensor(arrays["query_features"], f"{file}: 'query_features'")
        gf = as_feature_tensor(arrays["gallery_features"], f"{file}: 'gallery_features'")
        if qf.shape[1] != gf.shape[1]:
            raise AttnReidError(
                f"{file}: 'query_features' has shape {tuple(qf.shape)} but 'gallery_features' has {tuple(gf.shape)} (dimensions differ)"
            )
        if rerank:
            from attnreid.evaluation.rerank import re_ranking

            distmat = re_ranking(qf, gf, k1=k1, k2=k2, lambda_value=lambda_value, metric=metric,
                                 rerank_input=rerank_input)
        else:
            distmat = compute_distance(qf, gf, metric)
    else:
        distmat = arrays["distmat"]
    names = {
        "distmat": f"{file}: 'distmat'",
        "q_pids": "'query_pids'",
        "g_pids": "'gallery_pids'",
        "q_camids": "'query_camids'",
        "g_camids": "'gallery_camids'",
    }
    cams = (None, None) if protocol == "partial" else (arrays["query_camids"], arrays["gallery_camids"])
    ids = (arrays["query_pids"], arrays["gallery_pids"], *cams)
    if protocol == "cuhk03_classic":
        res = evaluate_cuhk03_single_shot(distmat, *ids, max_rank=max_rank, names=names)
    else:
        res = evaluate_rank(distmat, *ids, max_rank=max_rank, names=names)

    if as_json:
        print_json(res)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{file.name}  ({protocol}{', re-ranked' if rerank else ''})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("mAP", f"{100 * res['mAP']:.2f}%")
    table.add_row("mINP", f"{100 * res['mINP']:.2f}%")
    for k in (1, 3, 5, 10):
        table.add_row(f"Rank-{k}", f"{100 * res[f'rank{k}']:.2f}%")
    table.add_row("valid queries", str(res["num_valid_queries"]))
    table.add_row("skipped queries", str(res["num_skipped_queries"]))
    Console().print(table)
