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


# ---- the bf16 kernel self-check (issue 25) ----------------------------------------------------
#
# oneDNN's AMX kernels of torch 2.13 return inf/NaN for some convolution shapes, now and
# then (docs/training.md, "bf16 kernel faults"). The check below runs one layer on its
# input shape in bf16 autocast, forward and backward, many times on fresh inputs, and
# counts the calls whose output or gradients are not finite; the first call is also
# compared with float32, so a kernel that returns finite garbage is caught when it does
# so every time. The trainer uses it to find the layer behind a faulted step
# (engine/amp_guard.py), `attnreid doctor` on a few representative shapes.

#: Relative error of a bf16 output against float32 above which the kernel counts as wrong
#: (bf16 rounding gives about 0.5 %; a wrong kernel gives order 1).
REL_ERROR_LIMIT = 0.05


@dataclass
class KernelCheck:
    """What :func:`check_bf16_kernel` found for one layer on one input shape."""

    name: str
    shape: tuple
    channels_last: bool
    calls: int = 0
    compared: int = 0  # calls whose output was compared with float32
    nonfinite_forward: int = 0  # calls whose bf16 output held inf/NaN
    wrong_forward: int = 0  # compared calls with a finite output further than REL_ERROR_LIMIT from float32
    nonfinite_backward: int = 0  # calls (finite output) whose input or weight gradient held inf/NaN
    rel_error: float = 0.0  # the worst ||bf16 - fp32|| / ||fp32|| of a finite compared output

    @property
    def faults(self) -> int:
        return self.nonfinite_forward + self.wrong_forward + self.nonfinite_backward

    @property
    def ok(self) -> bool:
        return self.faults == 0

    def describe(self) -> str:
        layout = ", channels_last" if self.channels_last else ""
        shape = "x".join(str(s) for s in self.shape)
        if self.ok:
            return f"{self.name} on {shape}{layout}: ok ({self.calls} calls, relative error {self.rel_error:.1g})"
        return (f"{self.name} on {shape}{layout}: FAULT in {self.faults} of {self.calls} calls "
                f"({self.nonfinite_forward} non-finite outputs, {self.wrong_forward} wrong of {self.compared} "
                f"compared with float32, {self.nonfinite_backward} non-finite gradients)")

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "channels_last": self.channels_last,
                "calls": self.calls, "compared": self.compared, "nonfinite_forward": self.nonfinite_forward,
                "wrong_forward": self.wrong_forward, "nonfinite_backward": self.nonfinite_backward,
                "rel_error": self.rel_error, "ok": self.ok}


def _all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t is not None)


def check_bf16_kernel(module: torch.nn.Module, shape: tuple, calls: int = 3, channels_last: bool = False,
                      backward: bool = True, compare: int = 1, name: str = "", seconds: Optional[float] = None,
                      generator: Optional[torch.Generator] = None, device: torch.device | str = "cpu") -> KernelCheck:
    """Run ``module`` on ``calls`` fresh inputs of ``shape`` (ReLU of a normal draw, as after a
    block) in bf16 autocast, with the backward pass when ``backward``; the first ``compare``
    calls are also run in float32 and compared. ``seconds`` stops earlier. Draws from
    ``generator`` (not the global RNG) and never touches the module's ``.grad`` fields
    (gradients come from ``torch.autograd.grad``)."""
    import time

    device = torch.device(device)
    generator = torch.Generator().manual_seed(0) if generator is None else generator
    result = KernelCheck(name or type(module).__name__, tuple(int(s) for s in shape), channels_last)
    weights = [p for p in module.parameters(recurse=False) if p.requires_grad] if backward else []
    t0 = time.perf_counter()
    for i in range(calls):
        x = torch.relu(torch.randn(shape, generator=generator)).to(device)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(backward)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y = module(x)
        result.calls += 1
        finite = _all_finite([y])
        result.nonfinite_forward += not finite
        if finite and i < compare:
            with torch.no_grad():
                ref = module(x.detach()).float()
                err = float((y.detach().float() - ref).norm() / ref.norm().clamp_min(1e-12))
            result.compared += 1
            result.rel_error = max(result.rel_error, err)
            result.wrong_forward += not err <= REL_ERROR_LIMIT
        if finite and backward:
            g = torch.randn(y.shape, generator=generator).to(device=device, dtype=y.dtype)
            grads = torch.autograd.grad(y, [x, *weights], grad_outputs=g, allow_unused=True)
            result.nonfinite_backward += not _all_finite(grads)
        if seconds is not None and time.perf_counter() - t0 > seconds:
            break
    return result
