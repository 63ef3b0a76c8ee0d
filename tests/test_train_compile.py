"""train.compile: the policy, the compiled network stepping, and checkpoints that keep the plain names."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from test_engine import tiny_cfg

from attnreid.config import load_config
from attnreid.engine import compiled
from attnreid.engine.checkpoint import load_checkpoint
from attnreid.errors import ConfigError


def test_policy():
    assert compiled.resolve_compile("on", "cpu")[0] and not compiled.resolve_compile("off", "cuda")[0]
    on, why = compiled.resolve_compile("auto", "cpu")
    assert not on and "eager on cpu" in why
    assert compiled.resolve_compile("auto", "cuda")[0]
    assert load_config(None, ["train.compile=off"]).train.compile == "off"  # YAML's boolean off means the word
    assert load_config(None, ["train.compile=on"]).train.compile == "on"
    with pytest.raises(ConfigError, match="'train.compile' is 'max'"):
        load_config(None, ["train.compile=max"])


class FakeCompiled(nn.Module):
    """What torch.compile returns, as far as the trainer sees it: the module under ``_orig_mod``
    (so its own state_dict names carry the ``_orig_mod.`` prefix), called for every step."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self._orig_mod = module
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self._orig_mod(*args, **kwargs)


def test_compiled_steps_and_plain_checkpoint_names(synthetic_root, tmp_path, monkeypatch):
    """Inductor itself takes minutes here (test below); this checks the trainer's side of it."""
    from attnreid.engine.trainer import train

    made = []
    monkeypatch.setattr(torch, "compile", lambda m, **k: made.append(FakeCompiled(m)) or made[-1])
    train(tiny_cfg(synthetic_root, "train.compile=on", "train.epochs=1"), tmp_path / "r", quiet=True)
    assert len(made) == 1 and made[0].calls == 2  # the 2 training steps went through the compiled network
    assert any(k.startswith("_orig_mod.") for k in made[0].state_dict())  # the wrapper's own names...
    keys = list(load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pth")["model"])
    assert keys and not any("_orig_mod" in k for k in keys)  # ...are not what the checkpoint keeps
    train(tiny_cfg(synthetic_root, "train.compile=auto", "train.epochs=1"), tmp_path / "e", quiet=True)
    assert len(made) == 1  # auto on the CPU: eager


@pytest.mark.skipif(os.environ.get("ATTNREID_COMPILE_TESTS") != "1",
                    reason="a cold inductor compile of a tiny ResNet-18's step takes ~50 s on an idle 2-core machine "
                           "and did not finish within 8 min at load ~7 (2026-12-01; it passed when run): "
                           "opt in with ATTNREID_COMPILE_TESTS=1")
def test_inductor_trains_and_checkpoints_plain_names(synthetic_root, tmp_path):
    from attnreid.engine.trainer import train

    result = train(tiny_cfg(synthetic_root, "train.compile=on", "train.epochs=1"), tmp_path / "r", quiet=True)
    assert result["step"] == 2
    ckpt = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pth")
    assert not any("_orig_mod" in k for k in ckpt["model"])
    from attnreid.models import build_model

    cfg = tiny_cfg(synthetic_root)
    build_model(cfg.model, ckpt["num_classes"]).load_state_dict(ckpt["model"])  # strict: the plain model's names
