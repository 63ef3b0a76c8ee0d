"""The test suite on other CPUs' kernel paths: which tests hold only for one summation order.

    .venv/bin/python benchmarks/kernel_paths.py                       # every path, 1 and 2 threads
    .venv/bin/python benchmarks/kernel_paths.py --paths ci -m numerics --threads 2

A float32 sum depends on the order the kernel adds in, and the order depends on the CPU's
vector width and on which library (torch's own kernels, oneDNN, MKL) runs the op. These
variables make this machine take the paths of older CPUs:

==========  ===============================================================================
native      this CPU's own kernels
default     ``ATEN_CPU_CAPABILITY=default``: torch's kernels without explicit vectorisation
avx2        ``ATEN_CPU_CAPABILITY=avx2``
dnnl_avx2   ``DNNL_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2``: matmuls and convolutions
ci          all three at once (default + oneDNN/MKL AVX2), the second pass of ``.ci/run``
==========  ===============================================================================

Each is run with ``OMP_NUM_THREADS`` 1 and 2 (thread count changes how reductions split).
The runs are sequential (a shared machine). Writes ``benchmarks/results/kernel_paths.json``:
per run the variables, pass/fail/skip counts, the failing tests and the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(HERE))

PATHS = {
    "native": {},
    "default": {"ATEN_CPU_CAPABILITY": "default"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "dnnl_avx2": {"DNNL_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "ci": {"ATEN_CPU_CAPABILITY": "default", "DNNL_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}


def run_once(path: str, threads: int, pytest_args) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA",
                                                             "MKL_ENABLE_INSTRUCTIONS")}
    env.update(PATHS[path], OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO / "src"))
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "junit.xml"
        start = time.time()
        rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
                             f"--junitxml={xml}", *pytest_args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
        wall = time.time() - start
        cases = ET.parse(xml).getroot().iter("testcase") if xml.exists() else []
        counts = {"passed": 0, "failed": 0, "skipped": 0}
        failed = []
        for case in cases:
            name = f"{case.get('classname')}::{case.get('name')}"
            if case.find("failure") is not None or case.find("error") is not None:
                counts["failed"] += 1
                failed.append(name)
            elif case.find("skipped") is not None:
                counts["skipped"] += 1
            else:
                counts["passed"] += 1
    return {"path": path, "env": {**PATHS[path], "OMP_NUM_THREADS": str(threads)}, "rc": rc, **counts,
            "failed_tests": failed, "wall_s": round(wall, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", nargs="+", default=["native", "default", "avx2", "dnnl_avx2", "ci"],
                        choices=list(PATHS))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--out", default=str(HERE / "results" / "kernel_paths.json"))
    args, pytest_args = parser.parse_known_args(argv)
    from _machine import machine_record  # noqa: E402

    runs = []
    for path in args.paths:
        for threads in args.threads:
            row = run_once(path, threads, pytest_args)
            runs.append(row)
            print(f"{path:10s} threads {threads}: rc {row['rc']}, {row['passed']} passed, {row['failed']} failed, "
                  f"{row['skipped']} skipped, {row['wall_s']} s {' '.join(row['failed_tests'])}", flush=True)
            # after every run, so that an interrupted series keeps what it measured
            record = {"machine": machine_record(), "pytest_args": pytest_args, "runs": runs}
            Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return 0 if all(r["rc"] == 0 for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
