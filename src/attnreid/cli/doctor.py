"""`attnreid doctor`: what a user should know before a long run, and what a bug report should contain.

Versions, the CPU (model, AMX / AVX512-BF16 / AVX512 / AVX2, threads, kernel-path
variables), the precision ``amp: auto`` would choose and why, a bf16 kernel self-check
on a few representative convolutions (issue 25: oneDNN's AMX kernels are wrong for some
shapes), the optional packages, the inference backend ``eval.backend: auto`` would take,
and the data roots found. ``--json`` prints one JSON object instead.
"""

from __future__ import annotations

import importlib
import os
import platform
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import typer

from attnreid.cli._app import app
from attnreid.cli._util import print_json

# (name, layer, input shape, channels_last): a few seconds in all. The first two are the
# convolution that AMX gets wrong (ResNet-18's layer4.0.conv1 at 64x32, docs/training.md).
SELF_CHECK = [
    ("ResNet-18 layer4.0.conv1 at 64x32", ("conv", 256, 512, 3, 2), (8, 256, 4, 2), False),
    ("ResNet-18 layer4.0.conv1 at 64x32, channels_last", ("conv", 256, 512, 3, 2), (8, 256, 4, 2), True),
    ("ResNet-18 layer4.0.conv1 at 128x64", ("conv", 256, 512, 3, 2), (8, 256, 8, 4), True),
    ("ResNet-18 layer1 conv at 128x64", ("conv", 64, 64, 3, 1), (8, 64, 32, 16), True),
    ("a classifier, 512 -> 751", ("linear", 512, 751), (32, 512), False),
]
SELF_CHECK_CALLS = 3
PACKAGES = ("onnxruntime", "onnx", "faiss", "openvino", "tensorboard")
# A Market-1501 evaluation: what eval.backend=auto decides for a job of this size.
TYPICAL_JOB_IMAGES = 19281


def _layer(spec: tuple):
    import torch

    if spec[0] == "conv":
        _, cin, cout, k, stride = spec
        return torch.nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
    return torch.nn.Linear(spec[1], spec[2])


def self_check(cases=None) -> List[Dict[str, Any]]:
    """The bf16 kernel check (attnreid.precision.check_bf16_kernel) on ``cases`` (default SELF_CHECK)."""
    import torch

    from attnreid.precision import check_bf16_kernel

    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny layers: on a busy machine more threads only wait for each other
    try:
        for name, spec, shape, cl in (SELF_CHECK if cases is None else cases):
            torch.manual_seed(0)
            layer = spec if isinstance(spec, torch.nn.Module) else _layer(spec)
            c = check_bf16_kernel(layer, shape, calls=SELF_CHECK_CALLS, channels_last=cl, name=name)
            rows.append(c.to_dict())
    finally:
        torch.set_num_threads(threads)
    return rows


def _version(name: str) -> Optional[str]:
    try:
        module = importlib.import_module(name)
    except Exception:  # not installed, or broken: either way not usable
        return None
    return str(getattr(module, "__version__", "installed"))


def _data_roots(roots: List[Path]) -> List[Dict[str, Any]]:
    """Each candidate root (``data/``, ``$ATTNREID_DATA``, ``--root``) and the data sets found in it."""
    from attnreid.data.datasets import DATASETS, build_dataset
    from attnreid.errors import AttnReidError

    candidates = [("data/", Path("data"))]
    env = os.environ.get("ATTNREID_DATA")
    candidates.append(("$ATTNREID_DATA", Path(env) if env else None))
    candidates += [("--root", r) for r in roots]
    out = []
    for origin, root in candidates:
        row: Dict[str, Any] = {"origin": origin, "root": str(root) if root else None, "exists": bool(root)
                               and root.exists(), "datasets": {}}
        if row["exists"]:
            for name in DATASETS:
                if name == "synthetic":  # the synthetic set is read as market1501
                    continue
                try:
                    ds = build_dataset(name, str(root))
                except AttnReidError:
                    continue
                row["datasets"][name] = {"train_images": len(ds.train), "train_ids": ds.num_train_pids,
                                         "query": len(ds.query), "gallery": len(ds.gallery), "at": str(ds.root)}
        out.append(row)
    return out


