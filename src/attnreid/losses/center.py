"""Center loss (Wen et al., ECCV 2016) as the strong baseline (BoT, Luo et al. 2019) uses it.

``L_C = (1 / B) sum_i ||f_i - c_{y_i}||^2`` over the batch, with one learnable centre
``c_y`` per training identity; f is the feature *before* the BNNeck (the one the triplet
acts on). BoT adds it to the total with weight ``loss.center_weight`` (5e-4) and trains the
centres with their own SGD (lr ``loss.center_lr`` = 0.5), on the gradient of the unweighted
loss: after ``total.backward()`` the centres' gradients are multiplied by 1 / weight before
that SGD step (:func:`step_centers`). The centres must therefore stay out of the main
optimiser (:func:`center_parameters` lists them).

How a training loop uses it (BoT's ``do_train``; :func:`attnreid.engine.trainer.train_step` is
this loop)::

    optimizer = build_optimizer(optim_cfg, [model, criterion])        # skips the centres
    center_opt = center_optimizer(criterion, loss_cfg.center_lr)      # None without center loss
    # each step:
    optimizer.zero_grad(); center_opt and center_opt.zero_grad()
    total, terms = criterion(model(images), pids); total.backward()
    optimizer.step(); step_centers(criterion, center_opt, loss_cfg.center_weight)

The centres' SGD has a constant lr, no momentum and no weight decay (BoT's
``optimizer_center``): the main optimiser's warm-up and decay never touch it. With fp16 loss
scaling, pass the ``GradScaler`` to :func:`step_centers` (it unscales the centres' gradients
and skips the step on an inf, as for the main optimiser) and call ``scaler.update()`` after
it. Under DDP the criterion is not wrapped, so :func:`step_centers` averages the centres'
gradients over the ranks itself (the centre loss is a mean over each rank's equal share of
the batch, so that average is the one-process gradient of the whole batch), and the ranks
must start from the same centres (:func:`attnreid.distributed.broadcast_parameters`).
"""

from __future__ import annotations

from typing import Any, List, Optional

import torch
from torch import nn

from attnreid.distributed import average_gradients
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


def center_optimizer(criterion: nn.Module, lr: float) -> Optional[torch.optim.Optimizer]:
    """BoT's separate plain SGD over the centres (lr 0.5), or None when there are none."""
    params = center_parameters(criterion)
    return torch.optim.SGD(params, lr=lr) if params else None


def step_centers(criterion: nn.Module, optimizer: Optional[torch.optim.Optimizer], weight: float,
                 scaler: Any = None) -> None:
    """After ``backward``: average the centres' gradients over the ranks (DDP), undo the loss
    weight on them, then step their SGD (through ``scaler`` when the loss was scaled).

    The total loss carries ``weight * L_C``, so the centres' gradient is ``weight * dL_C/dc``;
    BoT divides by the weight so that lr ``center_lr`` acts on ``dL_C/dc`` itself.
    """
    if optimizer is None:
        return
    params = [p for p in center_parameters(criterion) if p.grad is not None]
    average_gradients(params)
    if scaler is not None:
        scaler.unscale_(optimizer)
    for p in params:
        p.grad.mul_(1.0 / weight)
    if scaler is not None:
        scaler.step(optimizer)
    else:
        optimizer.step()
