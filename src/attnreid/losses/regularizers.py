"""Regularisers of MHSA-Net: FDRT (Eq. 3) on the embeddings, ACM (Eq. 12) on the attention.

Each has the paper's form (the default) and the form of the authors' released code as
an option (``loss.fdrt_form``, ``loss.acm_form``; docs/spec.md §1). At the paper's weights
both are close to inactive; docs/models.md gives the measured numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnreid.choices import ACM_FORMS, FDRT_FORMS


def feature_diversity(p: torch.Tensor, form: str = "paper") -> torch.Tensor:
    """FDRT: L = ||G - I||_F / K^2 per image, averaged over the batch. p: B x K x E.

    ``form="paper"`` (Eq. 3): G = P^ P^^T with the rows of P L2-normalised first, so G
    is the K x K matrix of cosine similarities (diagonal exactly 1); L is at most
    sqrt(K(K - 1)) / K^2 < 1/K (0.117 for K = 8, all K rows parallel, as they nearly are
    at initialisation), so lambda1 = 1e-4 makes it at most 1.2e-5.

    ``form="gram"`` (our reading of the authors' code, which normalises the raw Gram
    matrix instead of the embeddings): G_raw = P P^T on the un-normalised P, then each
    row of G_raw is divided by its L2 norm, G_i = G_raw,i / ||G_raw,i||. Its diagonal is
    ||P_i||^2 / ||G_raw,i|| <= 1, equal to 1 only where row i is orthogonal to the
    others, so the gradient also acts on the embeddings' relative lengths.

    Both are zero exactly when the K embeddings of every image are pairwise orthogonal
    (always zero for K = 1). Computed in float32 with autocast off: G - I is small.
    """
    if form not in FDRT_FORMS:
        raise ValueError(f"unknown FDRT form {form!r}; expected one of {FDRT_FORMS}")
    k = p.shape[1]
    with torch.autocast(device_type=p.device.type, enabled=False):
        p = p.float()
        if form == "paper":
            pn = F.normalize(p, dim=2)
            gram = torch.bmm(pn, pn.transpose(1, 2))
        else:
            gram = F.normalize(torch.bmm(p, p.transpose(1, 2)), dim=2)
        eye = torch.eye(k, dtype=gram.dtype, device=p.device)
        return torch.linalg.matrix_norm(gram - eye, ord="fro").mean() / (k * k)


def attention_competition(alpha: torch.Tensor, gamma: float = 1e-3, form: str = "paper") -> torch.Tensor:
    """ACM on alpha (B x K x J): a sum over all K x J entries, averaged over the batch.

    ``form="paper"`` (Eq. 12): L_C = sum_{i,j} min(alpha_ij, gamma)^2. Entries below
    gamma get gradient 2 alpha_ij (pushed to zero); entries at or above gamma add the
    constant gamma^2 and get none. With the spatial softmax over J = 192 positions at
    initialisation every alpha is near 1/192 > gamma = 1e-3, so the gradient starts at 0.

    ``form="linear"`` (the authors' code): L_C = sum_{i,j} alpha_ij [alpha_ij < gamma],
    the same threshold with a linear penalty: every entry below gamma gets gradient 1,
    however small it already is. The authors used gamma = 0.01 with weight 1e-4
    (``loss.acm_gamma: 0.01``, ``loss.lambda_acm: 1.0e-4``).
    """
    if form not in ACM_FORMS:
        raise ValueError(f"unknown ACM form {form!r}; expected one of {ACM_FORMS}")
    if form == "paper":
        per_entry = alpha.clamp(max=gamma).pow(2)
    else:
        per_entry = alpha * (alpha < gamma).to(alpha.dtype)
    return per_entry.flatten(1).sum(1).mean()


def attention_orthogonality(alpha: torch.Tensor) -> torch.Tensor:
    """Structured self-attention penalty (Lin et al. 2017, MHSA-Net's [56]): ||A A^T - I||_F^2.

    alpha: B x K x J, each row a head's distribution over the J positions (the spatial
    softmax). A A^T is K x K: its off-diagonal entries are the overlaps of two heads'
    maps and its diagonal the heads' self-overlaps (1 only for a one-position map).
    The penalty pushes the K maps apart, onto different positions, which FDRT (Eq. 3,
    on the embeddings P) does not. Averaged over the batch. Not part of MHSA-Net's
    loss: an option (``loss.lambda_attention_orth``, default 0), computed in float32.
    """
    with torch.autocast(device_type=alpha.device.type, enabled=False):
        a = alpha.float()
        gram = torch.bmm(a, a.transpose(1, 2))
        eye = torch.eye(a.shape[1], dtype=gram.dtype, device=a.device)
        return (gram - eye).pow(2).flatten(1).sum(1).mean()