def report(roots: List[Path], check: bool = True) -> Dict[str, Any]:
    """Everything `attnreid doctor` prints, as one dict."""
    import numpy
    import torch

    from attnreid import __version__
    from attnreid.inference.backend import BACKENDS, backend_module, resolve_inference
    from attnreid.precision import cpu_flags, cpu_model, resolve_precision

    flags = cpu_flags()
    precision = resolve_precision("auto", "cpu")
    out: Dict[str, Any] = {
        "attnreid": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
        "python": platform.python_version(),
        "cpu": {"model": cpu_model(), "flags": {f: f in flags for f in ("amx_bf16", "avx512_bf16", "avx512f", "avx2")},
                "torch_capability": torch.backends.cpu.get_cpu_capability(), "cpus": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "kernel_env": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA",
                                                          "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
                                                          "OMP_NUM_THREADS") if k in os.environ}},
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "precision_auto": {"cpu": precision.name, "reason": precision.reason},
    }
    if torch.cuda.is_available():
        gpu = resolve_precision("auto", "cuda")
        out["precision_auto"]["cuda"] = {"precision": gpu.name, "reason": gpu.reason}
    if precision.dtype is torch.bfloat16 and check:
        t0 = time.perf_counter()
        rows = self_check()
        out["bf16_self_check"] = {"ran": True, "seconds": round(time.perf_counter() - t0, 2), "calls": SELF_CHECK_CALLS,
                                  "threads": 1,
                                  "ok": all(r["ok"] for r in rows), "layers": rows}
    else:
        why = "--no-self-check" if not check else f"amp: auto trains in float32 here ({precision.reason})"
        out["bf16_self_check"] = {"ran": False, "why": why}
    out["packages"] = {name: _version(name) for name in PACKAGES}
    min_images = min(backend_module(n).MIN_IMAGES for n in BACKENDS)
    small = resolve_inference("auto", "auto", "cpu", num_images=min_images - 1)
    large = resolve_inference("auto", "auto", "cpu", num_images=TYPICAL_JOB_IMAGES)
    out["inference_auto"] = {
        f"{TYPICAL_JOB_IMAGES} images": {"backend": "the fastest installed path whose first batch matches PyTorch fp32"
                                         if large.backend == "auto" else large.backend, "reason": large.reason},
        f"{min_images - 1} images": {"backend": small.backend, "reason": small.reason},
        "precision": precision.name if precision.dtype is None else
        f"{precision.name} if its first batch matches float32 (mean cosine >= 0.999), else float32",
    }
    out["data_roots"] = _data_roots(roots)
    return out


def _yes(v: bool) -> str:
    return "yes" if v else "no"


def _print(r: Dict[str, Any]) -> None:
    cpu = r["cpu"]
    f = cpu["flags"]
    print(f"attnreid {r['attnreid']}, torch {r['torch']}, numpy {r['numpy']}, python {r['python']}")
    print(f"CPU: {cpu['model']}; AMX-BF16 {_yes(f['amx_bf16'])}, AVX512-BF16 {_yes(f['avx512_bf16'])}, "
          f"AVX512 {_yes(f['avx512f'])}, AVX2 {_yes(f['avx2'])}; torch kernels {cpu['torch_capability']}; "
          f"{cpu['cpus']} CPUs, torch uses {cpu['torch_threads']} threads")
    env = " ".join(f"{k}={v}" for k, v in cpu["kernel_env"].items()) or "none"
    print(f"kernel-path variables: {env}")
    if r["cuda"]:
        print(f"GPU: {r['cuda']}; amp: auto there: {r['precision_auto']['cuda']['precision']} "
              f"({r['precision_auto']['cuda']['reason']})")
    p = r["precision_auto"]
    print(f"amp: auto on the CPU: {p['cpu']} ({p['reason']})")
    sc = r["bf16_self_check"]
    if not sc["ran"]:
        print(f"bf16 kernel self-check: not run ({sc['why']})")
    else:
        verdict = "ok" if sc["ok"] else "FAULT: some bf16 kernels are wrong on this machine"
        print(f"bf16 kernel self-check ({len(sc['layers'])} layers x {sc['calls']} calls, {sc['seconds']} s): "
              f"{verdict}")
        for row in sc["layers"]:
            shape = "x".join(map(str, row["shape"]))
            what = "ok" if row["ok"] else (f"FAULT ({row['nonfinite_forward']} non-finite, {row['wrong_forward']} "
                                          f"wrong of {row['compared']} compared, {row['nonfinite_backward']} "
                                          f"non-finite gradients in {row['calls']} calls)")
            print(f"  {row['name']} on {shape}: {what}")
        if not sc["ok"]:
            print("  training checks its model's own layers and runs the faulty ones in float32 "
                  "(docs/training.md#bf16-kernel-faults)")
    print("optional packages: " + ", ".join(f"{k} {v}" if v else f"{k} not installed"
                                            for k, v in r["packages"].items()))
    inf = r["inference_auto"]
    for size, row in inf.items():
        if size != "precision":
            print(f"eval.backend: auto for {size}: {row['backend']} ({row['reason']})")
    print(f"eval.amp: auto: {inf['precision']}")
    for row in r["data_roots"]:
        if row["root"] is None:
            print(f"data root {row['origin']}: not set")
        elif not row["exists"]:
            print(f"data root {row['origin']} {row['root']}: does not exist")
        elif not row["datasets"]:
            print(f"data root {row['origin']} {row['root']}: no data set found")
        else:
            found = ", ".join(f"{n} ({d['train_images']:,} training images)" for n, d in row["datasets"].items())
            print(f"data root {row['origin']} {row['root']}: {found}")


@app.command("doctor")
def doctor_cmd(
    root: Optional[List[Path]] = typer.Option(None, "--root", help="Also look for data sets here (repeatable)."),
    self_check_: bool = typer.Option(True, "--self-check/--no-self-check",
                                     help="Run the bf16 kernel self-check (a few seconds) when amp: auto picks bf16."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object on stdout."),
) -> None:
    """Check this machine before a long run; paste the output into bug reports.

    Versions, the CPU and its bf16 kernels (a self-check), the precision and inference backend
    that auto picks and why, optional packages, and the data roots found."""
    r = report(list(root or []), check=self_check_)
    print_json(r) if as_json else _print(r)
