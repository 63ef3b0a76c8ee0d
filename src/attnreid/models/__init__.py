"""Models: ``build_model(model_cfg, num_classes)``, the model registry and a checked state-dict loader.

``model_cfg.name`` picks the network from the registry (:mod:`attnreid.models.registry`):
``baseline`` (Global Feature Branch alone, :mod:`attnreid.models.baseline`), ``mhsanet``
(:mod:`attnreid.models.mhsanet`), ``hacnn`` (:mod:`attnreid.models.hacnn`). Every model has
``.feature_dim``, ``.global_dim``, ``.model_name`` (its registry name) and its identity
classifiers in a ``classifiers`` ModuleDict (see :mod:`attnreid.models.complexity`); its
training-mode output is a :class:`~attnreid.models.output.TrainOutput`.

This package imports no torch until a model is built: the config reads the registry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict

from attnreid.errors import CheckpointError, ConfigError
from attnreid.models.registry import (LossTerm, ModelSpec, TestFeature, find_spec, get_spec, model_names, register,
                                      spec_of)

if TYPE_CHECKING:
    import torch
    from torch import nn


def build_model(model_cfg: Any, num_classes: int) -> "nn.Module":
    """Build the network named by ``model_cfg.name`` with ``num_classes`` identity classes.

    A ``model_cfg.test_feature`` the model does not take is one line naming the key."""
    if num_classes < 1:
        raise ConfigError(f"num_classes is {num_classes}; a model needs at least one training identity")
    spec = get_spec(model_cfg.name)
    spec.test_feature(model_cfg)
    return spec.builder()(model_cfg, num_classes)


def _brief(keys, n: int = 3) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_state_dict_checked(model: "nn.Module", state_dict: Dict[str, "torch.Tensor"], source: str) -> None:
    """Load a full-model ``state_dict`` strictly, or raise one-line :class:`CheckpointError`.

    A ``module.`` prefix (DataParallel/DDP) is removed. A checkpoint whose classifiers
    differ only in the number of classes is reported as such; any other difference in
    keys or shapes means a checkpoint of another model or configuration.
    """
    state_dict = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    own = model.state_dict()
    missing = set(own) - set(state_dict)
    unexpected = set(state_dict) - set(own)
    reshaped = {k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape}
    name = getattr(model, "model_name", type(model).__name__)
    classifier_rows = {k for k in reshaped if k.startswith("classifiers.") and own[k].shape[1:] == state_dict[k].shape[1:]}
    if not missing and not unexpected and reshaped and reshaped == classifier_rows:
        k = sorted(reshaped)[0]
        raise CheckpointError(
            f"checkpoint {source} was trained with {state_dict[k].shape[0]} classes but the {name} model "
            f"has {own[k].shape[0]}"
        )
    if missing or unexpected or reshaped:
        parts = []
        if missing:
            parts.append(f"missing {_brief(missing)}")
        if unexpected:
            parts.append(f"unexpected {_brief(unexpected)}")
        if reshaped:
            parts.append(f"other shapes {_brief(reshaped)}")
        raise CheckpointError(f"checkpoint {source} does not fit this {name} model ({'; '.join(parts)})")
    model.load_state_dict(state_dict, strict=True)


__all__ = ["LossTerm", "ModelSpec", "TestFeature", "build_model", "find_spec", "get_spec", "load_state_dict_checked",
           "model_names", "register", "spec_of"]
