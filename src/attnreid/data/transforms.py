"""Image transforms on tensors: the few that MHSA-Net and HA-CNN use.

Pillow only decodes; everything else works on a 3 x H x W float tensor, so the same code
runs in DataLoader workers and on batches. Randomness comes from torch's global generator,
which the DataLoader seeds per worker (and :func:`attnreid.data.loader.build_train_loader`
seeds from the run's seed), so augmentation is reproducible.

- MHSA-Net (Sec. VII-B): resize to 384 x 128, random horizontal flip, ImageNet normalisation.
- HA-CNN (HA Sec. 4): resize to 160 x 64 and normalise; no augmentation.
- Random erasing (Zhong et al., AAAI 2020) is available as an option; neither paper uses it.
"""

from __future__ import annotations

import math
from typing import Callable, List, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

Transform = Callable[[torch.Tensor], torch.Tensor]


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB image -> float tensor 3 x H x W in [0, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize of a C x H x W (or B x C x H x W) tensor; anti-aliased when shrinking."""
    if tuple(x.shape[-2:]) == (height, width):
        return x
    batch = x if x.dim() == 4 else x[None]
    out = F.interpolate(batch, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return out if x.dim() == 4 else out[0]


def hflip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.as_tensor(mean, dtype=x.dtype).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype).view(-1, 1, 1)
    return (x - m) / s


class Resize:
    def __init__(self, height: int, width: int):
        self.height, self.width = height, width

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return resize(x, self.height, self.width)


class Normalize:
    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = list(mean), list(std)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x, self.mean, self.std)


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return hflip(x) if torch.rand(()) < self.p else x


class RandomErasing:
    """Random erasing (Zhong et al.): with probability ``p`` replace one rectangle.

    The rectangle covers a share of the area in ``[sl, sh]`` with aspect ratio in
    ``[r1, 1/r1]`` (log-uniform), and is filled with ``value``: applied after
    normalisation, the default 0 is the mean pixel. Up to 100 tries, as the reference.
    """

    def __init__(self, p: float = 0.5, sl: float = 0.02, sh: float = 0.4, r1: float = 0.3, value: float = 0.0):
        self.p, self.sl, self.sh, self.r1, self.value = p, sl, sh, r1, value

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) >= self.p:
            return x
        _, h, w = x.shape
        for _ in range(100):
            area = h * w * float(torch.empty(()).uniform_(self.sl, self.sh))
            ratio = math.exp(float(torch.empty(()).uniform_(math.log(self.r1), -math.log(self.r1))))
            eh, ew = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
            if 0 < eh < h and 0 < ew < w:
                y0 = int(torch.randint(0, h - eh + 1, ()))
                x0 = int(torch.randint(0, w - ew + 1, ()))
                x = x.clone()
                x[:, y0:y0 + eh, x0:x0 + ew] = self.value
                return x
        return x


class Compose:
    """``PIL image -> tensor`` then tensor transforms in order."""

    def __init__(self, steps: List[Transform]):
        self.steps = steps

    def __call__(self, img: Image.Image) -> torch.Tensor:
        x = to_tensor(img)
        for step in self.steps:
            x = step(x)
        return x


def build_transforms(
    height: int,
    width: int,
    mean: Sequence[float],
    std: Sequence[float],
    train: bool,
    flip: bool = True,
    random_erasing: float = 0.0,
) -> Compose:
    """``callable(PIL.Image) -> FloatTensor 3 x height x width``, normalised.

    Training adds a horizontal flip (p = 0.5) when ``flip`` and random erasing with
    probability ``random_erasing``; testing only resizes and normalises.
    """
    steps: List[Transform] = [Resize(height, width)]
    if train and flip:
        steps.append(RandomHorizontalFlip(0.5))
    steps.append(Normalize(mean, std))
    if train and random_erasing > 0:
        steps.append(RandomErasing(p=random_erasing))
    return Compose(steps)
