"""Query-to-gallery distances, computed in row chunks so that the only large array is the result.

Two metrics, both "smaller is closer":

- ``euclidean_sq``: ``||q - g||^2 = ||q||^2 + ||g||^2 - 2 q.g``, clamped at 0 (the expansion can
  round to a tiny negative number for identical vectors). This is what torchreid and fast-reid
  call "euclidean" (they never take the square root); ranks are the same as for the plain
  Euclidean distance.
- ``cosine``: ``1 - cos(q, g)``, in [0, 2]; features are L2-normalised inside.

numpy arrays are computed with numpy (no torch import: ``attnreid metrics`` runs without
torch); torch tensors with torch, on their device (CPU or GPU). Both follow the same formula,
step for step, so they agree wherever their matrix products agree (exactly, for example, on
integer-valued features; in general to the last bit of the BLAS). Float16/bfloat16 inputs are
promoted to float32, float64 stays float64. Peak extra memory is one ``chunk_size x G`` block.
"""

from __future__ import annotations

import sys
from typing import Any, Iterator, Optional, Tuple, Union

import numpy as np

from attnreid.choices import METRICS
from attnreid.errors import AttnReidError

ArrayLike = Any  # numpy array, torch tensor or nested sequence


def is_tensor(x: Any) -> bool:
    """Whether ``x`` is a torch tensor, without importing torch (a tensor means torch is loaded)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise AttnReidError(f"unknown distance metric {metric!r}; expected one of {', '.join(METRICS)}")


def as_features(x: ArrayLike, name: str, device: Optional[Any] = None):
    """Check that ``x`` is an N x D finite float matrix; return it as float32/float64.

    torch tensors stay tensors (moved to ``device`` when given); anything else becomes a
    numpy array (``device`` is then ignored: numpy runs on the CPU).
    """
    if is_tensor(x) or device is not None:
        return as_feature_tensor(x, name, device)
    a = np.asarray(x)
    if a.ndim != 2:
        raise AttnReidError(f"{name} must be a 2-D array (N x D), got shape {tuple(a.shape)}")
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float32)
    if a.size and not (np.isfinite(a.min()) and np.isfinite(a.max())):
        raise AttnReidError(f"{name} contains NaN or inf values (shape {tuple(a.shape)})")
    return a


def as_feature_tensor(x: ArrayLike, name: str, device: Optional[Any] = None):
    import torch

    t = torch.as_tensor(x)
    if t.dim() != 2:
        raise AttnReidError(f"{name} must be a 2-D array (N x D), got shape {tuple(t.shape)}")
    if not t.is_floating_point() or t.dtype not in (torch.float32, torch.float64):
        t = t.to(torch.float32)
    if device is not None:
        t = t.to(device)
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise AttnReidError(f"{name} contains NaN or inf values (shape {tuple(t.shape)})")
    return t


def matched_features(qf: ArrayLike, gf: ArrayLike, device: Optional[Any] = None,
                     names: Tuple[str, str] = ("query features", "gallery features")):
    """``qf`` and ``gf`` checked, of one array library, dtype (the promoted one) and device."""
    q = as_features(qf, names[0], device)
    g = as_features(gf, names[1], q.device if is_tensor(q) else None)
    if is_tensor(q) != is_tensor(g):  # one tensor, one array: the tensor's library decides
        import torch

        q, g = (torch.as_tensor(q, device=g.device), g) if is_tensor(g) else (q, torch.as_tensor(g, device=q.device))
    if q.shape[1] != g.shape[1]:
        raise AttnReidError(f"{names[0]} have dimension {q.shape[1]} but {names[1]} have {g.shape[1]}")
    if is_tensor(q):
        import torch

        dtype = torch.promote_types(q.dtype, g.dtype)
        return q.to(dtype), g.to(dtype)
    dtype = np.promote_types(q.dtype, g.dtype)
    return q.astype(dtype, copy=False), g.astype(dtype, copy=False)


def compute_distance(
    qf: ArrayLike,
    gf: ArrayLike,
    metric: str = "euclidean_sq",
    chunk_size: int = 4096,
    device: Optional[Any] = None,
):
    """Distance matrix between query features ``qf`` (Q x D) and gallery features ``gf`` (G x D).

    Returns a Q x G numpy array for numpy input, a tensor on ``device`` (default: the device of
    ``qf``) for torch input. Rows are computed ``chunk_size`` at a time; see the module
    docstring for the metrics.
    """
    check_metric(metric)
    q, g = matched_features(qf, gf, device)
    if is_tensor(q):
        import torch

        out = torch.empty((q.shape[0], g.shape[0]), dtype=q.dtype, device=q.device)
    else:
        out = np.empty((q.shape[0], g.shape[0]), dtype=q.dtype)
    for start, block in iter_distance_chunks(q, g, metric, chunk_size):
        out[start : start + block.shape[0]] = block
    return out


def distance_block(q, g, metric: str, g_norms=None):
    """Q x G distances of checked features of one library, dtype and device: the one place the
    metrics are computed.

    ``euclidean_sq`` = |q|^2 + |g|^2 - 2 q.g (clamped at 0); ``cosine`` = 1 - q.g / (|q| |g|).
    ``g_norms`` (G,) are the L2 norms of ``g``'s rows when already known (a search index keeps
    them); ``g`` itself is only read by the one matrix product.
    """
    if is_tensor(q):
        return _distance_block_torch(q, g, metric, g_norms)
    norms = row_norms(g) if g_norms is None else g_norms
    if metric == "cosine":
        qn = q / np.maximum(row_norms(q), q.dtype.type(1e-12))[:, None]  # torch's F.normalize
        return 1.0 - (qn @ g.T) / np.maximum(norms, q.dtype.type(1e-12))[None, :]
    # torch.addmm(|g|^2, q, g.T, beta=1, alpha=-2) in numpy: the product scaled by -2 (exact)
    block = np.matmul(q, g.T)
    block *= -2.0
    block += np.square(norms)[None, :]
    block += np.einsum("ij,ij->i", q, q)[:, None]
    return np.maximum(block, 0.0, out=block)


def row_norms(x):
    """L2 norm of each row, in the features' dtype (and library)."""
    if is_tensor(x):
        import torch

        return torch.linalg.vector_norm(x, dim=1)
    return np.sqrt(np.einsum("ij,ij->i", x, x))


