"""What every result file in benchmarks/results/ records about the machine it came from.

CPUs differ between machines of one kind (AMX or not changes bf16 speed by 25x), so a
number without its machine cannot be compared with another. ``machine_record()`` gives
the CPU model and its bf16/AVX flags, torch's kernel capability, the thread count, the
load average at the time of the call, and the kernel-path environment variables.
"""

from __future__ import annotations

import os
import platform
import subprocess

import torch

from attnreid.precision import cpu_bf16_reason, cpu_flags, cpu_model, resolve_precision

KERNEL_ENV = ("ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS", "OMP_NUM_THREADS")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_record() -> dict:
    flags = cpu_flags()
    rec = {
        "cpu_model": cpu_model(),
        "cpu_flags": {f: f in flags for f in ("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2")},
        "cpu_bf16_native": cpu_bf16_reason(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "amp_auto_cpu": resolve_precision("auto", "cpu").describe(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
        "kernel_env": {k: os.environ[k] for k in KERNEL_ENV if k in os.environ},
    }
    if torch.cuda.is_available():
        rec["cuda_device"] = torch.cuda.get_device_name(0)
    return rec
