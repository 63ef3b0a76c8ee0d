"""Numeric precision for training and inference: what ``amp: auto`` picks, and why.

``auto`` means bf16 autocast where the hardware runs bf16 matmuls and convolutions
natively, and float32 everywhere else:

- CUDA: bf16 when ``torch.cuda.is_bf16_supported()`` (Ampere and newer);
- CPU: bf16 when the CPU has AMX (``amx_bf16``) or AVX512-BF16 (``avx512_bf16``) and
  oneDNN is allowed to use them. ``DNNL_MAX_CPU_ISA`` capped below AVX512_CORE_BF16
  or ``ATEN_CPU_CAPABILITY`` forced to ``default``/``avx2`` (the knobs that make this
  machine behave like an older CPU) count as "no bf16 kernels": on such a path bf16
  is emulated and slower than float32 (measured about 25x on a CPU without AMX).

The CPU is read at run time (``/proc/cpuinfo`` flags), never assumed. ``off | bf16 |
fp16`` stay available as explicit choices; fp16 autocast is CUDA only (on the CPU it
falls back to float32 with a note). Losses, distances and evaluation compute in
float32 whatever the choice (they disable autocast themselves).
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache
from typing import FrozenSet, Optional

import torch

from attnreid.choices import AMP_CHOICES
from attnreid.errors import ConfigError


# oneDNN ISA names (DNNL_MAX_CPU_ISA / ONEDNN_MAX_CPU_ISA) at or above which bf16 is native.
_DNNL_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
                   "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "ALL")


@lru_cache(maxsize=1)
def cpu_flags() -> FrozenSet[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def _kernel_path_capped() -> Optional[str]:
    """Why bf16 kernels are unavailable by configuration (env), or None."""
    for var in ("DNNL_MAX_CPU_ISA", "ONEDNN_MAX_CPU_ISA"):
        isa = os.environ.get(var, "").strip().upper()
        if isa and isa not in _DNNL_BF16_ISAS:
            return f"{var}={os.environ[var]}"
    cap = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    if cap in ("default", "avx2", "avx", "none"):
        return f"ATEN_CPU_CAPABILITY={os.environ['ATEN_CPU_CAPABILITY']}"
    return None


def cpu_bf16_reason(flags: Optional[FrozenSet[str]] = None) -> Optional[str]:
    """``"AMX"`` / ``"AVX512-BF16"`` when this CPU runs bf16 natively, else None."""
    flags = cpu_flags() if flags is None else flags
    if _kernel_path_capped() is not None:
        return None
    if "amx_bf16" in flags:
        return "AMX"
    if "avx512_bf16" in flags:
        return "AVX512-BF16"
    return None


@dataclass(frozen=True)
class Precision:
    """The resolved choice: ``dtype`` is the autocast dtype (None = float32), ``reason`` says why."""

    requested: str
    dtype: Optional[torch.dtype]
    device_type: str
    reason: str

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def describe(self) -> str:
        """One line for the console and the run's log, e.g. ``bf16 autocast (CPU has AMX)``."""
        what = "float32" if self.dtype is None else f"{self.name} autocast"
        return f"{what} ({self.reason})"

    def autocast(self):
        """A context manager: autocast to ``dtype``, or nothing for float32."""
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)


def resolve_precision(amp: str, device: torch.device | str, key: str = "train.amp") -> Precision:
    """What ``amp`` (auto | off | bf16 | fp16) means on ``device``; ``key`` names the config key in errors."""
    device = torch.device(device)
    if amp not in AMP_CHOICES:
        raise ConfigError(f"config key '{key}' is {amp!r}; expected one of: {', '.join(AMP_CHOICES)}")
    dt = device.type
    if amp == "off":
        return Precision(amp, None, dt, f"{key}=off")
    if dt == "cuda":
        if amp == "fp16":
            return Precision(amp, torch.float16, dt, f"{key}=fp16")
        if amp == "bf16":
            return Precision(amp, torch.bfloat16, dt, f"{key}=bf16")
        if torch.cuda.is_bf16_supported():
            return Precision(amp, torch.bfloat16, dt, f"{torch.cuda.get_device_name(device)} supports bf16")
        return Precision(amp, None, dt, f"{torch.cuda.get_device_name(device)} has no bf16")
    if dt != "cpu":
        return Precision(amp, None, dt, f"no autocast policy for device {dt}")
    if amp == "fp16":
        return Precision(amp, None, dt, f"{key}=fp16 needs CUDA; float32 on the CPU")
    if amp == "bf16":
        return Precision(amp, torch.bfloat16, dt, f"{key}=bf16")
    native = cpu_bf16_reason()
    if native is not None:
        return Precision(amp, torch.bfloat16, dt, f"CPU has {native}")
    capped = _kernel_path_capped()
    if capped is not None:
        return Precision(amp, None, dt, f"bf16 kernels disabled by {capped}")
    return Precision(amp, None, dt, "CPU has neither AMX nor AVX512-BF16")
