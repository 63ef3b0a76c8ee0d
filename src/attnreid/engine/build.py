"""Builders shared by training, evaluation and extraction: device, eval set, model from a checkpoint."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from attnreid.config import Config, from_dict, load_config, to_dict
from attnreid.engine.checkpoint import load_checkpoint
from attnreid.engine.model_source import CONFIG_SUFFIXES
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


# Checkpoint entries that are training state, not metadata (load_model(with_meta=True) leaves them out).
_TRAINING_STATE = ("model", "optimizer", "scheduler", "rng", "center_optimizer")


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
               device: str | torch.device = "cpu", with_meta: bool = False):
    """Rebuild the checkpoint's model in eval mode; returns ``(model, cfg)``, with ``with_meta``
    ``(model, cfg, meta)``: the checkpoint's other entries (``epoch``, ``step``,
    ``num_classes``, ``metrics``, ``config``, ...; not the weights or optimiser state), so
    that a caller reads the file once.

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
    if with_meta:
        return model, cfg, {k: v for k, v in state.items() if k not in _TRAINING_STATE}
    return model, cfg


def load_for_inference(source: Any, checkpoint: Optional[str | Path] = None,
                       device: str | torch.device = "cpu") -> Tuple[nn.Module, Config, Optional[str | Path]]:
    """The model (eval mode), config and checkpoint that ``source`` names, for serving features.

    ``source`` is a checkpoint file (its saved config is used), a run folder (its config.yaml and
    checkpoints/last.pth), a ``.yaml`` config file or a :class:`~attnreid.config.Config`; with a
    config, ``checkpoint`` gives the weights, and without one the model has random weights (for
    speed measurements only).
    """
    if isinstance(source, Config):
        cfg: Optional[Config] = source
    elif Path(source).is_dir():
        from attnreid.engine.model_source import resolve_model

        found = resolve_model(source, checkpoint=checkpoint)
        cfg, checkpoint = found.cfg, found.checkpoint
    elif Path(source).suffix.lower() in CONFIG_SUFFIXES:
        cfg = load_config(source)
    else:
        if checkpoint is not None:
            raise ConfigError(f"{source} is not a .yaml config; pass a config with checkpoint=, or the checkpoint alone")
        cfg, checkpoint = None, source
    if checkpoint is not None:
        model, cfg = load_model(checkpoint, cfg=cfg, device=device)
        return model, cfg, checkpoint
    from attnreid.models import build_model

    model = build_model(cfg.model, 2)  # random weights: the class count only sizes unused classifiers
    return model.to(device).eval(), cfg, None


def config_fingerprint(cfg: Config) -> str:
    """A short hash of everything in the config that changes the test feature.

    That is the model section (architecture, test-feature variant, normalisation) and the
    test-time input (size, mean, std). Initialisation-only keys (``backbone.pretrained``,
    ``backbone.weights``) are left out: the checkpoint's weights replace them.
    """
    model = to_dict(cfg)["model"]
    model["backbone"] = {k: v for k, v in model["backbone"].items() if k not in ("pretrained", "weights")}
    data = cfg.data
    payload = {"model": model, "input": [data.height, data.width, list(data.mean), list(data.std)]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
