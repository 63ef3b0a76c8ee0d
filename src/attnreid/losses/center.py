"""Center loss (Wen et al., ECCV 2016) as the strong baseline (BoT, Luo et al. 2019) uses it.

``L_C = (1 / B) sum_i ||f_i - c_{y_i}||^2`` over the batch, with one learnable centre
``c_y`` per training identity; f is the feature *before* the BNNeck (the one the triplet
acts on). BoT adds it to the total with weight ``loss.center_weight`` (5e-4) and trains the
centres with their own SGD (lr ``loss.center_lr`` = 0.5), on the gradient of the unweighted
loss: after ``total.backward()`` the centres' gradients are multiplied by 1 / weight before
that SGD step. The centres must therefore stay out of the main optimiser
(:func:`center_parameters` lists them). Optimising them is the engine's part
(:mod:`attnreid.engine.optim`: ``center_optimizer`` and ``step_centers``).
"""

from __future__ import annotations

from typing import List

import torch
from torch import nn

from attnreid.errors import ConfigError


class CenterLoss(nn.Module):
    """``centers``: num_classes x dim, standard-normal initialised (BoT's ``torch.randn``)."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        if num_classes < 1 or dim < 1:
            raise ConfigError(f"center loss needs at least one class and a feature width >= 1, got {num_classes} x {dim}")
        self.centers = nn.Parameter(torch.randn(num_classes, dim))

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """B x dim features, B labels -> mean over the batch of the squared distance to the own centre."""
        diff = features.float() - self.centers[labels].float()
        return (diff * diff).sum(dim=1).mean()


def center_parameters(criterion: nn.Module) -> List[nn.Parameter]:
    """The centres of every :class:`CenterLoss` inside ``criterion`` (empty without center loss)."""
    return [m.centers for m in criterion.modules() if isinstance(m, CenterLoss)]
