"""Query-to-gallery distances, computed in row chunks so that the only large array is the result.

Two metrics, both "smaller is closer":

- ``euclidean_sq``: ``||q - g||^2 = ||q||^2 + ||g||^2 - 2 q.g``, clamped at 0 (the expansion can
  round to a tiny negative number for identical vectors). This is what torchreid and fast-reid
  call "euclidean" (they never take the square root); ranks are the same as for the plain
  Euclidean distance.
- ``cosine``: ``1 - cos(q, g)``, in [0, 2]; features are L2-normalised inside.

The computation runs on the features' device (CPU or GPU) in their floating dtype (float16/bfloat16
inputs are promoted to float32). Peak extra memory is one ``chunk_size x G`` block.
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch

from attnreid.choices import METRICS
from attnreid.errors import AttnReidError

ArrayLike = Union[torch.Tensor, np.ndarray]


def as_feature_tensor(x: ArrayLike, name: str, device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
    """Check that ``x`` is an N x D finite float matrix; return it as a tensor (float32 or float64)."""
    t = torch.as_tensor(x)
    if t.dim() != 2:
        raise AttnReidError(f"{name} must be a 2-D array (N x D), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.to(torch.float32)
    elif t.dtype not in (torch.float32, torch.float64):
        t = t.to(torch.float32)
    if device is not None:
        t = t.to(device)
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise AttnReidError(f"{name} contains NaN or inf values (shape {tuple(t.shape)})")
    return t


def compute_distance(
    qf: ArrayLike,
    gf: ArrayLike,
    metric: str = "euclidean_sq",
    chunk_size: int = 4096,
    device: Optional[Union[str, torch.device]] = None,
) -> torch.Tensor:
    """Distance matrix between query features ``qf`` (Q x D) and gallery features ``gf`` (G x D).

    Returns a Q x G tensor on ``device`` (default: the device of ``qf``). Rows are computed
    ``chunk_size`` at a time; see the module docstring for the metrics.
    """
    if metric not in METRICS:
        raise AttnReidError(f"unknown distance metric {metric!r}; expected one of {', '.join(METRICS)}")
    q = as_feature_tensor(qf, "query features", device)
    g = as_feature_tensor(gf, "gallery features", q.device)
    if q.shape[1] != g.shape[1]:
        raise AttnReidError(
            f"query features have dimension {q.shape[1]} but gallery features have {g.shape[1]}"
        )
    dtype = torch.promote_types(q.dtype, g.dtype)
    q, g = q.to(dtype), g.to(dtype)
    out = torch.empty((q.shape[0], g.shape[0]), dtype=dtype, device=q.device)
    for start, block in iter_distance_chunks(q, g, metric, chunk_size):
        out[start : start + block.shape[0]] = block
    return out


def distance_block(q: torch.Tensor, g: torch.Tensor, metric: str,
                   g_norms: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Q x G distances of checked tensors of one dtype and device: the one place the metrics are computed.

    ``euclidean_sq`` = |q|^2 + |g|^2 - 2 q.g (clamped at 0); ``cosine`` = 1 - q.g / (|q| |g|).
    ``g_norms`` (G,) are the L2 norms of ``g``'s rows when already known (a search index keeps
    them); ``g`` itself is only read by the one matrix product.
    """
    norms = torch.linalg.vector_norm(g, dim=1) if g_norms is None else g_norms
    if metric == "cosine":
        qn = torch.nn.functional.normalize(q, dim=1)
        return 1.0 - (qn @ g.T) / norms.clamp_min(1e-12).unsqueeze(0)
    block = torch.addmm(norms.square().unsqueeze(0), q, g.T, beta=1.0, alpha=-2.0)
    block += (q * q).sum(dim=1, keepdim=True)
    return block.clamp_(min=0.0)


def iter_distance_chunks(q: torch.Tensor, g: torch.Tensor, metric: str, chunk_size: int):
    """Yield ``(first_row, block)`` with ``block`` = distances of query rows ``first_row..`` to all of ``g``.

    ``q`` and ``g`` must already be checked tensors of one dtype and device; used by the evaluators
    to stream over a gallery without holding the whole Q x G matrix.
    """
    chunk_size = max(1, int(chunk_size))
    g_norms = torch.linalg.vector_norm(g, dim=1)
    for start in range(0, q.shape[0], chunk_size):
        yield start, distance_block(q[start : start + chunk_size], g, metric, g_norms)
