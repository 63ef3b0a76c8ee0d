"""Loss balance: each term's value and gradient at the shared feature map, for one batch.

Adam evens out the size of the total loss, not the mix of its terms: a term whose
gradient at the backbone output is orders of magnitude above the others decides alone
what the backbone learns (docs/spec.md §1, "Total"). :func:`loss_balance` measures that mix;
``attnreid model-info CONFIG --losses`` prints it and ``tests/test_losses.py`` guards it
(:data:`MAX_GRAD_RATIO`) for every shipped MHSA-Net config.
"""

from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn

from attnreid.errors import AttnReidError

# No term's weighted gradient norm at the feature map may exceed this multiple of the
# largest CE term's: the guard of tests/test_losses.py::test_loss_balance_*.
MAX_GRAD_RATIO = 1000.0


def feature_module(model: nn.Module) -> nn.Module:
    """The module whose output every branch reads: ``backbone`` (ResNet models) or ``stem`` (HA-CNN)."""
    for name in ("backbone", "stem"):
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            return module
    raise AttnReidError(f"model {getattr(model, 'model_name', type(model).__name__)!r} has no backbone or stem "
                        "whose output the loss balance could be measured at")


def loss_balance(model: nn.Module, criterion, images: torch.Tensor, labels: torch.Tensor) -> List[Dict]:
    """One training-mode forward of ``images``; per criterion term, a row (in the criterion's order) with

    ``name``, ``weight``, ``value`` (unweighted), ``grad_norm`` (L2 norm of the gradient
    of ``weight x value`` with respect to the feature map, summed over the batch) and
    ``ratio_to_ce`` (``grad_norm`` over the largest CE term's; None without a CE term).

    A forward hook reads the feature map; the model's forward is unchanged, and no
    parameter's ``.grad`` is touched (gradients are taken with ``torch.autograd.grad``).
    The model's train/eval mode is restored afterwards.
    """
    captured: List[torch.Tensor] = []
    handle = feature_module(model).register_forward_hook(lambda _m, _i, out: captured.append(out))
    was_training = model.training
    model.train()
    try:
        with torch.enable_grad():
            outputs = model(images)
            fmap = captured[0]
            values = criterion.term_values(outputs, labels)
            rows = []
            for name, (weight, value) in values.items():
                if value.requires_grad:
                    (grad,) = torch.autograd.grad(weight * value, fmap, retain_graph=True, allow_unused=True)
                else:
                    grad = None
                norm = 0.0 if grad is None else float(grad.float().norm())
                rows.append({"name": name, "weight": float(weight), "value": float(value.detach()), "grad_norm": norm})
    finally:
        handle.remove()
        model.train(was_training)
    ce_norms = [r["grad_norm"] for r in rows if r["name"].startswith("ce_")]
    top_ce = max(ce_norms) if ce_norms else 0.0
    for r in rows:
        r["ratio_to_ce"] = r["grad_norm"] / top_ce if top_ce > 0 else None
    return rows


def worst_ratio(rows: List[Dict]) -> float:
    """The largest ``ratio_to_ce`` of the rows (0 when no CE term has a gradient)."""
    return max((r["ratio_to_ce"] or 0.0) for r in rows)
