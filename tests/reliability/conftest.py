"""Shared pieces of the reliability tests (docs/reliability.md lists what each file checks).

A tiny model at a tiny size (ResNet-18 at 64x32, 4 classes), a config that reads the
session's synthetic set, float32 training (``train.amp: off``) and float32 torch inference
(``eval.amp: off``, ``eval.backend: torch``), so that no precision or backend line joins
the one-line errors under test and no bf16 kernel fault (issue 25) decides an outcome.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from rel_helpers import save_checkpoint_of, write_config


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
