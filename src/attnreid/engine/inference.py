"""How evaluation, ``attnreid extract``, ``index build`` and ``FeatureExtractor`` run a model.

One policy for every inference path: the precision comes from ``eval.amp`` (or ``--amp``
/ ``amp=``) through :func:`attnreid.precision.resolve_precision`, so ``auto`` is bf16
autocast on CPUs with AMX or AVX512-BF16 and on CUDA devices with bf16, float32
elsewhere. Features always come back as float32, and distances and evaluation stay in
float32 whatever the choice.

Why eager bf16 is the ``auto`` path, and not ``torch.compile`` or onnxruntime: on the
CPU, bf16 autocast was the fastest path whose features match float32 (mean cosine >=
0.999) in ``benchmarks/bench_infer.py`` (table in docs/deployment.md; the result file,
``benchmarks/results/infer_cpu.json``, names the machine). :func:`fastest_matching_path`
is the rule that reads such a result; the test suite checks that it picks eager bf16
from that file, so a re-measurement that says otherwise fails the test instead of
silently leaving a stale default.
"""

from __future__ import annotations

import sys
from typing import Any, Dict, Iterable, Optional

import torch

from attnreid.precision import Precision, resolve_precision

# Features of a path "match" float32 when their mean cosine with eager float32 is at least this.
MATCH_MEAN_COSINE = 0.999

_announced: set = set()


def inference_precision(amp: str | Precision, device: torch.device | str, key: str = "eval.amp") -> Precision:
    """``amp`` (auto | off | bf16 | fp16, or an already resolved :class:`Precision`) on ``device``."""
    if isinstance(amp, Precision):
        return amp
    return resolve_precision(amp, device, key=key)


def announce(precision: Precision) -> None:
    """Print ``inference precision: ...`` on stderr, once per process and choice."""
    line = f"inference precision: {precision.describe()}"
    if line not in _announced:
        _announced.add(line)
        print(line, file=sys.stderr, flush=True)


def fastest_matching_path(rows: Iterable[Dict[str, Any]], threshold: float = MATCH_MEAN_COSINE) -> Optional[str]:
    """The path with the highest images/s among those whose features match eager float32.

    ``rows`` are ``bench_infer`` result rows (``path``, ``img_per_s``, ``mean_cosine``)
    of one model and batch size; paths that failed carry no ``img_per_s`` and are skipped.
    """
    ok = [r for r in rows if r.get("img_per_s") is not None and r.get("mean_cosine", 0.0) >= threshold]
    return max(ok, key=lambda r: r["img_per_s"])["path"] if ok else None
