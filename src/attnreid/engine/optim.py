"""Optimiser and learning-rate schedule of both papers.

MHSA-Net (Sec. VII-B): Adam, base lr 1e-3, linear warm-up over the first 50 epochs from
1e-5, x0.1 at epochs 200 and 300, weight decay 5e-4. HA-CNN (HA Sec. 4): Adam 5e-4,
betas (0.9, 0.999), no warm-up and no decay (``warmup_epochs: 0``, ``milestones: []``).
SGD with momentum is an option. The schedule is stepped once per epoch. The center loss's
centres (BoT) are not in this optimiser: they have their own constant-lr SGD
(losses/center.py).
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List

import torch
from torch import nn

from attnreid.errors import ConfigError
from attnreid.losses.center import center_parameters


def build_optimizer(optim_cfg: Any, modules: Iterable[nn.Module]) -> torch.optim.Optimizer:
    """An optimiser over EVERY trainable parameter of ``modules`` (model and criterion) but the
    center loss's centres.

    The authors' released code built its optimiser from a hand-made list of sub-modules
    and left the attention layers out, so they were never trained; collecting parameters
    from the whole module tree avoids that class of bug. The centres are the one exception:
    BoT trains them with their own SGD (:func:`attnreid.losses.center.center_optimizer`),
    outside this optimiser's weight decay and lr schedule.
    """
    modules = list(modules)
    params: List[nn.Parameter] = []
    seen = {id(c) for module in modules for c in center_parameters(module)}
    for module in modules:
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    if not params:
        raise ConfigError("the model has no trainable parameters to optimise")
    if optim_cfg.name == "adam":
        if len(optim_cfg.betas) != 2:
            raise ConfigError(f"config key 'optim.betas' needs 2 values, got {list(optim_cfg.betas)}")
        return torch.optim.Adam(params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas),
                                weight_decay=optim_cfg.weight_decay)
    if optim_cfg.name == "sgd":
        return torch.optim.SGD(params, lr=optim_cfg.lr, momentum=optim_cfg.momentum,
                               weight_decay=optim_cfg.weight_decay, nesterov=False)
    raise ConfigError(f"config key 'optim.name' is {optim_cfg.name!r}; expected adam or sgd")


def warmup_step_lr(epoch: int, base_lr: float, warmup_epochs: int, warmup_start_lr: float,
                   milestones: List[int], gamma: float) -> float:
    """Learning rate of epoch ``epoch`` (0-based): linear warm-up, then step decay.

    During warm-up ``lr = start + (base - start) * epoch / warmup_epochs``, so epoch 0 runs
    at ``warmup_start_lr`` and epoch ``warmup_epochs`` reaches ``base_lr``. Afterwards
    ``lr = base_lr * gamma ** (number of milestones <= epoch)``: with milestones [200, 300]
    epochs 200-299 run at base/10 and 300+ at base/100, as MHSA-Net Sec. VII-B says.
    """
    if epoch < warmup_epochs:
        return warmup_start_lr + (base_lr - warmup_start_lr) * epoch / warmup_epochs
    return base_lr * gamma ** sum(1 for m in milestones if epoch >= m)


class WarmupStepScheduler:
    """Sets the optimiser's lr for each epoch from :func:`warmup_step_lr`.

    Its state is just the current epoch, so a resumed run sets exactly the lr the
    uninterrupted run would have.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, optim_cfg: Any):
        self.optimizer = optimizer
        self.base_lr = float(optim_cfg.lr)
        self.warmup_epochs = int(optim_cfg.warmup_epochs)
        self.warmup_start_lr = float(optim_cfg.warmup_start_lr)
        self.milestones = sorted(int(m) for m in optim_cfg.milestones)
        self.gamma = float(optim_cfg.gamma)
        self.epoch = 0

    def lr_at(self, epoch: int) -> float:
        return warmup_step_lr(epoch, self.base_lr, self.warmup_epochs, self.warmup_start_lr,
                              self.milestones, self.gamma)

    def set_epoch(self, epoch: int) -> float:
        """Apply the lr of ``epoch`` to every parameter group and return it."""
        self.epoch = epoch
        lr = self.lr_at(epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "base_lr": self.base_lr, "warmup_epochs": self.warmup_epochs,
                "warmup_start_lr": self.warmup_start_lr, "milestones": list(self.milestones),
                "gamma": self.gamma}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
