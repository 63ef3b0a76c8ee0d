"""Shared pieces of the reliability tests (docs/reliability.md lists what each file checks).

A tiny model at a tiny size (ResNet-18 at 64x32, 4 classes), a config that reads the
session's synthetic set, and float32 torch inference (``eval.amp: off``, ``eval.backend:
torch``) so that no precision or backend line joins the one-line errors under test.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

TINY = {
    "data": {"dataset": "market1501", "height": 64, "width": 32, "batch_size": 8, "num_instances": 2,
             "test_batch_size": 32, "workers": 0},
    "model": {"name": "baseline", "backbone": {"name": "resnet18", "last_stride": 2}},
    "train": {"device": "cpu", "threads": 1, "eval_every": 0, "log_every": 1, "epochs": 1,
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
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, synthetic_root):
    """A config reading the synthetic set and a checkpoint of an untrained tiny model."""
    from attnreid.config import load_config, to_dict

    d = tmp_path_factory.mktemp("rel")
    cfg = write_config(d / "tiny.yaml", synthetic_root)
    ckpt = save_checkpoint_of(to_dict(load_config(cfg)), d / "ckpt.pth")
    gallery = Path(synthetic_root) / "market1501" / "bounding_box_test"
    return {"dir": d, "root": Path(synthetic_root), "cfg": cfg, "ckpt": ckpt, "gallery": gallery}


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Commands set torch's thread count (train.threads); give the rest of the suite its own back."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture
def python():
    return sys.executable
