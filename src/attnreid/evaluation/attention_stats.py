"""Head-diversity diagnostics of MHSA-Net's attention, as pure tensor functions.

They tell whether the K heads look at different regions (:func:`head_overlap`), whether
SAFFM uses them all or one (:func:`beta_entropy`), how much of alpha ACM acts on
(:func:`alpha_below`), and, on the grid, where the heads look: the height of each head's
map (:func:`head_heights`) and the share of attention on the middle of the image, where a
detector's crop puts the person (:func:`centre_mass`), and whether a head's map changes
with the image at all (:func:`map_consistency`). Inputs are tensors (any device, any float dtype; computed in
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
    # an entropy is >= 0: max() turns one-hot beta's -0.0 (and float round-off below 0) into 0.0
    return max(0.0, float(-torch.special.xlogy(p, p).sum(1).mean()))


def beta_entropy_max(num_heads: int) -> float:
    """ln K: the entropy of uniform beta over K heads, in nats."""
    return math.log(num_heads)


def beta_mean(beta: torch.Tensor) -> List[float]:
    """Mean beta per head over the images (K values summing to 1)."""
    return [float(v) for v in beta.detach().float().mean(0)]


def alpha_below(alpha: torch.Tensor, gamma: float) -> float:
    """Share of the attention entries strictly below gamma (those ACM, Eq. 12, acts on)."""
    return float((_maps(alpha) < gamma).float().mean())


def map_consistency(alpha: torch.Tensor) -> Optional[float]:
    """How much a head's map is the same for every image: 1 = image-independent (a fixed pooling).

    The mean over heads and images of sum_j min(alpha_i,k,j, mean_i' alpha_i',k,j), the
    overlap of each image's map with that head's mean map over the B images (maps
    normalised to sum 1 as in :func:`head_overlap`). None for a single image.
    """
    maps = _maps(alpha)
    if maps.shape[0] < 2:
        return None
    maps = maps / maps.sum(2, keepdim=True).clamp_min(1e-12)
    return float(torch.minimum(maps, maps.mean(0, keepdim=True)).sum(2).mean())


def _grid_maps(alpha: torch.Tensor) -> torch.Tensor:
    if alpha.dim() != 4:
        raise ValueError(f"alpha must be B x K x h x w here (the grid is needed), got shape {tuple(alpha.shape)}")
    maps = alpha.detach().float()
    return maps / maps.sum((2, 3), keepdim=True).clamp_min(1e-12)


def _centres(n: int, device) -> torch.Tensor:
    return (torch.arange(n, dtype=torch.float32, device=device) + 0.5) / n


def head_heights(alpha: torch.Tensor) -> List[float]:
    """Per head, the mean over the images of its map's vertical centroid, in (0, 1) from the top.

    Row r of h sits at height (r + 0.5) / h. Heads that look at the same height give equal
    values; a uniform map gives 0.5.
    """
    maps = _grid_maps(alpha)
    rows = maps.sum(3)  # B x K x h
    return [float(v) for v in (rows * _centres(rows.shape[2], rows.device)).sum(2).mean(0)]


def centre_mass(alpha: torch.Tensor, share: float = 0.5) -> float:
    """Mean share of each head's attention on the columns in the middle ``share`` of the width.

    A column counts when its centre, (c + 0.5) / w, lies within ``share / 2`` of the image's
    middle. Person crops from a detector centre the person, so a head on the person puts
    more here than a uniform map does (the share of such columns, :func:`centre_columns`);
    a head on the background at the image's edge puts less.
    """
    maps = _grid_maps(alpha)
    cols = maps.sum(2)  # B x K x w
    middle = (_centres(cols.shape[2], cols.device) - 0.5).abs() <= share / 2
    return float(cols[..., middle].sum(2).mean())


def centre_columns(width: int, share: float = 0.5) -> float:
    """The share of a ``width``-column grid that :func:`centre_mass` counts (its value for a uniform map)."""
    return float(((_centres(width, "cpu") - 0.5).abs() <= share / 2).float().mean())


def attention_stats(alpha: torch.Tensor, beta: Optional[torch.Tensor] = None,
                    gamma: Optional[float] = None) -> Dict[str, object]:
    """The diagnostics above in one dict, with the keys eval.json uses.

    ``head_overlap`` (K >= 2 only), ``map_consistency`` (B >= 2 only), ``head_heights``, ``centre_mass`` and
    ``centre_mass_uniform`` (alpha on the grid, B x K x h x w, only), ``beta_entropy``,
    ``beta_entropy_max``, ``beta_mean`` (with beta), ``alpha_below_gamma`` (with gamma),
    ``num_images``.
    """
    out: Dict[str, object] = {"num_images": int(alpha.shape[0])}
    overlap = head_overlap(alpha)
    if overlap is not None:
        out["head_overlap"] = overlap
    consistency = map_consistency(alpha)
    if consistency is not None:
        out["map_consistency"] = consistency
    if alpha.dim() == 4:
        out["head_heights"] = head_heights(alpha)
        out["centre_mass"] = centre_mass(alpha)
        out["centre_mass_uniform"] = centre_columns(alpha.shape[3])
    if beta is not None:
        out["beta_entropy"] = beta_entropy(beta)
        out["beta_entropy_max"] = beta_entropy_max(beta.shape[1])
        out["beta_mean"] = beta_mean(beta)
    if gamma is not None:
        out["alpha_below_gamma"] = alpha_below(alpha, gamma)
    return out
