"""Test features of a list of images (a split, or the files of a folder)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from attnreid.errors import DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def extract_features(model: nn.Module, items: Sequence[Tuple[str, int, int]], data_cfg: Any,
                     batch_size: Optional[int] = None, device: str | torch.device = "cpu",
                     flip: bool = False, channels_last: bool = False,
                     autocast_dtype: Optional[torch.dtype] = None) -> Tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Run the model in eval mode over ``items`` (``(path, pid, camid)``).

    Returns ``(features N x D float32 on the CPU, pids, camids)`` in the order of
    ``items``. ``flip`` averages the features of each image and its mirror image (an
    evaluation option neither paper uses; off by default).
    """
    from attnreid.data.loader import build_test_loader

    if batch_size is not None:
        data_cfg = dataclasses.replace(data_cfg, test_batch_size=batch_size)
    device = torch.device(device)
    loader = build_test_loader(data_cfg, list(items))
    was_training = model.training
    model.eval()
    feats: List[torch.Tensor] = []
    pids: List[np.ndarray] = []
    camids: List[np.ndarray] = []
    use_amp = autocast_dtype is not None and device.type == "cuda"
    try:
        with torch.inference_mode():
            for batch in loader:
                images, pid, camid = batch[0], batch[1], batch[2]
                images = images.to(device, non_blocking=True)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device_type=device.type, dtype=autocast_dtype or torch.bfloat16, enabled=use_amp):
                    f = model(images).float()
                    if flip:
                        f = (f + model(torch.flip(images, dims=[3])).float()) / 2
                feats.append(f.cpu())
                pids.append(np.asarray(pid).reshape(-1))
                camids.append(np.asarray(camid).reshape(-1))
    finally:
        model.train(was_training)
    if not feats:
        return torch.zeros(0, getattr(model, "feature_dim", 0)), np.zeros(0, np.int64), np.zeros(0, np.int64)
    return torch.cat(feats), np.concatenate(pids).astype(np.int64), np.concatenate(camids).astype(np.int64)


def folder_items(folder: str | Path) -> List[Tuple[str, int, int]]:
    """Every image file under ``folder`` (recursively, sorted) as ``(path, -1, -1)`` items."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}")
    paths = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {folder}")
    return [(str(p), -1, -1) for p in paths]
