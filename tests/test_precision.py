"""resolve_precision: what `amp: auto | off | bf16 | fp16` means on each device, read at run time."""

from __future__ import annotations

import pytest
import torch

import attnreid.precision as precision
from attnreid.errors import ConfigError
from attnreid.precision import resolve_precision


@pytest.fixture
def flags(monkeypatch):
    """Pretend the CPU has the given feature flags (and no ISA cap in the environment)."""
    for var in ("DNNL_MAX_CPU_ISA", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY"):
        monkeypatch.delenv(var, raising=False)

    def set_flags(*names):
        monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(names))

    return set_flags


@pytest.mark.parametrize("cpu_flags, dtype, reason", [
    (("avx2", "amx_bf16", "avx512_bf16"), torch.bfloat16, "CPU has AMX"),
    (("avx2", "avx512_bf16"), torch.bfloat16, "CPU has AVX512-BF16"),
    (("avx2", "avx512f"), None, "CPU has neither AMX nor AVX512-BF16"),
    ((), None, "CPU has neither AMX nor AVX512-BF16"),
])
def test_auto_on_cpu_follows_the_flags(flags, cpu_flags, dtype, reason):
    flags(*cpu_flags)
    p = resolve_precision("auto", "cpu")
    assert p.dtype is dtype and p.reason == reason
    assert p.describe() == (f"bf16 autocast ({reason})" if dtype else f"float32 ({reason})")


def test_isa_cap_in_the_environment_means_no_bf16(flags, monkeypatch):
    flags("avx2", "amx_bf16", "avx512_bf16")
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX2")
    p = resolve_precision("auto", "cpu")
    assert p.dtype is None and "DNNL_MAX_CPU_ISA=AVX2" in p.reason
    monkeypatch.setenv("DNNL_MAX_CPU_ISA", "AVX512_CORE_AMX")  # a cap at or above bf16 changes nothing
    assert resolve_precision("auto", "cpu").dtype is torch.bfloat16
    monkeypatch.delenv("DNNL_MAX_CPU_ISA")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert resolve_precision("auto", "cpu").dtype is None


def test_explicit_choices_on_cpu(flags):
    flags()
    assert resolve_precision("off", "cpu").dtype is None
    assert resolve_precision("bf16", "cpu").dtype is torch.bfloat16  # asked for: honoured even if emulated
    fp16 = resolve_precision("fp16", "cpu")
    assert fp16.dtype is None and "needs CUDA" in fp16.reason


def test_autocast_context_matches_the_dtype(flags):
    flags("avx512_bf16")
    x = torch.randn(4, 8)
    w = torch.randn(8, 3)
    with resolve_precision("auto", "cpu").autocast():
        assert (x @ w).dtype == torch.bfloat16
    with resolve_precision("off", "cpu").autocast():
        assert (x @ w).dtype == torch.float32


def test_bad_value_names_the_key():
    with pytest.raises(ConfigError, match="'eval.amp' is 'fp8'"):
        resolve_precision("fp8", "cpu", key="eval.amp")
