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
from attnreid.errors import CheckpointError, ConfigError

CONFIG_SUFFIXES = (".yaml", ".yml")


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


def load_model(checkpoint: str | Path, cfg: Optional[Config] = None,
               device: str | torch.device = "cpu", with_meta: bool = False):
    """Rebuild the checkpoint's model in eval mode; returns ``(model, cfg)``, with ``with_meta``
    ``(model, cfg, meta)``: the checkpoint's other entries (``epoch``, ``step``,
    ``num_classes``, ``metrics``, ``config``, ...; not the weights or optimiser state), so
    that a caller reads the file once.

    With ``cfg`` given, its model section decides the architecture and the test feature
    (so one MHSA-Net checkpoint can be evaluated as MHSA-Net or MHSA-Net-star); a
    checkpoint of another model name is refused in one line. Without ``cfg``, the
    config saved in the checkpoint is used.
    """
    from attnreid.models import build_model

    path = Path(checkpoint)
    state = load_checkpoint(path)
    saved = state.get("config")
    if cfg is None:
        if not isinstance(saved, dict):
            raise CheckpointError(f"checkpoint {path} holds no config; pass the run's config file")
        cfg = from_dict(saved, source=f"checkpoint {path}")
    elif isinstance(saved, dict):
        saved_name = (saved.get("model") or {}).get("name")
        if saved_name and saved_name != cfg.model.name:
            raise CheckpointError(
                f"checkpoint {path} holds a '{saved_name}' model but the config asks for '{cfg.model.name}'")
    num_classes = state.get("num_classes")
    if not isinstance(num_classes, int):
        raise CheckpointError(f"checkpoint {path} does not record 'num_classes'")
    model = build_model(cfg.model, num_classes)
    load_weights(model, state["model"], str(path))
    model.to(device).eval()
    if with_meta:
        return model, cfg, {k: v for k, v in state.items() if k not in _TRAINING_STATE}
    return model, cfg


def load_for_inference(source: Any, checkpoint: Optional[str | Path] = None,
                       device: str | torch.device = "cpu") -> Tuple[nn.Module, Config, Optional[str | Path]]:
    """The model (eval mode), config and checkpoint that ``source`` names, for serving features.

    ``source`` is a checkpoint file (its saved config is used), a ``.yaml`` config file or a
    :class:`~attnreid.config.Config`; with a config, ``checkpoint`` gives the weights, and
    without one the model has random weights (for speed measurements only).
    """
    if isinstance(source, Config):
        cfg: Optional[Config] = source
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
