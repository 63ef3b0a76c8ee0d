"""``attnreid calibrate``: a distance threshold for "same person or unknown?" from held-out people.

:func:`calibrate_checkpoint` extracts the test features of identities the model was not
trained on (the validation split of ``data.val_ids``, or the query and gallery of a set
you name), measures the distances of positive pairs (same identity, different camera)
and negative pairs (different identities), and computes the ROC, the EER and a threshold
per target false-positive rate, with intervals from a bootstrap over identities
(:mod:`attnreid.evaluation.verification`). The result, ``calibration.json``, records which
feature and metric it holds for (model, test feature, config and weights fingerprints,
flip) and on which data; :func:`check_fits` refuses to apply it to other features.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from attnreid.errors import AttnReidError, CheckpointError, ConfigError, DataError

KIND = "attnreid-calibration"
VERSION = 1
# What must agree between a calibration and the features it is applied to.
FIT_KEYS = ("model", "feature_dim", "config_hash", "weights_hash", "metric", "flip")


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the model's weights and buffers: two checkpoints of one run differ."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def model_metric(cfg: Any) -> str:
    """The distance a model's features are compared with: what FeatureExtractor and the index use."""
    return "cosine" if (cfg.model.feature_norm or cfg.eval.metric == "cosine") else "euclidean_sq"


def calibration_set(cfg: Any, dataset: Optional[str] = None, root: Optional[str] = None):
    """``(items, description)``: the images to calibrate on.

    Default: the validation identities of ``data.val_ids`` (the same draw as in training,
    so the model never saw them). With ``dataset`` (and ``root``, default ``data.root``):
    that set's query and gallery. Junk and distractor images are left out.
    """
    from attnreid.data.datasets import build_dataset_from_config
    from attnreid.data.splits import hold_out_validation

    if dataset is None and root is not None:
        raise ConfigError("--root needs --dataset (the kind of data set at that root)")
    if dataset is not None:
        data_cfg = dataclasses.replace(cfg.data, dataset=dataset, root=str(root or cfg.data.root))
        ds = build_dataset_from_config(data_cfg)
        split = "query+gallery"
    else:
        if cfg.data.val_ids <= 0:
            raise ConfigError("calibrate needs identities the model was not trained on: set data.val_ids=N (as in "
                              "training), or name a data set with --dataset/--root")
        data_cfg = cfg.data
        _, ds = hold_out_validation(build_dataset_from_config(cfg.data), cfg.data.val_ids)
        split = f"validation (data.val_ids={cfg.data.val_ids}: identities held out of training)"
    distractor = getattr(ds, "distractor_pid", None)
    items = [it for it in list(ds.query) + list(ds.gallery) if it[1] >= 0 and it[1] != distractor]
    if not items:
        raise DataError(f"data set '{ds.name}' has no query or gallery images to calibrate on")
    description = {"dataset": data_cfg.dataset, "root": str(data_cfg.root), "split": split,
                   "cameras_known": bool(getattr(ds, "cameras_known", True)),
                   "positive_rule": "same identity, different camera" if getattr(ds, "cameras_known", True)
                   else "same identity, different file (no camera ids)"}
    return items, description, ds


def feature_record(model: torch.nn.Module, cfg: Any, flip: bool, metric: str) -> Dict[str, Any]:
    """What a calibration (and an index) records about the features: see :data:`FIT_KEYS`."""
    from attnreid.deploy.extractor import config_fingerprint

    return {"model": getattr(model, "model_name", cfg.model.name), "test_feature": cfg.model.test_feature,
            "feature_dim": int(model.feature_dim), "config_hash": config_fingerprint(cfg),
            "weights_hash": weights_fingerprint(model), "metric": metric, "flip": bool(flip),
            "l2_normalized": bool(cfg.model.feature_norm)}


def calibrate_checkpoint(checkpoint: str | Path, cfg: Any, dataset: Optional[str] = None, root: Optional[str] = None,
                         targets: Sequence[float] = (), resamples: int = 1000, level: float = 0.95, seed: int = 0,
                         metric: Optional[str] = None, device: str | torch.device = "cpu",
                         progress: bool = False, out: Optional[str | Path] = None,
                         overwrite: bool = False) -> Dict[str, Any]:
    """The calibration of ``checkpoint`` (module doc); ``targets`` add to the default FPRs.

    With ``out`` it is also written there (:func:`write_calibration`); a calibration of other
    weights already there is refused before any feature is computed.
    """
    from attnreid.data.datasets.base import warn_unknown_cameras
    from attnreid.engine.build import load_model
    from attnreid.inference.extract import extract_with_precision
    from attnreid.evaluation.verification import DEFAULT_TARGETS, METRICS, calibrate

    if metric is not None and metric not in METRICS:
        raise ConfigError(f"--metric is {metric!r}; expected one of: {', '.join(METRICS)}")
    model, cfg = load_model(checkpoint, cfg, device=device)
    metric = metric or model_metric(cfg)
    record = feature_record(model, cfg, cfg.eval.flip, metric)
    if out is not None and not overwrite:
        check_target(Path(out), record["weights_hash"])
    items, description, ds = calibration_set(cfg, dataset, root)
    warn_unknown_cameras(ds)
    feats, pids, camids, _, how = extract_with_precision(
        model, items, cfg.data, device=device, flip=cfg.eval.flip, channels_last=bool(cfg.train.channels_last),
        amp=cfg.eval.amp, progress="calibration features" if progress else None, backend=cfg.eval.backend)
    result = calibrate(feats.numpy(), pids, camids, metric, sorted(set(DEFAULT_TARGETS) | set(targets)),
                       resamples, level, seed)
    result = {"kind": KIND, "version": VERSION, "checkpoint": str(Path(checkpoint).resolve()),
              "feature": {**record, **how.record()}, "data": description, **result}
    if out is not None:
        write_calibration(Path(out), result, overwrite=overwrite)
    return result


