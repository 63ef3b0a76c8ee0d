"""Optimiser and learning-rate schedule of both papers.

MHSA-Net (Sec. VII-B): Adam, base lr 1e-3, linear warm-up over the first 50 epochs from
1e-5, x0.1 at epochs 200 and 300, weight decay 5e-4. HA-CNN (HA Sec. 4): Adam 5e-4,
betas (0.9, 0.999), no warm-up and no decay (``warmup_epochs: 0``, ``milestones: []``).
SGD with momentum is an option. The schedule is stepped once per epoch. The center loss's
centres (BoT) are not in this optimiser: they have their own SGD (:func:`center_optimizer`,
:func:`step_centers`).

The training step sees both as optimiser slots (:class:`OptimizerSlot`), the list
:func:`build_optimizers` returns, and treats every slot alike (:func:`attnreid.engine.trainer.train_step`)::

    optimizers = build_optimizers(optim_cfg, loss_cfg, model, criterion)  # [main, centres?]
    # each step:
    for slot in optimizers: slot.zero_grad()
    total, terms = criterion(model(images), pids); total.backward()
    (clip the gradients of the slots with ``clip``)
    for slot in optimizers: slot.step(scaler)   # the centres' slot: step_centers

A slot's name is its checkpoint key (``optimizer``, ``center_optimizer``). The centres' SGD
has a constant lr, no momentum and no weight decay (BoT's ``optimizer_center``): the main
optimiser's warm-up and decay never touch it, and ``optim.grad_clip`` clips the main
slot only. Its step (:func:`step_centers`) first undoes the loss weight on the centres'
gradients. With fp16 loss scaling every slot steps through the same ``GradScaler`` (it
unscales the gradients and skips the step on an inf) and ``scaler.update()`` comes after the
last slot. Under DDP the criterion is not wrapped, so :func:`step_centers` averages the
centres' gradients over the ranks itself (the centre loss is a mean over each rank's equal
share of the batch, so that average is the one-process gradient of the whole batch), and the
ranks must start from the same centres (:func:`attnreid.distributed.broadcast_parameters`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
from torch import nn

from attnreid.distributed import average_gradients
from attnreid.errors import ConfigError
from attnreid.losses.center import center_parameters


def build_optimizer(optim_cfg: Any, modules: Iterable[nn.Module]) -> torch.optim.Optimizer:
    """An optimiser over EVERY trainable parameter of ``modules`` (model and criterion) but the
    center loss's centres.

    The authors' released code built its optimiser from a hand-made list of sub-modules
    and left the attention layers out, so they were never trained; collecting parameters
    from the whole module tree avoids that class of bug. The centres are the one exception:
    BoT trains them with their own SGD (:func:`center_optimizer`),
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


@dataclass
class OptimizerSlot:
    """One optimiser of the training step: its checkpoint key, whether ``optim.grad_clip`` clips
    its parameters, and how it steps (default: its own ``step``, through the loss scaler)."""

    name: str
    optimizer: torch.optim.Optimizer
    clip: bool = False
    step_fn: Optional[Callable[[Any], None]] = None  # (scaler) -> None, instead of the plain step

    def params(self) -> List[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self, scaler: Any = None) -> None:
        if self.step_fn is not None:
            self.step_fn(scaler)
        elif scaler is not None:
            scaler.step(self.optimizer)
        else:
            self.optimizer.step()

    def state_dict(self) -> Dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)


def build_optimizers(optim_cfg: Any, loss_cfg: Any, model: nn.Module, criterion: nn.Module) -> List[OptimizerSlot]:
    """The training step's optimisers: the main one over model and criterion (first: the lr
    schedule sets it, the gradient clip clips it) and, with center loss, the centres' SGD."""
    slots = [OptimizerSlot("optimizer", build_optimizer(optim_cfg, [model, criterion]), clip=True)]
    centres = center_optimizer(criterion, loss_cfg.center_lr)
    if centres is not None:
        slots.append(OptimizerSlot("center_optimizer", centres,
                                   step_fn=partial(step_centers, criterion, centres, loss_cfg.center_weight)))
    return slots


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
