"""``train.compile``: whether the training steps run a ``torch.compile``d model (inductor).

``on`` compiles, ``off`` keeps eager PyTorch, ``auto`` (the default) compiles on CUDA
devices only. On the CPU it does not pay for training: ``benchmarks/bench_train.py
--compile`` (benchmarks/results/train_cpu.json, an idle 2-core AMD EPYC without AMX)
compiled the training step in 17-46 s and then ran it at 0.85-1.0x of eager in bf16
autocast (0.96-1.15x in float32), so eager bf16 stays the fastest training path there;
``auto`` changes only on such a measurement.

Only the stepped network is compiled: evaluation and checkpoints use the plain model
(the trainer unwraps ``_orig_mod``), so a checkpoint's state_dict has the same names with
and without compilation and loads into either.
"""

from __future__ import annotations

import sys
from typing import Tuple

import torch
from torch import nn

from attnreid.choices import COMPILE_CHOICES
from attnreid.errors import ConfigError


def resolve_compile(mode: str, device: torch.device | str) -> Tuple[bool, str]:
    """``(compile?, why)`` for ``train.compile`` = ``mode`` on ``device``."""
    if mode not in COMPILE_CHOICES:
        raise ConfigError(f"config key 'train.compile' is {mode!r}; expected one of: {', '.join(COMPILE_CHOICES)}")
    device = torch.device(device)
    if mode != "auto":
        return mode == "on", f"train.compile={mode}"
    if device.type == "cuda":
        return True, "train.compile=auto on CUDA"
    return False, f"train.compile=auto: eager on {device.type} (compilation not shown to pay there)"


def compile_for_training(net: nn.Module, mode: str, device: torch.device | str, quiet: bool = False) -> nn.Module:
    """``net`` wrapped by ``torch.compile`` (inductor) when ``train.compile`` says so, else ``net``."""
    on, why = resolve_compile(mode, device)
    if not on:
        return net
    if not quiet:
        print(f"compile: torch.compile (inductor) for the training steps ({why}); the first steps include "
              f"the compilation", file=sys.stderr, flush=True)
    return torch.compile(net)
