"""How evaluation, ``attnreid extract``, ``index build`` and ``FeatureExtractor`` run a model.

One policy for every inference path. The precision comes from ``eval.amp`` (or ``--amp``
/ ``amp=``) through :func:`attnreid.precision.resolve_precision`: ``auto`` proposes bf16
autocast on CPUs with AMX or AVX512-BF16 and on CUDA devices with bf16, float32
elsewhere (there nothing changes). Features always come back as float32; distances and
evaluation stay in float32.

``auto`` keeps bf16 only where its features match float32 *on the model at hand*
(:func:`settle`): the first batch runs both ways, and bf16 stays when the mean cosine
between the two is at least :data:`MATCH_MEAN_COSINE` (0.999), else the rest runs in
float32 and the printed line says why. The decision is made once per model and weights
(:func:`settle_for`), so query and gallery features never end up in different
precisions. The rule is the one ``benchmarks/bench_infer.py`` applies to its
measurements (:func:`fastest_matching_path`): the fastest path whose features match
float32. It is measured per model and not fixed per CPU, because agreement depends on
the weights: with random weights, HA-CNN's bf16 features reach a mean cosine of only
~0.986 with float32 and MHSA-Net's (ResNet-50) ~0.91, while a trained ResNet-18
Baseline's reach >= 0.999 (measured on an AMD EPYC with AVX512-BF16; docs/deployment.md,
docs/training.md). An explicit ``bf16`` is taken as
asked, without the check. ``torch.compile`` and onnxruntime are not used by these
commands: see docs/deployment.md for why (compilation costs minutes here; onnxruntime
needs an export and is the ``attnreid export`` path).
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Dict, Iterable, Optional

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


def needs_check(precision: Precision) -> bool:
    """``auto`` chose a reduced precision that has not yet been compared with float32 on this model."""
    return precision.requested == "auto" and precision.dtype is not None


def settle(precision: Precision, forward: Callable[[], torch.Tensor]) -> Precision:
    """``auto``'s reduced precision kept or dropped by how well ``forward()``'s features match float32.

    ``forward`` computes the features of one batch under the ambient autocast. Returns a
    concrete choice (``requested`` ``bf16``/``fp16`` or ``off``), so that later batches
    are not checked again; precisions that need no check are returned unchanged.
    """
    if not needs_check(precision):
        return precision
    with torch.inference_mode():
        reference = forward().float()
        with precision.autocast():
            reduced = forward().float()
    cos = float(torch.nn.functional.cosine_similarity(reduced, reference, dim=1).mean())
    n = reference.shape[0]
    if cos >= MATCH_MEAN_COSINE:
        return Precision(precision.name, precision.dtype, precision.device_type,
                         f"{precision.reason}; matches float32 on this model: mean cosine {cos:.5f} "
                         f"on the first {n} images")
    return Precision("off", None, precision.device_type,
                     f"{precision.reason}, but {precision.name} features differ from float32 on this model: "
                     f"mean cosine {cos:.5f} < {MATCH_MEAN_COSINE} on the first {n} images")


def settle_for(model: torch.nn.Module, precision: Precision, forward: Callable[[], torch.Tensor]) -> Precision:
    """:func:`settle`, decided once per model and weights: later calls (the gallery after the
    query, a second extractor on the same model) reuse the decision until a parameter or
    buffer changes (training steps bump their version counters), so one set of features
    is never split between precisions by a borderline cosine."""
    if not needs_check(precision):
        return precision
    key = (precision.dtype, precision.device_type,
           tuple(t._version for t in (*model.parameters(), *model.buffers())))
    cached = model.__dict__.get("_attnreid_settled")
    if cached is not None and cached[0] == key:
        return cached[1]
    settled = settle(precision, forward)
    model.__dict__["_attnreid_settled"] = (key, settled)
    return settled


def announce(precision: Precision) -> None:
    """Print ``inference precision: ...`` on stderr, once per process and choice (a later
    evaluation of the same run making the same choice stays quiet)."""
    choice = (precision.name, precision.device_type, precision.requested)
    if choice not in _announced:
        _announced.add(choice)
        print(f"inference precision: {precision.describe()}", file=sys.stderr, flush=True)


def fastest_matching_path(rows: Iterable[Dict[str, Any]], threshold: float = MATCH_MEAN_COSINE) -> Optional[str]:
    """The path with the highest images/s among those whose features match eager float32.

    ``rows`` are ``bench_infer`` result rows (``path``, ``img_per_s``, ``mean_cosine``)
    of one model and batch size; paths that failed carry no ``img_per_s`` and are skipped.
    """
    ok = [r for r in rows if r.get("img_per_s") is not None and r.get("mean_cosine", 0.0) >= threshold]
    return max(ok, key=lambda r: r["img_per_s"])["path"] if ok else None
