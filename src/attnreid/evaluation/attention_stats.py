"""Head-diversity diagnostics of MHSA-Net's attention, as pure tensor functions.

They tell whether the K heads look at different regions (:func:`head_overlap`), whether
SAFFM uses them all or one (:func:`beta_entropy`), and how much of alpha ACM acts on
(:func:`alpha_below`). Inputs are tensors (any device, any float dtype; computed in
float32): ``alpha`` B x K x J (or B x K x h x w), ``beta`` B x K. Each function returns
one Python float, a mean over the B images, so a caller that sees the images in batches
weights each batch's value by its size. Used by ``engine/evaluator.py`` (eval.json), the
report's attention panel and the trainer's per-epoch log.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import torch


def _maps(alpha: torch.Tensor) -> torch.Tensor:
    if alpha.dim() not in (3, 4):
        raise ValueError(f"alpha must be B x K x J or B x K x h x w, got shape {tuple(alpha.shape)}")
    return alpha.detach().float().flatten(2)


def head_overlap(alpha: torch.Tensor) -> Optional[float]:
    """Mean pairwise overlap of the K attention maps: sum_j min(alpha_a,j, alpha_b,j).

    Averaged over the K(K-1)/2 head pairs a < b and over the images. Each map is first
    divided by its sum over the J positions, so that it is a distribution (already so
    with ``attention_norm: spatial``; with ``heads`` the raw maps do not sum to 1).
    1 = the K maps are identical, 0 = their supports are disjoint. None for K = 1 (no pairs).
    """
    maps = _maps(alpha)
    k = maps.shape[1]
    if k < 2:
        return None
    maps = maps / maps.sum(2, keepdim=True).clamp_min(1e-12)
    a, c = torch.triu_indices(k, k, offset=1)
    overlap = torch.minimum(maps[:, a], maps[:, c]).sum(2)  # B x pairs
    return float(overlap.mean())


def beta_entropy(beta: torch.Tensor) -> float:
    """Mean entropy of SAFFM's beta over the images, in nats: -sum_k beta_k ln beta_k.

    0 = one-hot (SAFFM uses one head); the maximum, ln K (:func:`beta_entropy_max`), is
    reached by uniform weights. 0 ln 0 counts as 0.
    """
    if beta.dim() != 2:
        raise ValueError(f"beta must be B x K, got shape {tuple(beta.shape)}")
    p = beta.detach().float()
    return float(-torch.special.xlogy(p, p).sum(1).mean())


def beta_entropy_max(num_heads: int) -> float:
    """ln K: the entropy of uniform beta over K heads, in nats."""
    return math.log(num_heads)


def beta_mean(beta: torch.Tensor) -> List[float]:
    """Mean beta per head over the images (K values summing to 1)."""
    return [float(v) for v in beta.detach().float().mean(0)]


def alpha_below(alpha: torch.Tensor, gamma: float) -> float:
    """Share of the attention entries strictly below gamma (those ACM, Eq. 12, acts on)."""
    return float((_maps(alpha) < gamma).float().mean())


def attention_stats(alpha: torch.Tensor, beta: Optional[torch.Tensor] = None,
                    gamma: Optional[float] = None) -> Dict[str, object]:
    """The diagnostics above in one dict, with the keys eval.json uses.

    ``head_overlap`` (K >= 2 only), ``beta_entropy``, ``beta_entropy_max``, ``beta_mean``
    (with beta), ``alpha_below_gamma`` (with gamma), ``num_images``.
    """
    out: Dict[str, object] = {"num_images": int(alpha.shape[0])}
    overlap = head_overlap(alpha)
    if overlap is not None:
        out["head_overlap"] = overlap
    if beta is not None:
        out["beta_entropy"] = beta_entropy(beta)
        out["beta_entropy_max"] = beta_entropy_max(beta.shape[1])
        out["beta_mean"] = beta_mean(beta)
    if gamma is not None:
        out["alpha_below_gamma"] = alpha_below(alpha, gamma)
    return out
