"""Regularisers of MHSA-Net: FDRT (Eq. 3) on the embeddings, ACM (Eq. 12) on the attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def feature_diversity(p: torch.Tensor) -> torch.Tensor:
    """FDRT, Eq. 3: L = ||G - I||_F / K^2 with G = P P^T, P's rows L2-normalised.

    p: B x K x E -> G: B x K x K; the loss is averaged over the batch. Zero when the K
    embeddings of every image are orthogonal (always zero for K = 1).
    """
    k = p.shape[1]
    with torch.autocast(device_type=p.device.type, enabled=False):  # G - I is small: keep float32
        pn = F.normalize(p.float(), dim=2)
        gram = torch.bmm(pn, pn.transpose(1, 2))
        eye = torch.eye(k, dtype=gram.dtype, device=p.device)
        return torch.linalg.matrix_norm(gram - eye, ord="fro").mean() / (k * k)


def attention_competition(alpha: torch.Tensor, gamma: float = 1e-3) -> torch.Tensor:
    """ACM, Eq. 12: L_C = sum_{i,j} min(alpha_ij, gamma)^2, averaged over the batch.

    alpha: B x K x J. Only weights below gamma contribute (and get pushed to zero);
    weights at or above gamma add the constant gamma^2 and get no gradient.
    """
    return alpha.clamp(max=gamma).pow(2).flatten(1).sum(1).mean()
