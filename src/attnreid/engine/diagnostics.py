"""Head diagnostics of training (MHSA-Net): are the regularisers active, do the heads differ?

Computed from the training forward's outputs (a :class:`~attnreid.models.output.TrainOutput`:
``alpha`` B x K x J, ``beta`` B x K, ``P`` B x K x E) without gradients, averaged over an
epoch's images by :class:`attnreid.engine.hooks.DiagnosticsHook` (for models whose registry
entry has ``attention="heads"``), and written to log.jsonl:

- ``alpha_below_gamma``: the share of attention weights below ACM's gamma (Eq. 12). ACM's
  gradient comes only from those weights, so 0 means ACM does nothing.
- ``fdrt``: FDRT's value (Eq. 3, or the form ``loss.fdrt_form`` names), also when its weight is 0.
- ``beta_mean``: SAFFM's mean beta per head (Eq. 6); one head near 1 means the fusion
  uses one head only.
- ``head_overlap``: the mean over head pairs (a < b) and images of sum_j min(alpha_a,j,
  alpha_b,j); with the spatial softmax each map sums to 1, so 1 = identical maps and 0 =
  disjoint maps.
- ``beta_entropy``: -sum_k beta_k log beta_k (nats) averaged over images: 0 for a one-hot
  beta, log K for a uniform one.

The definitions live in :mod:`attnreid.evaluation.attention_stats` (one copy, shared
with eval.json and the report); this module applies them to a training batch.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from attnreid.evaluation.attention_stats import alpha_below, beta_entropy, head_overlap
from attnreid.losses.regularizers import feature_diversity
from attnreid.models.output import TrainOutput

__all__ = ["alpha_below", "beta_entropy", "head_overlap", "batch_diagnostics", "DiagnosticsMeter"]


def batch_diagnostics(outputs: TrainOutput, acm_gamma: float, fdrt_form: str = "paper") -> Dict[str, object]:
    """The diagnostics of one batch's training outputs (empty when they hold no ``alpha``);
    FDRT in the run's ``loss.fdrt_form``."""
    if not isinstance(outputs, dict) or "alpha" not in outputs:
        return {}
    with torch.no_grad():
        alpha = outputs["alpha"]
        out: Dict[str, object] = {"alpha_below_gamma": float(alpha_below(alpha, acm_gamma))}
        if "P" in outputs:
            out["fdrt"] = float(feature_diversity(outputs["P"], fdrt_form))
        overlap = head_overlap(alpha)
        if overlap is not None:
            out["head_overlap"] = float(overlap)
        beta = outputs.get("beta")
        if beta is not None:
            out["beta_entropy"] = float(beta_entropy(beta))
            out["beta_mean"] = [float(x) for x in beta.float().mean(0)]
    return out


class DiagnosticsMeter:
    """Image-weighted means of :func:`batch_diagnostics` over the batches added since the last reset."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.sums: Dict[str, object] = {}

    def add(self, values: Dict[str, object], n: int) -> None:
        for key, v in values.items():
            if isinstance(v, list):
                prev: List[float] = self.sums.get(key) or [0.0] * len(v)  # type: ignore[assignment]
                self.sums[key] = [p + n * x for p, x in zip(prev, v)]
            else:
                self.sums[key] = float(self.sums.get(key, 0.0)) + n * float(v)  # type: ignore[arg-type]
        if values:
            self.n += n

    def means(self) -> Dict[str, object]:
        if not self.n:
            return {}
        return {k: ([x / self.n for x in v] if isinstance(v, list) else v / self.n)  # type: ignore[operator]
                for k, v in self.sums.items()}