def _distance_block_torch(q, g, metric: str, g_norms=None):
    import torch

    norms = row_norms(g) if g_norms is None else g_norms
    if metric == "cosine":
        qn = torch.nn.functional.normalize(q, dim=1)
        return 1.0 - (qn @ g.T) / norms.clamp_min(1e-12).unsqueeze(0)
    block = torch.addmm(norms.square().unsqueeze(0), q, g.T, beta=1.0, alpha=-2.0)
    block += (q * q).sum(dim=1, keepdim=True)
    return block.clamp_(min=0.0)


def iter_distance_chunks(q, g, metric: str, chunk_size: int) -> Iterator[Tuple[int, Any]]:
    """Yield ``(first_row, block)`` with ``block`` = distances of query rows ``first_row..`` to all of ``g``.

    ``q`` and ``g`` must already be checked (:func:`matched_features`); used by the evaluators
    to stream over a gallery without holding the whole Q x G matrix.
    """
    chunk_size = max(1, int(chunk_size))
    g_norms = row_norms(g)
    for start in range(0, q.shape[0], chunk_size):
        yield start, distance_block(q[start : start + chunk_size], g, metric, g_norms)


def as_numpy(x) -> np.ndarray:
    """A numpy view of a tensor (copied from the GPU) or array."""
    if is_tensor(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)


__all__ = ["METRICS", "as_feature_tensor", "as_features", "as_numpy", "compute_distance", "distance_block", "is_tensor",
           "iter_distance_chunks", "matched_features"]
