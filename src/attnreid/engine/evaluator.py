"""Evaluate a model on a dataset's query/gallery split with the dataset's protocol.

Writes, when asked, the two files other tools read (docs/design.md): ``eval.json``
(the metrics plus ``dataset``, ``protocol``, ``model``, and for MHSA-Net
``attention_stats``: head overlap, beta entropy, see :func:`attention_diagnostics`) and
``eval_ranks.npz`` (each query's top-k gallery indices and distances, with paths, ids and
cameras) for the ranked-list pictures of the report.
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

from attnreid.engine.extract import extract_features
from attnreid.errors import DataError

TOPK = 50
# Query images the attention diagnostics look at (evenly spaced over the query list): a
# second forward pass over all of Market's 3,368 queries would double the extraction cost.
ATTENTION_STATS_IMAGES = 128


def evaluate_model(model: nn.Module, dataset: Any, cfg: Any, out_dir: Optional[str | Path] = None,
                   device: str | torch.device = "cpu", rerank: Optional[bool] = None,
                   extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Features of query and gallery, then ``protocols.evaluate``; returns the metrics dict.

    ``rerank`` overrides ``cfg.eval.rerank``. ``extra`` entries are added to eval.json
    (e.g. the checkpoint path and epoch).
    """
    from attnreid.evaluation.protocols import evaluate

    if not dataset.query or not dataset.gallery:
        raise DataError(f"dataset '{dataset.name}' has an empty query or gallery set; nothing to evaluate")
    ev = cfg.eval
    rerank = ev.rerank if rerank is None else rerank
    channels_last = bool(cfg.train.channels_last)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.amp)
    t0 = time.perf_counter()
    qf, q_pids, q_camids = extract_features(model, dataset.query, cfg.data, device=device, flip=ev.flip,
                                            channels_last=channels_last, autocast_dtype=amp)
    gf, g_pids, g_camids = extract_features(model, dataset.gallery, cfg.data, device=device, flip=ev.flip,
                                            channels_last=channels_last, autocast_dtype=amp)
    t_extract = time.perf_counter() - t0
    metrics = evaluate(qf, gf, q_pids, g_pids, q_camids, g_camids, protocol=dataset.protocol,
                       metric=ev.metric, rerank=rerank, k1=ev.k1, k2=ev.k2, lambda_value=ev.lambda_value)
    metrics = {k: _plain(v) for k, v in metrics.items()}
    metrics.update({
        "dataset": dataset.name,
        "protocol": dataset.protocol,
        "model": cfg.model.name,
        "test_feature": cfg.model.test_feature,
        "feature_dim": int(qf.shape[1]),
        "metric": ev.metric,
        "rerank": bool(rerank),
        "num_query": len(dataset.query),
        "num_gallery": len(dataset.gallery),
        "extract_seconds": round(t_extract, 3),
    })
    stats = attention_diagnostics(model, dataset.query, cfg.data, getattr(cfg.loss, "acm_gamma", None), device)
    if stats is not None:
        metrics["attention_stats"] = stats
    if extra:
        metrics.update(extra)
    if out_dir is not None:
        write_eval_files(Path(out_dir), metrics, dataset, qf, gf, q_pids, g_pids, q_camids, g_camids,
                         metric=ev.metric, rerank=rerank, k1=ev.k1, k2=ev.k2, lambda_value=ev.lambda_value)
    return metrics


def attention_diagnostics(model: nn.Module, items, data_cfg: Any, gamma: Optional[float] = None,
                          device: str | torch.device = "cpu",
                          max_images: int = ATTENTION_STATS_IMAGES) -> Optional[Dict[str, Any]]:
    """:func:`attnreid.evaluation.attention_stats.attention_stats` of MHSA-Net's alpha and beta.

    Over at most ``max_images`` of ``items`` (evenly spaced), from ``forward_attention`` in
    eval mode: ``head_overlap``, ``beta_entropy`` (nats) and ``beta_entropy_max`` (ln K),
    ``beta_mean`` (per head), ``alpha_below_gamma`` (share of alpha under ACM's gamma),
    ``num_images``. None for models without per-head attention maps (baseline, HA-CNN).
    """
    from attnreid.data.loader import build_test_loader
    from attnreid.evaluation.attention_stats import attention_stats

    if getattr(model, "model_name", None) != "mhsanet" or not items:
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


def ranked_lists(qf: torch.Tensor, gf: torch.Tensor, metric: str, rerank: bool, k1: int, k2: int,
                 lambda_value: float, k: int = TOPK):
    """Top-k gallery indices and distances per query (Q x k), ascending distance."""
    from attnreid.evaluation.distance import compute_distance

    if rerank:
        from attnreid.evaluation.rerank import re_ranking

        dist = torch.as_tensor(re_ranking(qf, gf, k1=k1, k2=k2, lambda_value=lambda_value))
    else:
        dist = torch.as_tensor(compute_distance(qf, gf, metric=metric))
    k = min(k, dist.shape[1])
    values, index = torch.topk(dist.float(), k, dim=1, largest=False, sorted=True)
    return index.numpy().astype(np.int64), values.numpy().astype(np.float32)


def write_eval_files(out_dir: Path, metrics: Dict[str, Any], dataset: Any, qf, gf, q_pids, g_pids,
                     q_camids, g_camids, metric: str, rerank: bool, k1: int, k2: int,
                     lambda_value: float) -> None:
    """``eval.json`` and ``eval_ranks.npz`` in ``out_dir``, each written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    topk_index, topk_dist = ranked_lists(qf, gf, metric, rerank, k1, k2, lambda_value)
    tmp = out_dir / f".eval_ranks.{os.getpid()}.tmp.npz"
    np.savez(tmp, query_paths=np.array([p for p, _, _ in dataset.query]),
             gallery_paths=np.array([p for p, _, _ in dataset.gallery]),
             query_pids=np.asarray(q_pids), gallery_pids=np.asarray(g_pids),
             query_camids=np.asarray(q_camids), gallery_camids=np.asarray(g_camids),
             topk_index=topk_index, topk_dist=topk_dist)
    os.replace(tmp, out_dir / "eval_ranks.npz")
    tmp_json = out_dir / f".eval.{os.getpid()}.tmp.json"
    tmp_json.write_text(json.dumps(metrics, indent=2) + "\n")
    os.replace(tmp_json, out_dir / "eval.json")


def write_report_if_available(run_dirs, out_dir: Path) -> Optional[Path]:
    """Call ``attnreid.viz.report.write_report`` when the viz layer provides it."""
    import importlib

    try:
        report = importlib.import_module("attnreid.viz.report")
    except ImportError:
        return None
    write = getattr(report, "write_report", None)
    if write is None:
        return None
    result = write([Path(d) for d in run_dirs], Path(out_dir))
    return Path(result) if result is not None else Path(out_dir)