def default_path(checkpoint: str | Path) -> Path:
    """Where ``calibrate`` writes and ``index build`` / ``FeatureExtractor`` look: beside the checkpoint."""
    return Path(checkpoint).parent / "calibration.json"


def check_target(path: Path, weights_hash: str) -> None:
    """A file at ``path`` that is not a calibration of these weights is not replaced silently."""
    if not path.exists():
        return
    try:
        old = load_calibration(path)
    except AttnReidError:
        raise AttnReidError(f"{path} exists and is not a calibration; pass --out elsewhere or --overwrite") from None
    if old.get("feature", {}).get("weights_hash") != weights_hash:
        raise AttnReidError(f"{path} holds a calibration of other weights ({old.get('checkpoint')}); "
                            f"pass --out elsewhere or --overwrite")


def write_calibration(path: Path, result: Dict[str, Any], overwrite: bool = False) -> Path:
    """Write atomically; an existing file that is not a calibration of the same weights is kept
    unless ``overwrite``."""
    path = Path(path)
    if not overwrite:
        check_target(path, result["feature"]["weights_hash"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        json.dump(result, fh, indent=1)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load_calibration(path: str | Path) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"calibration file not found: {path}; run 'attnreid calibrate' first")
    try:
        cal = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        raise DataError(f"calibration file {path} is corrupt (not JSON)") from None
    if not isinstance(cal, dict) or cal.get("kind") != KIND or cal.get("version") != VERSION:
        raise DataError(f"{path} is not an attnreid calibration (version {VERSION})")
    return cal


def check_fits(cal: Dict[str, Any], record: Dict[str, Any], where: str, source: str) -> None:
    """Refuse (one line) a calibration whose feature, metric or model fingerprint differs from ``record``."""
    feature = cal.get("feature", {})
    for key in FIT_KEYS:
        if key in record and feature.get(key) != record.get(key):
            raise CheckpointError(f"calibration {source} does not fit {where}: its {key} is {feature.get(key)!r}, "
                                  f"here {record.get(key)!r}; run 'attnreid calibrate' for this model")


def resolve_threshold(cal: Optional[Dict[str, Any]], fpr: Optional[float], threshold: Optional[float],
                      where: str) -> Tuple[float, Dict[str, Any]]:
    """``(threshold, what it means)`` for ``--fpr`` (needs a calibration) or ``--threshold``."""
    from attnreid.evaluation.verification import threshold_for

    if (fpr is None) == (threshold is None):
        raise AttnReidError("give --fpr (a calibrated false-positive rate) or --threshold (a distance), not both")
    if threshold is not None:
        return float(threshold), {"threshold": float(threshold), "source": "given"}
    if cal is None:
        raise AttnReidError(f"--fpr needs a calibration, and {where} has none: run 'attnreid calibrate' (an index "
                            f"gets it from 'index build'), or give --threshold")
    t, point = threshold_for(cal, float(fpr))
    return t, {**point, "source": "calibration"}


def summary_lines(cal: Dict[str, Any]) -> List[str]:
    """The console summary of a calibration."""
    def pct(x: float) -> str:
        return f"{100 * x:.2f}"

    def ci(pair: Sequence[float], fmt=pct) -> str:
        return f"[{fmt(pair[0])}, {fmt(pair[1])}]"

    f, d, b = cal["feature"], cal["data"], cal["bootstrap"]
    lines = [f"{f['model']} ({f['test_feature']} feature, {f['feature_dim']}-d, {f['metric']}) on {d['dataset']} "
             f"{d['split']}: {cal['identities']} identities, {cal['images']} images, {cal['positive_pairs']} positive "
             f"/ {cal['negative_pairs']} negative pairs",
             f"EER {pct(cal['eer'])} % {ci(cal['eer_ci'])} at distance {cal['eer_threshold']:.4g}; intervals: "
             f"{100 * b['level']:g} % over {b['resamples']} resamples of the identities",
             f"{'target FPR':>10}  {'threshold [interval]':<30} {'TPR % [interval]':<24} FPR % on new identities"]
    for p in cal["operating_points"]:
        th = "inf" if p["threshold"] is None else f"{p['threshold']:.4g}"
        thr = f"{th} [{p['threshold_ci'][0]:.4g}, {p['threshold_ci'][1]:.4g}]"
        note = "" if p["enough_negatives"] else f"  (only {p['accepted_negatives']} negative pairs below it)"
        lines.append(f"{p['target_fpr']:>10.0e}  {thr:<30} {pct(p['tpr']) + ' ' + ci(p['tpr_ci']):<24} "
                     f"{pct(p['fpr'])} {ci(p['fpr_ci'])}{note}")
    lines.append("a pair is the same person when its distance is below the threshold")
    return lines
