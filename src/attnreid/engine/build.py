"""Builders shared by training, evaluation and extraction: device, eval set, model from a checkpoint."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional, Tuple

import torch
from torch import nn

from attnreid.config import Config, from_dict
from attnreid.engine.checkpoint import load_checkpoint
from attnreid.errors import CheckpointError, ConfigError


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA on a machine without it is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"config key 'train.device' is {name!r} but CUDA is not available on this machine")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"config key 'train.device' is {name!r}; expected auto, cpu, cuda or cuda:N")


def eval_data_config(cfg: Config) -> Any:
    """The data config of the evaluation set: ``eval.dataset``/``eval.root`` when set."""
    data_cfg = cfg.data
    changes = {}
    if cfg.eval.dataset:
        changes["dataset"] = cfg.eval.dataset
    if cfg.eval.root:
        changes["root"] = cfg.eval.root
    return dataclasses.replace(data_cfg, **changes) if changes else data_cfg


def build_eval_dataset(cfg: Config):
    """The dataset whose query/gallery the run is evaluated on."""
    from attnreid.data.datasets import build_dataset_from_config

    return build_dataset_from_config(eval_data_config(cfg))


def load_weights(model: nn.Module, state_dict: dict, source: str) -> None:
    """Load weights; another architecture or class count is one CheckpointError line."""
    from attnreid.models import load_state_dict_checked

    load_state_dict_checked(model, state_dict, source)


def without_initial_weights(model_cfg: Any) -> Any:
    """``model_cfg`` with the backbone's initial weights switched off (``pretrained: false``,
    ``weights: null``): a checkpoint's own weights replace them, so rebuilding a trained model
    never downloads a file, opens a weights path or imports a package of weights."""
    backbone = dataclasses.replace(model_cfg.backbone, pretrained=False, weights=None)
    return dataclasses.replace(model_cfg, backbone=backbone)


def _check_fits(model_cfg: Any, num_classes: int, weights: dict, source: str) -> None:
    """Refuse, before anything is allocated, a checkpoint whose config builds another network
    than its weights (e.g. a ``num_classes`` of 10^9 next to a 751-row classifier): the model is
    built on torch's ``meta`` device (shapes, no storage) and its tensor shapes compared."""
    from attnreid.models import build_model

    with torch.device("meta"):
        shell = build_model(model_cfg, num_classes)
    own = shell.state_dict()
    given = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in weights.items()}
    if set(own) != set(given) or any(tuple(own[k].shape) != tuple(given[k].shape) for k in own):
        load_weights(shell, weights, source)  # raises the one-line reason; loads nothing


def load_model(checkpoint: str | Path, cfg: Optional[Config] = None,
               device: str | torch.device = "cpu") -> Tuple[nn.Module, Config]:
    """Rebuild the checkpoint's model in eval mode.

    With ``cfg`` given, its model section decides the architecture and the test feature
    (so one MHSA-Net checkpoint can be evaluated as MHSA-Net or MHSA-Net-star); a
    checkpoint of another model name is refused in one line. Without ``cfg``, the
    config saved in the checkpoint is used (read without resolving interpolations, and
    within the config's bounds: attnreid.config.from_dict). The backbone is built without
    its initial weights (:func:`without_initial_weights`): loading a trained checkpoint
    needs neither the network nor the ImageNet weights file it was trained from.
    """
    from attnreid.models import build_model

    path = Path(checkpoint)
    state = load_checkpoint(path)
    saved = state.get("config")
    if cfg is None:
        if not isinstance(saved, dict):
            raise CheckpointError(f"checkpoint {path} holds no config; pass the run's config file")
        try:
            cfg = from_dict(saved, source=f"checkpoint {path}")
        except ConfigError as exc:  # name the checkpoint in every line, also a value out of bounds
            raise CheckpointError(str(exc) if str(path) in str(exc) else f"checkpoint {path}: {exc}") from None
    elif isinstance(saved, dict):
        saved_name = saved["model"].get("name") if isinstance(saved.get("model"), dict) else None
        if saved_name and saved_name != cfg.model.name:
            raise CheckpointError(
                f"checkpoint {path} holds a '{saved_name}' model but the config asks for '{cfg.model.name}'")
    num_classes = state.get("num_classes")
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise CheckpointError(f"checkpoint {path} does not record 'num_classes' as a whole number >= 1 "
                              f"(it holds {num_classes!r})")
    model_cfg = without_initial_weights(cfg.model)
    _check_fits(model_cfg, num_classes, state["model"], str(path))
    model = build_model(model_cfg, num_classes)
    load_weights(model, state["model"], str(path))
    model.to(device).eval()
    return model, cfg
