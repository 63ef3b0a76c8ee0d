"""Evaluate a model on a dataset's query/gallery split with the dataset's protocol.

Writes, when asked, the files other tools read (docs/design.md): ``eval.json``
(the metrics, their bootstrap intervals over queries, plus ``dataset``, ``protocol``,
``model``, and for MHSA-Net ``attention_stats``: head overlap, beta entropy, see
:func:`attention_diagnostics`), ``eval_ranks.npz`` (each query's top-k gallery indices and
distances, with paths, ids and cameras) for the ranked-list pictures of the report, and
``eval_per_query.npz`` (each query's AP, INP, rank-1 hit and first-match rank) for
``attnreid compare``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
from torch import nn

from attnreid.inference.extract import extract_features, extract_with_precision
from attnreid.inference.int8 import int8_hooks
from attnreid.errors import DataError
from attnreid.evaluation.stats import per_query_record, with_intervals
from attnreid.models.registry import spec_of

TOPK = 50
# Query images the attention diagnostics look at (evenly spaced over the query list): a
# second forward pass over all of Market's 3,368 queries would double the extraction cost.
ATTENTION_STATS_IMAGES = 128


def evaluate_model(model: nn.Module, dataset: Any, cfg: Any, out_dir: Optional[str | Path] = None,
                   device: str | torch.device = "cpu", rerank: Optional[bool] = None,
                   extra: Optional[Dict[str, Any]] = None, progress: bool = False,
                   save_distmat: bool = False, int8_check: bool = False) -> Dict[str, Any]:
    """Features of query and gallery, then one ``protocols.evaluate`` pass (metrics, per-query
    values and, with ``out_dir``, the ranked lists); returns the metrics dict.

    ``rerank`` overrides ``cfg.eval.rerank``. ``save_distmat`` (with ``out_dir``) also writes the
    Q x G (re-ranked) distances to ``out_dir/distmat.npy``. ``extra`` entries are added to eval.json
    (e.g. the checkpoint path and epoch). ``progress`` shows extraction and re-ranking
    progress on stderr (:mod:`attnreid.progress`). ``cfg.eval.multi_query`` replaces each
    query's feature by the mean over the dataset's ``gt_bbox`` images of its pid and camera
    (Market-1501 multi-query, HA Table 2), ranked lists included.

    With ``data.skip_bad_images`` the unreadable images are left out of the evaluation:
    ``num_query`` / ``num_gallery`` count the images evaluated (``num_query`` =
    ``num_valid_queries`` + ``num_skipped_queries``, the latter being queries without a
    true match in the gallery) and ``num_unreadable_query`` / ``num_unreadable_gallery``
    count the images skipped because they could not be read.

    ``int8_check`` lets ``eval.backend=auto`` try int8 (checked on the validation split of
    ``data.val_ids``; ``attnreid eval`` sets it, the evaluations during training do not).
    """
    from attnreid.data.datasets.base import warn_unknown_cameras
    from attnreid.evaluation.options import RankingOptions
    from attnreid.evaluation.protocols import evaluate, multi_query_features
    from attnreid.progress import ProgressReporter

    if not dataset.query or not dataset.gallery:
        raise DataError(f"dataset '{dataset.name}' has an empty query or gallery set; nothing to evaluate")
    warn_unknown_cameras(dataset)
    ev = cfg.eval
    multi_query = bool(getattr(ev, "multi_query", False))
    if multi_query and not dataset.extras.get("gt_bbox"):
        raise DataError(f"eval.multi_query needs Market-1501's gt_bbox folder, which dataset '{dataset.name}' "
                        f"does not have under {dataset.root}")
    ranking = RankingOptions.from_config(ev, rerank)
    rerank = ranking.rerank
    channels_last = bool(cfg.train.channels_last)
    t0 = time.perf_counter()
    # The query set settles auto's backend and precision (checked against float32); the gallery reuses them.
    sides = {}
    amp = ev.amp
    job = len(dataset.query) + len(dataset.gallery) + (len(dataset.extras["gt_bbox"]) if multi_query else 0)
    for side in ("query", "gallery"):
        items = getattr(dataset, side)
        f, pids, camids, index, amp = extract_with_precision(
            model, items, cfg.data, device=device, flip=ev.flip, channels_last=channels_last, amp=amp,
            progress=f"{dataset.name} {side} features" if progress else None, backend=ev.backend, num_images=job,
            **int8_hooks(cfg, validate=int8_check))
        if len(f) == 0:
            raise DataError(f"dataset '{dataset.name}': no {side} image could be read; nothing to evaluate")
        sides[side] = (f, pids, camids, [items[i] for i in index.tolist()], len(items) - len(index))
    (qf, q_pids, q_camids, q_items, q_bad), (gf, g_pids, g_camids, g_items, g_bad) = sides["query"], sides["gallery"]
    if multi_query:
        bf, b_pids, b_camids = extract_features(model, dataset.extras["gt_bbox"], cfg.data, device=device,
                                                flip=ev.flip, channels_last=channels_last, amp=amp)
        qf = multi_query_features(qf, q_pids, q_camids, bf, b_pids, b_camids)
    t_extract = time.perf_counter() - t0
    label = f"{dataset.name}: re-ranking {len(q_items)} x {len(g_items)}" if rerank else f"{dataset.name}: ranking"
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    distmat_path = Path(out_dir) / "distmat.npy" if save_distmat and out_dir is not None else None
    if qf.device.type == "cpu":  # the numpy path `attnreid metrics` takes: same features, same numbers
        qf, gf = qf.numpy(), gf.numpy()
    with ProgressReporter(label, total=None, enabled=progress):
        metrics = evaluate(qf, gf, q_pids, g_pids, q_camids, g_camids, protocol=dataset.protocol, ranking=ranking,
                           per_query=True, ranked_k=TOPK if out_dir is not None else 0, save_distmat=distmat_path)
    with_intervals(metrics, ev.bootstrap, ev.ci_level)
    per_query = metrics.pop("per_query")
    ranked = metrics.pop("ranked", None)
    metrics = {k: _plain(v) for k, v in metrics.items()}
    metrics.update({
        "dataset": dataset.name,
        "protocol": dataset.protocol,
        "model": cfg.model.name,
        "test_feature": cfg.model.test_feature,
        "feature_dim": int(qf.shape[1]),
        **ranking.record(),  # metric, rerank (and rerank_input)
        "multi_query": multi_query,
        "cameras_known": bool(getattr(dataset, "cameras_known", True)),
        "num_query": len(q_items),
        "num_gallery": len(g_items),
        "num_unreadable_query": q_bad,
        "num_unreadable_gallery": g_bad,
        "extract_seconds": round(t_extract, 3),
        **amp.record(),  # precision, backend, inference
    })
    stats = attention_diagnostics(model, q_items, cfg.data, getattr(cfg.loss, "acm_gamma", None), device)
    if stats is not None:
        metrics["attention_stats"] = stats
    if extra:
        metrics.update(extra)
    if out_dir is not None:
        write_eval_files(Path(out_dir), metrics, q_items, g_items, q_pids, g_pids, q_camids, g_camids, ranked,
                         per_query=per_query)
    return metrics


# Per-dataset numbers kept in the combined table of a multi-dataset evaluation.
SUMMARY_KEYS = ("dataset", "protocol", "rank1", "rank3", "rank5", "rank10", "mAP", "mINP", "num_query",
                "num_gallery", "num_valid_queries", "num_unreadable_query", "num_unreadable_gallery", "rerank")


def evaluation_datasets(cfg: Any) -> list:
    """The test sets of a run: ``eval.datasets`` (each under the evaluation root), else the one set
    of ``eval.dataset`` / ``data.dataset``."""
    import dataclasses

    from attnreid.data.datasets import build_dataset_from_config
    from attnreid.engine.build import build_eval_dataset, eval_data_config

    names = list(getattr(cfg.eval, "datasets", None) or [])
    if not names:
        return [build_eval_dataset(cfg)]
    base = eval_data_config(cfg)
    return [build_dataset_from_config(dataclasses.replace(base, dataset=name)) for name in names]


def evaluate_datasets(model: nn.Module, cfg: Any, datasets: Optional[list] = None,
                      out_dir: Optional[str | Path] = None, device: str | torch.device = "cpu",
                      rerank: Optional[bool] = None, extra: Optional[Dict[str, Any]] = None,
                      progress: bool = False, save_distmat: bool = False,
                      int8_check: bool = False) -> Dict[str, Any]:
    """Evaluate on several test sets in one run (torchreid's ``targets``, fast-reid's ``DATASETS.TESTS``).

    ``datasets`` defaults to :func:`evaluation_datasets` (``eval.datasets``). The first set
    is the primary one: its metrics are the returned dict (what picks ``best.pth``), and
    its ``eval.json`` / ``eval_ranks.npz`` go to ``out_dir`` as for a single set. Every
    set's files also go to ``out_dir/datasets/<name>/``. With two or more sets the
    returned dict (and the top eval.json) holds ``datasets``: one summary row per set,
    in order (:data:`SUMMARY_KEYS`).
    """
    sets = evaluation_datasets(cfg) if datasets is None else list(datasets)
    if not sets:
        raise DataError("no evaluation data set given")
    names = [d.name for d in sets]
    if len(set(names)) != len(names):
        raise DataError(f"eval.datasets names a data set twice: {', '.join(names)}")
    results = []
    for d in sets:
        sub = None if out_dir is None else (Path(out_dir) if len(sets) == 1 else Path(out_dir) / "datasets" / d.name)
        results.append(evaluate_model(model, d, cfg, out_dir=sub, device=device, rerank=rerank, extra=extra,
                                      progress=progress, save_distmat=save_distmat, int8_check=int8_check))
    primary = dict(results[0])
    if len(sets) > 1:
        primary["datasets"] = [{k: m[k] for k in SUMMARY_KEYS if k in m} for m in results]
        if out_dir is not None:
            # The primary set's files at the top, as for a single set, with the table in eval.json.
            _copy_eval_files(Path(out_dir) / "datasets" / sets[0].name, Path(out_dir), primary)
    return primary


def _copy_eval_files(src: Path, dst: Path, metrics: Dict[str, Any]) -> None:
    import shutil

    dst.mkdir(parents=True, exist_ok=True)
    tmp = dst / f".eval_ranks.{os.getpid()}.tmp.npz"
    shutil.copyfile(src / "eval_ranks.npz", tmp)
    os.replace(tmp, dst / "eval_ranks.npz")
    _write_json_atomic(dst / "eval.json", metrics)


def attention_diagnostics(model: nn.Module, items, data_cfg: Any, gamma: Optional[float] = None,
                          device: str | torch.device = "cpu",
                          max_images: int = ATTENTION_STATS_IMAGES) -> Optional[Dict[str, Any]]:
    """:func:`attnreid.evaluation.attention_stats.attention_stats` of per-head attention (MHSA-Net's alpha and beta).

    Over at most ``max_images`` of ``items`` (evenly spaced), from ``forward_attention`` in
    eval mode: ``head_overlap``, ``beta_entropy`` (nats) and ``beta_entropy_max`` (ln K),
    ``beta_mean`` (per head), ``alpha_below_gamma`` (share of alpha under ACM's gamma),
    ``head_heights`` (each head's mean vertical centroid), ``centre_mass`` and
    ``centre_mass_uniform`` (attention on the middle half of the width, and a uniform
    map's), ``num_images``. None for models whose registry entry has no per-head attention
    (``attention="heads"``: MHSA-Net; not the baseline or HA-CNN).
    """
    from attnreid.data.loader import build_test_loader
    from attnreid.evaluation.attention_stats import attention_stats

    spec = spec_of(model)
    if spec is None or not spec.head_diagnostics or not items:
        return None
    step = max(1, -(-len(items) // max_images))
    picked = list(items)[::step][:max_images]
    device = torch.device(device)
    alphas, betas = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in build_test_loader(data_cfg, picked):
                out = model.forward_attention(batch[0].to(device))
                alphas.append(out["attention"].float().cpu())
                if "beta" in out:
                    betas.append(out["beta"].float().cpu())
    finally:
        model.train(was_training)
    if not alphas:
        return None
    return attention_stats(torch.cat(alphas), torch.cat(betas) if betas else None, gamma)


def _plain(v: Any) -> Any:
    """numpy/torch scalars and arrays as Python numbers and lists, for JSON."""
    if isinstance(v, (np.ndarray, torch.Tensor)):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def write_eval_files(out_dir: Path, metrics: Dict[str, Any], query_items, gallery_items, q_pids, g_pids,
                     q_camids, g_camids, ranked: Dict[str, np.ndarray],
                     per_query: Optional[Dict[str, np.ndarray]] = None) -> None:
    """``eval.json``, ``eval_ranks.npz`` (and, given ``per_query``, ``eval_per_query.npz``) in
    ``out_dir``, each written atomically.

    ``query_items`` / ``gallery_items`` are the ``(path, pid, camid)`` of the evaluated rows (the
    images evaluated, without any skipped unreadable ones); ``ranked`` is the evaluation pass's
    ``"ranked"`` entry (``topk_index``, ``topk_dist``, ``first_match_rank``).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".eval_ranks.{os.getpid()}.tmp.npz"
    np.savez(tmp, query_paths=np.array([p for p, _, _ in query_items]),
             gallery_paths=np.array([p for p, _, _ in gallery_items]),
             query_pids=np.asarray(q_pids), gallery_pids=np.asarray(g_pids),
             query_camids=np.asarray(q_camids), gallery_camids=np.asarray(g_camids),
             topk_index=ranked["topk_index"], topk_dist=ranked["topk_dist"],
             first_match_rank=ranked["first_match_rank"])
    os.replace(tmp, out_dir / "eval_ranks.npz")
    if per_query is not None:
        tmp = out_dir / f".eval_per_query.{os.getpid()}.tmp.npz"
        np.savez(tmp, **per_query_record([p for p, _, _ in query_items], q_pids, q_camids,
                                         [p for p, _, _ in gallery_items], g_pids, g_camids, per_query,
                                         protocol=metrics.get("protocol", ""), dataset=metrics.get("dataset", "")))
        os.replace(tmp, out_dir / "eval_per_query.npz")
    _write_json_atomic(out_dir / "eval.json", metrics)


def _write_json_atomic(path: Path, obj: Dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.json")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)

