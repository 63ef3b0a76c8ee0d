"""Builders shared by the reliability tests (a module of its own: ``conftest`` is not importable by name)."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

TINY = {
    "data": {"dataset": "market1501", "height": 64, "width": 32, "batch_size": 8, "num_instances": 2,
             "test_batch_size": 32, "workers": 0},
    "model": {"name": "baseline", "backbone": {"name": "resnet18", "last_stride": 2}},
    "train": {"device": "cpu", "threads": 1, "amp": "off", "eval_every": 0, "log_every": 1, "epochs": 1,
              "max_steps_per_epoch": 2},
    "optim": {"warmup_epochs": 1, "milestones": [2], "lr": 3e-4},
    "eval": {"amp": "off", "backend": "torch", "bootstrap": 0},
}


def merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_config(path: Path, root: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(merge(merge(TINY, {"data": {"root": str(root)}}), sections)))
    return path


def save_checkpoint_of(cfg_dict: dict, path: Path, num_classes: int = 4) -> Path:
    """A checkpoint of an untrained model whose saved config is ``cfg_dict`` as given (it may
    name initial weights that do not exist here: the model is built without them)."""
    import torch

    from attnreid.config import from_dict
    from attnreid.engine.checkpoint import save_checkpoint
    from attnreid.models import build_model

    cfg = from_dict(cfg_dict)
    model_cfg = cfg.model
    model_cfg.backbone.pretrained, model_cfg.backbone.weights = False, None
    torch.manual_seed(0)
    model = build_model(model_cfg, num_classes)
    save_checkpoint(path, {"model": model.state_dict(), "config": cfg_dict, "num_classes": num_classes,
                           "epoch": 1, "step": 1, "metrics": {}})
    return path


def subprocess_env() -> dict:
    env = dict(os.environ)
    import attnreid

    src = str(Path(attnreid.__file__).resolve().parents[1])  # the attnreid this test process imports
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env
