"""Batch-hard triplet loss (Hermans et al. [1], Eq. 4) and the Improved Hard Triplet Loss (Eq. 5).

Distance and margin are configuration (docs/spec.md §1, "Total" and "IHTL"):

- ``distance="euclidean"`` (default): d(a, b) = ||a - b||, square-rooted, as the authors'
  released code (``euclidean_dist``) and Hermans et al. use it.
  ``distance="squared"``: d(a, b) = ||a - b||^2, the literal reading of Eq. 5. On
  LayerNorm'd 512-d vectors (||p*|| ~ 22.6, ||z|| ~ 181 for K = 8 without
  ``rlm_out_norm``) squared distances are in the hundreds to tens of thousands, so a
  squared triplet dwarfs every CE term; that is why it is not the default.
- ``margin="soft"`` (default): ``softplus(pos - neg)``, the soft margin of Hermans et al.
  and the authors' code (``margin=None`` selects ``SoftMarginLoss``). A number m >= 0:
  the hinge ``[m + pos - neg]_+``. :func:`attnreid.choices.parse_margin` turns a config value into
  one of the two, once, at build time.

Choices the papers leave open, written down here: an image is never its own positive (a
positive pair is two different images of one identity), and an anchor that has no
positive or no negative in the batch is left out of the mean (a PK batch never has such
anchors).
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from attnreid.choices import DISTANCES, Margin

# sqrt is clamped below at this squared distance so that its gradient stays finite
# where two vectors coincide (d/dx sqrt(x) is infinite at 0); 1e-12 -> 1e-6 in distance.
SQRT_EPS = 1e-12


def pairwise_squared_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """d(a_i, b_j) = ||a_i - b_j||^2 for a: N x D, b: M x D -> N x M (clamped at 0).

    Computed in float32 with autocast off: the expansion ||a||^2 + ||b||^2 - 2ab cancels
    large terms, which half precision cannot resolve.
    """
    with torch.autocast(device_type=a.device.type, enabled=False):
        a, b = a.float(), b.float()
        d = a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1).unsqueeze(0) - 2.0 * a @ b.t()
    return d.clamp_min(0.0)


def pairwise_distance(a: torch.Tensor, b: torch.Tensor, distance: str = "euclidean") -> torch.Tensor:
    """N x D, M x D -> N x M: ``euclidean`` ||a_i - b_j|| or ``squared`` ||a_i - b_j||^2.

    The Euclidean distance is sqrt(max(d^2, 1e-12)): its gradient is finite (zero) where
    two vectors coincide, so masking such entries out cannot produce NaN (0 * inf).
    """
    sq = pairwise_squared_distance(a, b)
    if distance == "squared":
        return sq
    if distance == "euclidean":
        return sq.clamp_min(SQRT_EPS).sqrt()
    raise ValueError(f"unknown distance {distance!r}; expected one of {DISTANCES}")


def hardest_pairs(dist: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch-hard mining on an image-pair distance matrix (B x B).

    Returns, per anchor, the largest distance to another image of its identity, the
    smallest distance to an image of another identity, and whether both exist.
    """
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    pos_mask, neg_mask = same & ~eye, ~same
    hardest_pos = torch.where(pos_mask, dist, torch.full_like(dist, float("-inf"))).max(dim=1).values
    hardest_neg = torch.where(neg_mask, dist, torch.full_like(dist, float("inf"))).min(dim=1).values
    return hardest_pos, hardest_neg, pos_mask.any(1) & neg_mask.any(1)


def _reduce(pos: torch.Tensor, neg: torch.Tensor, valid: torch.Tensor, margin: Margin,
            anchor: torch.Tensor) -> torch.Tensor:
    if not bool(valid.any()):
        return anchor.sum() * 0.0
    pos, neg = pos[valid], neg[valid]
    per_anchor = F.softplus(pos - neg) if margin == "soft" else F.relu(float(margin) + pos - neg)
    return per_anchor.mean()


def batch_hard_triplet(features: torch.Tensor, labels: torch.Tensor, margin: Margin = "soft",
                       distance: str = "euclidean") -> torch.Tensor:
    """Eq. 4: mean over anchors of ``l(max_p d(a, p) - min_n d(a, n))``.

    ``l`` is softplus (``margin="soft"``) or ``[m + .]_+`` (a number m). features: B x D,
    labels: B. Used on p* (L_SAFFM, Eq. 8) and z (L_ReN, Eq. 10); the paper gives
    neither distance nor margin (``loss.triplet_distance``, ``loss.triplet_margin``).
    """
    dist = pairwise_distance(features, features, distance)
    pos, neg, valid = hardest_pairs(dist, labels)
    return _reduce(pos, neg, valid, margin, features)


def improved_hard_triplet(p: torch.Tensor, labels: torch.Tensor, margin: Margin = "soft",
                          distance: str = "euclidean") -> torch.Tensor:
    """IHTL, Eq. 5, on the K embeddings of each image.

    p: B x K x E. Step I: the distance between every head of every image pair
    (B*K x B*K) is reduced per image pair (a K x K block) to its max for positive pairs
    and its min for negative pairs. Step II: batch-hard mining per anchor on those
    image-pair distances, then softplus(pos - neg) (``margin="soft"``, default) or the
    hinge [m + pos - neg]_+. Mean over anchors. The paper writes squared distance with
    m = 3.0 (``loss.ihtl_distance: squared``, ``loss.ihtl_margin: 3.0``).
    """
    b, k, _ = p.shape
    flat = p.reshape(b * k, -1)
    blocks = pairwise_distance(flat, flat, distance).view(b, k, b, k).permute(0, 2, 1, 3).reshape(b, b, k * k)
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    # Each image pair's distance: the block max where it may serve as a positive, the min otherwise.
    pair_dist = torch.where(same, blocks.max(dim=2).values, blocks.min(dim=2).values)
    pos, neg, valid = hardest_pairs(pair_dist, labels)
    return _reduce(pos, neg, valid, margin, p)
