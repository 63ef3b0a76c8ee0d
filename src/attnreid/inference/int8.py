"""What int8 quantisation needs from the data: calibration images and a validation score.

:func:`calibration_images` is what an exported backend's int8 session is calibrated on
(``eval.int8_calibration`` training images, spread evenly over the training set without the
validation identities); :func:`validation_scorer` is how ``eval.backend=auto`` checks int8
against float32 (rank-1 and mAP on the validation split of ``data.val_ids``;
:func:`attnreid.inference.backend.int8_within`). Both read the data lazily, only when int8 is
actually tried.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from attnreid.data.loader import build_test_loader
from attnreid.data.splits import hold_out_validation
from attnreid.errors import DataError


def _split(cfg: Any):
    from attnreid.data.datasets import build_dataset_from_config

    try:
        return hold_out_validation(build_dataset_from_config(cfg.data), cfg.data.val_ids)
    except DataError as exc:
        raise DataError(f"int8 calibration needs the training images of data.dataset "
                        f"'{cfg.data.dataset}' under data.root: {exc}") from None


def calibration_images(cfg: Any) -> Callable[[], List[torch.Tensor]]:
    """A callable returning ``eval.int8_calibration`` preprocessed training images (batches),
    evenly spaced over the training list (without the validation identities): every identity
    range is represented, and the same images are drawn every time."""
    def load() -> List[torch.Tensor]:
        train = list(_split(cfg)[0].train)
        if not train:
            raise DataError(f"int8 calibration: data.dataset '{cfg.data.dataset}' has no training images")
        n = min(int(cfg.eval.int8_calibration), len(train))
        picks = np.linspace(0, len(train) - 1, n).round().astype(int)
        loader = build_test_loader(cfg.data, [train[i] for i in picks])
        return [batch[0] for batch in loader]
    return load


def validation_scorer(cfg: Any) -> Optional[Callable[[Callable[[torch.Tensor], torch.Tensor]], Dict[str, float]]]:
    """``score(features) -> {"rank1", "mAP"}`` on the validation split (``data.val_ids``), where
    ``features(images)`` computes one batch; None without a validation split (``data.val_ids=0``)."""
    if cfg.data.val_ids <= 0:
        return None

    def score(features: Callable[[torch.Tensor], torch.Tensor]) -> Dict[str, float]:
        from attnreid.evaluation.protocols import evaluate

        val = _split(cfg)[1]
        sides = {}
        for side in ("query", "gallery"):
            feats, pids, cams = [], [], []
            for batch in build_test_loader(cfg.data, getattr(val, side)):
                feats.append(features(batch[0]).float().cpu())
                pids.append(np.asarray(batch[1]).reshape(-1))
                cams.append(np.asarray(batch[2]).reshape(-1))
            sides[side] = (torch.cat(feats).numpy(), np.concatenate(pids), np.concatenate(cams))
        (qf, qp, qc), (gf, gp, gc) = sides["query"], sides["gallery"]
        m = evaluate(qf, gf, qp, gp, qc, gc, protocol=val.protocol)
        return {"rank1": float(m["rank1"]), "mAP": float(m["mAP"])}
    return score


def int8_hooks(cfg: Any, validate: bool = False) -> Dict[str, Any]:
    """``calibration`` (always: read only when int8 is set up) and, with ``validate``, the
    validation scorer: the keyword arguments of ``extract_with_precision``/``resolve_inference``."""
    return {"calibration": calibration_images(cfg), "validate": validation_scorer(cfg) if validate else None}
