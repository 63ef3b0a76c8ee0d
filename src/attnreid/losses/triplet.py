"""Batch-hard triplet loss (Hermans et al. [1], Eq. 4) and the Improved Hard Triplet Loss (Eq. 5).

Both use the squared Euclidean distance d(a, b) = ||a - b||^2 of the paper. Choices the
papers leave open, written down here: an image is never its own positive (a positive
pair is two different images of one identity), and an anchor that has no positive or no
negative in the batch is left out of the mean (a PK batch never has such anchors).
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F


def pairwise_squared_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """d(a_i, b_j) = ||a_i - b_j||^2 for a: N x D, b: M x D -> N x M (clamped at 0).

    Computed in float32 with autocast off: the expansion ||a||^2 + ||b||^2 - 2ab cancels
    large terms, which half precision cannot resolve.
    """
    with torch.autocast(device_type=a.device.type, enabled=False):
        a, b = a.float(), b.float()
        d = a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1).unsqueeze(0) - 2.0 * a @ b.t()
    return d.clamp_min(0.0)


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


def _reduce(pos: torch.Tensor, neg: torch.Tensor, valid: torch.Tensor, margin: float, soft: bool,
            anchor: torch.Tensor) -> torch.Tensor:
    if not bool(valid.any()):
        return anchor.sum() * 0.0
    pos, neg = pos[valid], neg[valid]
    per_anchor = F.softplus(pos - neg) if soft else F.relu(margin + pos - neg)
    return per_anchor.mean()


def batch_hard_triplet(features: torch.Tensor, labels: torch.Tensor, margin: float = 0.3) -> torch.Tensor:
    """Eq. 4: mean over anchors of [m + max_p d(a, p) - min_n d(a, n)]_+.

    features: B x D, labels: B. Used on p* (L_SAFFM, Eq. 8) and z (L_ReN, Eq. 10) with
    margin 0.3 unless configured (``loss.triplet_margin``; the paper gives none).
    """
    dist = pairwise_squared_distance(features, features)
    pos, neg, valid = hardest_pairs(dist, labels)
    return _reduce(pos, neg, valid, margin, False, features)


def improved_hard_triplet(p: torch.Tensor, labels: torch.Tensor, margin: float = 3.0, soft: bool = False) -> torch.Tensor:
    """IHTL, Eq. 5, on the K embeddings of each image.

    p: B x K x E. Step I: the squared distance between every head of every image pair
    (B*K x B*K) is reduced per image pair (a K x K block) to its max for positive pairs
    and its min for negative pairs. Step II: batch-hard mining per anchor on those
    image-pair distances; hinge ``[m + pos - neg]_+`` with m = 3.0, or with ``soft``
    ``softplus(pos - neg)``. Mean over anchors.
    """
    b, k, _ = p.shape
    flat = p.reshape(b * k, -1)
    blocks = pairwise_squared_distance(flat, flat).view(b, k, b, k).permute(0, 2, 1, 3).reshape(b, b, k * k)
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    # Each image pair's distance: the block max where it may serve as a positive, the min otherwise.
    pair_dist = torch.where(same, blocks.max(dim=2).values, blocks.min(dim=2).values)
    pos, neg, valid = hardest_pairs(pair_dist, labels)
    return _reduce(pos, neg, valid, margin, soft, p)
