"""Test features of a list of images (a split, or the files of a folder)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from attnreid.data.loader import build_test_loader
from attnreid.errors import DataError
from attnreid.inference.backend import (Inference, announce, explicit, resolve_inference, run_features,
                                        settle_inference)
from attnreid.precision import Precision
from attnreid.progress import ProgressReporter

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def extract_features(model: nn.Module, items: Sequence[Tuple[str, int, int]], data_cfg: Any,
                     batch_size: Optional[int] = None, device: str | torch.device = "cpu",
                     flip: bool = False, channels_last: bool = False,
                     amp: str | Precision | Inference = "auto", progress: Optional[str] = None,
                     return_index: bool = False, backend: str = "auto", num_images: Optional[int] = None,
                     calibration=None, validate=None):
    """Run the model in eval mode over ``items`` (``(path, pid, camid)``).

    Returns ``(features N x D float32 on the CPU, pids, camids)`` in the order of
    ``items``. ``flip`` averages the features of each image and its mirror image (an
    evaluation option neither paper uses; off by default). ``amp`` is the precision
    (``eval.amp``: auto | off | bf16 | fp16, or a resolved
    :class:`~attnreid.precision.Precision`) and ``backend`` the backend (``eval.backend``:
    auto | torch | onnxruntime | openvino); an :class:`~attnreid.inference.backend.Inference` returned
    by :func:`extract_with_precision` as ``amp`` reuses that decision (both sides of an
    evaluation computed alike). ``num_images`` is the size of the whole job for ``auto``'s
    onnxruntime threshold (default ``len(items)``); see :mod:`attnreid.inference.backend`.
    ``progress``: a label for a progress display on stderr
    (:class:`attnreid.progress.ProgressReporter`); None shows none. With
    ``data.skip_bad_images`` unreadable images are left out, so N may be smaller than
    ``len(items)``; ``return_index=True`` adds a fourth value, the index into ``items``
    of each row. ``calibration`` and ``validate`` are what int8 needs
    (:func:`attnreid.inference.int8.int8_hooks`).
    """
    feats, pids, camids, index, _ = extract_with_precision(model, items, data_cfg, batch_size, device, flip,
                                                           channels_last, amp, progress, backend, num_images,
                                                           calibration, validate)
    return (feats, pids, camids, index) if return_index else (feats, pids, camids)


def extract_with_precision(model: nn.Module, items: Sequence[Tuple[str, int, int]], data_cfg: Any,
                           batch_size: Optional[int] = None, device: str | torch.device = "cpu",
                           flip: bool = False, channels_last: bool = False,
                           amp: str | Precision | Inference = "auto", progress: Optional[str] = None,
                           backend: str = "auto", num_images: Optional[int] = None,
                           calibration=None, validate=None):
    """:func:`extract_features` with the row index, plus how the features were computed.

    Returns ``(features, pids, camids, index, inference)``, the last an
    :class:`~attnreid.inference.backend.Inference` (backend and precision; ``auto`` is
    settled on the first batch), which a later call takes as ``amp`` to compute alike.
    """
    if batch_size is not None:
        data_cfg = dataclasses.replace(data_cfg, test_batch_size=batch_size)
    device = torch.device(device)
    choice = resolve_inference(amp, backend, device, len(items) if num_images is None else num_images,
                               calibration=calibration, validate=validate)
    loader = build_test_loader(data_cfg, list(items))
    was_training = model.training
    model.eval()
    feats: List[torch.Tensor] = []
    pids: List[np.ndarray] = []
    camids: List[np.ndarray] = []
    index: List[np.ndarray] = []
    rows = 0
    bar = ProgressReporter(progress or "", total=len(loader.dataset), enabled=progress is not None)
    finished = False

    def features(images: torch.Tensor) -> torch.Tensor:
        f = model(images).float()
        if flip:
            f = (f + model(torch.flip(images, dims=[3])).float()) / 2
        return f

    if choice.settled:
        announce(choice)
    try:
        with torch.inference_mode():
            for batch in loader:
                images, pid, camid = batch[0], batch[1], batch[2]
                images = images.to(device, non_blocking=True)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                if not choice.settled:
                    choice = settle_inference(model, choice, images, features, flip)
                    announce(choice)
                feats.append(run_features(model, choice, images, features, flip).cpu())
                pids.append(np.asarray(pid).reshape(-1))
                camids.append(np.asarray(camid).reshape(-1))
                index.append(np.asarray(batch[3]).reshape(-1))
                rows += len(index[-1])
                bar.advance(rows + len(loader.bad_images) - bar.done)  # skipped images count as processed
        finished = True
    finally:
        bar.close(ok=finished)
        model.train(was_training)
    empty = np.zeros(0, np.int64)
    if not feats:
        return torch.zeros(0, getattr(model, "feature_dim", 0)), empty, empty, empty, choice
    return (torch.cat(feats), np.concatenate(pids).astype(np.int64), np.concatenate(camids).astype(np.int64),
            np.concatenate(index).astype(np.int64), choice)


def shard_of(num_items: int, batch_size: int, rank: int, world_size: int) -> np.ndarray:
    """The item indices rank ``rank`` of ``world_size`` embeds: the batches ``rank``,
    ``rank + world_size``, ... of ``batch_size`` items. Whole batches, so every image is computed
    in the same batch as in one process (batch-size dependent kernels give the same numbers)."""
    starts = range(rank * batch_size, num_items, world_size * batch_size)
    return np.concatenate([np.arange(s, min(s + batch_size, num_items)) for s in starts]) if starts \
        else np.zeros(0, np.int64)


def extract_across_ranks(ctx: Any, model: nn.Module, items: Sequence[Tuple[str, int, int]], data_cfg: Any,
                         amp: str | Precision | Inference = "auto", backend: str = "auto",
                         num_images: Optional[int] = None, progress: Optional[str] = None, **kwargs):
    """:func:`extract_with_precision` shared over the ranks of ``ctx``
    (:class:`attnreid.distributed.DistContext`): each rank embeds only its :func:`shard_of` the
    items and rank 0 gathers the rows into the order one process gives. Returns the same
    tuple on rank 0; the other ranks get ``(None, None, None, None, inference)`` (pass the
    inference as ``amp`` to the next call, as rank 0 does). With one process it is
    :func:`extract_with_precision`.

    ``auto`` is decided once, by rank 0 on the job's first batch, and the other ranks compute
    exactly that (:func:`attnreid.inference.backend.explicit`): one file, one backend and
    precision. ``kwargs`` go to :func:`extract_with_precision` (``device``, ``flip``, ...).
    """
    if not ctx.enabled:
        return extract_with_precision(model, items, data_cfg, amp=amp, backend=backend, num_images=num_images,
                                      progress=progress, **kwargs)
    total = len(items) if num_images is None else num_images
    batch = int(kwargs.get("batch_size") or data_cfg.test_batch_size)
    how = amp
    if not (isinstance(amp, Inference) and amp.settled) and ctx.is_main:  # rank 0 decides on the first batch
        how = extract_with_precision(model, items[:batch], data_cfg, amp=amp, backend=backend, num_images=total,
                                     **kwargs)[4]
    if not (isinstance(amp, Inference) and amp.settled):
        asked = ctx.broadcast_object(explicit(how) if ctx.is_main else None)
        if not ctx.is_main:
            how, backend = asked
    mine = shard_of(len(items), batch, ctx.rank, ctx.world_size)
    feats, pids, camids, index, how = extract_with_precision(
        model, [items[i] for i in mine.tolist()], data_cfg, amp=how, backend=backend, num_images=total,
        progress=progress if ctx.is_main else None, **kwargs)
    parts = ctx.gather_object((feats.numpy(), pids, camids, mine[index]))
    if not ctx.is_main:
        return None, None, None, None, how
    index = np.concatenate([p[3] for p in parts]).astype(np.int64)
    order = np.argsort(index, kind="stable")
    cat = [np.concatenate([p[k] for p in parts]) for k in range(3)]
    return (torch.from_numpy(cat[0][order]).reshape(-1, feats.shape[1]), cat[1][order].astype(np.int64),
            cat[2][order].astype(np.int64), index[order], how)


def folder_items(folder: str | Path) -> List[Tuple[str, int, int]]:
    """Every image file under ``folder`` (recursively, sorted) as ``(path, -1, -1)`` items."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {folder}")
    return [(str(p), -1, -1) for p in paths]
