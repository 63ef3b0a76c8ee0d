"""Where a trained model comes from: one rule for every command that names one.

A model is named by

- a **run folder** (what ``attnreid train`` writes): its ``config.yaml`` and
  ``checkpoints/last.pth`` (``--checkpoint`` picks another, e.g. ``best.pth``);
- a **checkpoint** (``.pth``): the config saved inside it;
- a **config** (``.yaml``) plus ``--checkpoint``: that config decides the architecture and
  the test feature, e.g. to evaluate an MHSA-Net checkpoint as MHSA-Net-star.

``KEY=VALUE`` overrides go over whichever config that is. :func:`resolve_model` applies the
rule; a source it cannot use is one line naming it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from attnreid.config import Config, load_config
from attnreid.errors import AttnReidError, CheckpointError, ConfigError

CONFIG_SUFFIXES = (".yaml", ".yml")
RUN_CONFIG = "config.yaml"
RUN_CHECKPOINT = Path("checkpoints") / "last.pth"
_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*=")


@dataclass
class ModelSource:
    """A resolved model: its config (overrides applied), weights (None: none needed or given)
    and, for a run folder, the folder."""

    cfg: Config
    checkpoint: Optional[Path]
    run_dir: Optional[Path] = None


def is_override(arg: str) -> bool:
    """``KEY=VALUE`` (a dotted config key), not a path that happens to hold ``=``."""
    return bool(_OVERRIDE.match(str(arg))) and not Path(str(arg)).exists()


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and ((path / RUN_CONFIG).is_file() or (path / "checkpoints").is_dir())


def resolve_model(source: str | Path, overrides: Sequence[str] = (), checkpoint: Optional[str | Path] = None,
                  need_weights: bool = True, option: str = "--checkpoint") -> ModelSource:
    """The config and checkpoint that ``source`` (a run folder, a checkpoint or a config) names.

    ``checkpoint`` is the command's ``--checkpoint``: the weights for a config, another
    checkpoint of a run folder; with a checkpoint as ``source`` it is refused (two weights).
    ``need_weights=False`` (e.g. ``model-info``) accepts a config without weights.
    """
    src = Path(str(source))
    ckpt = Path(str(checkpoint)) if checkpoint is not None else None
    if ckpt is not None and is_run_dir(ckpt):  # --checkpoint RUN: that run's last weights
        ckpt = ckpt / RUN_CHECKPOINT
    if is_override(str(source)):
        raise AttnReidError(f"'{source}' is a KEY=VALUE override, but the model comes first: "
                            "give a run folder, a checkpoint or a config, then the overrides")
    if not src.exists():
        raise AttnReidError(f"{src} not found (expected a run folder, a checkpoint or a .yaml config)")
    if src.is_dir():
        if not is_run_dir(src):
            if is_run_dir(src.parent) and any(src.glob("*.pth")):  # RUN/checkpoints
                raise AttnReidError(f"{src} holds checkpoints: name one ({src / 'last.pth'}) or the run folder "
                                    f"{src.parent}")
            raise AttnReidError(f"{src} is a folder but not a run folder (no {RUN_CONFIG} or checkpoints/)")
        if ckpt is None:
            ckpt = src / RUN_CHECKPOINT
            if not ckpt.is_file() and need_weights:
                raise CheckpointError(f"run folder {src} has no {RUN_CHECKPOINT} (training not finished?); "
                                      f"name a checkpoint with {option}")
        run_config = src / RUN_CONFIG
        if run_config.is_file():
            return ModelSource(load_config(run_config, list(overrides)), _existing(ckpt, need_weights), src)
        if ckpt is None or not ckpt.is_file():
            raise AttnReidError(f"run folder {src} has neither {RUN_CONFIG} nor {RUN_CHECKPOINT}")
        return ModelSource(_checkpoint_config(ckpt, overrides), ckpt, src)
    if src.suffix.lower() in CONFIG_SUFFIXES:
        if ckpt is None and need_weights:
            raise AttnReidError(f"config {src} needs {option} CKPT (the weights), or give the run folder or "
                                "checkpoint instead of the config")
        return ModelSource(load_config(src, list(overrides)), ckpt)
    if ckpt is not None:
        raise AttnReidError(f"{src} is already a checkpoint; {option} {ckpt} goes with a config or a run folder")
    return ModelSource(_checkpoint_config(src, overrides), src)


def _existing(ckpt: Optional[Path], need_weights: bool) -> Optional[Path]:
    return ckpt if need_weights or (ckpt is not None and ckpt.is_file()) else None


def _checkpoint_config(path: Path, overrides: Sequence[str]) -> Config:
    """The config saved in a checkpoint, with the overrides over it."""
    from attnreid.engine.checkpoint import load_checkpoint

    saved = load_checkpoint(path).get("config")
    if not isinstance(saved, dict):
        raise CheckpointError(f"checkpoint {path} holds no config; give its run's config.yaml with "
                              f"--checkpoint {path}")
    try:
        return load_config(None, list(overrides), base=saved, base_source=f"checkpoint {path}")
    except ConfigError as exc:  # name the checkpoint in every line, also a value out of bounds
        raise CheckpointError(str(exc) if str(path) in str(exc) else f"checkpoint {path}: {exc}") from None


def split_models_and_overrides(args: Sequence[str]) -> tuple:
    """Positional arguments -> (the others in order, the ``KEY=VALUE`` overrides)."""
    others = [a for a in args if not is_override(a)]
    return others, [a for a in args if is_override(a)]


__all__ = ["CONFIG_SUFFIXES", "ModelSource", "is_override", "is_run_dir", "resolve_model",
           "split_models_and_overrides"]
