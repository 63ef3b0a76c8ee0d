"""Model size and cost: parameters (with or without classifiers) and multiply-accumulates.

Convention: every model keeps its identity classifiers in a ``classifiers``
``nn.ModuleDict`` attribute (one ``nn.Linear`` per CE head), because their size depends
on the training set, not on the network; ``count_params(..., exclude_classifiers=True)``
leaves out every parameter whose name starts with ``classifiers.``.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

CLASSIFIER_PREFIX = "classifiers."


def count_params(model: nn.Module, exclude_classifiers: bool = False) -> int:
    """Number of parameters; with ``exclude_classifiers`` those under ``model.classifiers`` are left out."""
    return sum(
        p.numel()
        for name, p in model.named_parameters()
        if not (exclude_classifiers and name.startswith(CLASSIFIER_PREFIX))
    )


def count_macs(model: nn.Module, input_size: Tuple[int, int] = (384, 128)) -> int:
    """Multiply-accumulates of one eval-mode forward pass on a 1 x 3 x H x W image.

    Measured with :class:`torch.utils.flop_counter.FlopCounterMode` (FLOPs / 2), which
    counts convolutions and matrix products (linear layers, attention pooling), the
    usual definition; normalisation, activations and pooling are not counted. The test
    forward of MHSA-Net skips the training-only RLM and classifiers.
    """
    h, w = input_size
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(torch.zeros(1, 3, h, w, device=device))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
