"""How often oneDNN's bf16 convolutions give wrong results on this CPU, per shape (issue 25).

For each convolution of the issue's table (and a few from the CPU recipes), ``--calls``
fresh inputs (ReLU of a normal draw) go through the layer in bf16 autocast, measured two
ways, with :func:`attnreid.precision.check_bf16_kernel`:

- ``nonfinite``: the issue's method, the bf16 forward alone, counting outputs with
  inf/NaN;
- ``wrong``: every call also run in float32 and compared (relative error above
  ``REL_ERROR_LIMIT``, or non-finite), plus non-finite gradients in the backward pass.

It also runs the issue's ten-line reproduction verbatim (``repro_nonfinite_of_300``).
One thread (``--threads``), a fixed seed. Each kernel path runs in its own process:
this interpreter with the environment as it is, ``--isa-cap`` adds a run with oneDNN
capped below AMX (``DNNL_MAX_CPU_ISA=AVX512_CORE_BF16``), ``--python PATH`` adds a run
with another interpreter (another torch; it needs only ``src/`` on its path).

    python benchmarks/bench_bf16_faults.py [--calls 100] [--isa-cap] [--python /tmp/venv214/bin/python]

Writes benchmarks/results/bf16_faults.json (``--out``): one row set per (torch, kernel
environment), each with its machine record; rows of other variants in the file are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SRC = HERE.parent / "src"

# (cin, cout, kernel, stride, input N x C x H x W, channels_last, where it comes from)
SHAPES = [
    (256, 512, 3, 2, (8, 256, 4, 2), False, "issue: ResNet-18 layer4.0.conv1 at 64x32, batch 8 (the tests' size)"),
    (256, 512, 3, 2, (8, 256, 4, 2), True, "issue: the same, channels_last"),
    (256, 512, 3, 2, (32, 256, 4, 2), False, "issue: the same at batch 32"),
    (256, 512, 3, 2, (2, 256, 4, 2), False, "issue: the same at batch 2"),
    (256, 512, 1, 2, (8, 256, 4, 2), False, "ResNet-18 layer4.0.downsample at 64x32, batch 8"),
    (512, 512, 3, 1, (8, 512, 2, 1), False, "ResNet-18 layer4.0.conv2 at 64x32, batch 8"),
    (256, 512, 3, 1, (32, 256, 8, 4), False, "issue: 8x4, stride 1"),
    (256, 512, 3, 2, (32, 256, 8, 4), False, "issue: 8x4, stride 2 (ResNet-18 layer4.0.conv1 at 128x64)"),
    (256, 512, 3, 1, (32, 256, 16, 8), False, "issue: 16x8, stride 1"),
    (256, 512, 3, 2, (32, 256, 16, 8), False, "issue: 16x8, stride 2"),
    (1024, 2048, 1, 1, (32, 1024, 16, 8), False, "issue: ResNet-50 layer4.0.downsample at 256x128, last stride 1"),
]

REPRO = """
import torch
torch.manual_seed(0); torch.set_num_threads(1)
conv = torch.nn.Conv2d(256, 512, 3, 2, 1, bias=False)
bad = 0
for i in range(300):
    x = torch.relu(torch.randn(8, 256, 4, 2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bad += not bool(torch.isfinite(conv(x)).all())
print(bad)
"""


def measure(calls: int, threads: int) -> dict:
    import torch

    from attnreid.precision import REL_ERROR_LIMIT, check_bf16_kernel

    sys.path.insert(0, str(HERE))
    from _machine import machine_record

    torch.set_num_threads(threads)
    repro = subprocess.run([sys.executable, "-c", REPRO], capture_output=True, text=True, check=True)
    rows = []
    for cin, cout, k, s, shape, cl, where in SHAPES:
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(cin, cout, k, s, k // 2, bias=False)
        name = f"Conv2d({cin}, {cout}, {k}, stride {s})"
        gen = torch.Generator().manual_seed(0)
        issue = check_bf16_kernel(conv, shape, calls, channels_last=cl, backward=False, compare=0, name=name,
                                  generator=gen)
        full = check_bf16_kernel(conv, shape, calls, channels_last=cl, backward=True, compare=calls, name=name,
                                 generator=gen)
        rows.append({"layer": name, "input": list(shape), "channels_last": cl, "where": where, "calls": calls,
                     "nonfinite": issue.nonfinite_forward, "wrong": full.nonfinite_forward + full.wrong_forward,
                     "nonfinite_backward": full.nonfinite_backward, "worst_rel_error": full.rel_error})
        print(f"{name:32s} {'x'.join(map(str, shape)):12s} cl={cl!s:5s}: non-finite {issue.nonfinite_forward:3d}, "
              f"wrong {rows[-1]['wrong']:3d}, backward non-finite {full.nonfinite_backward:3d} of {calls}",
              file=sys.stderr, flush=True)
    return {"torch": torch.__version__, "kernel_env": machine_record()["kernel_env"], "threads": threads,
            "rel_error_limit": REL_ERROR_LIMIT, "repro_nonfinite_of_300": int(repro.stdout.strip()),
            "rows": rows, "machine": machine_record()}


def run_variant(python: str, env_extra: dict, args) -> dict:
    env = dict(os.environ, **env_extra)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [python, __file__, "--worker", "--calls", str(args.calls), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        return {"python": python, "env": env_extra, "error": f"exit code {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--isa-cap", action="store_true", help="also run with DNNL_MAX_CPU_ISA=AVX512_CORE_BF16")
    ap.add_argument("--python", action="append", default=[], help="also run with this interpreter (another torch)")
    ap.add_argument("--out", type=Path, default=RESULTS / "bf16_faults.json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(measure(args.calls, args.threads)))
        return
    variants = [(sys.executable, {})]
    if args.isa_cap:
        variants.append((sys.executable, {"DNNL_MAX_CPU_ISA": "AVX512_CORE_BF16"}))
    variants += [(p, {}) for p in args.python]
    runs = [run_variant(p, env, args) for p, env in variants]
    old = json.loads(args.out.read_text()).get("runs", []) if args.out.is_file() else []
    ident = lambda r: (r.get("torch"), json.dumps(r.get("kernel_env", {}), sort_keys=True),  # noqa: E731
                       (r.get("machine") or {}).get("cpu_model"))
    fresh = {ident(r) for r in runs}
    kept = [r for r in old if ident(r) not in fresh]
    out = {"runs": kept + runs,
           "note": ("nonfinite: the issue's method (bf16 forward alone, outputs with inf/NaN); wrong: every call "
                    "compared with float32 (relative error above rel_error_limit, or non-finite). The machine "
                    "is shared with other jobs (load_average in each machine record).")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    for r in runs:
        print(f"torch {r.get('torch')} {r.get('kernel_env')}: repro {r.get('repro_nonfinite_of_300')} of 300; "
              + ", ".join(f"{'x'.join(map(str, x['input']))}{' cl' if x['channels_last'] else ''} "
                          f"k{x['layer'].split(', ')[2]}: {x['nonfinite']}/{x['wrong']}" for x in r.get("rows", [])))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
