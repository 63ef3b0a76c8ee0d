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
asked, without the check.

The backend comes from ``eval.backend`` (``--backend`` / ``backend=``): ``torch`` is eager
PyTorch with the precision above; an exported backend (:data:`BACKENDS`, one module each:
:mod:`~attnreid.inference.onnxruntime_backend`, :mod:`~attnreid.inference.openvino_backend`)
converts the model in-process (checked against PyTorch) and computes every batch in its
session on the CPU, in the precision ``eval.amp`` asks of it (OpenVINO: fp32, bf16 where the
CPU has it, int8 by post-training quantisation; onnxruntime: fp32). ``auto`` (the default)
measures instead of assuming: on the CPU, for a job of at least a backend's ``MIN_IMAGES``
images (the conversion must pay for itself), every candidate path (PyTorch in its settled
precision and in float32, each installed exported backend in each precision it computes
here) computes the first batch, and the fastest one whose features match eager float32
(mean cosine >= :data:`MATCH_MEAN_COSINE`; :func:`fastest_matching_path`, the rule
``benchmarks/bench_infer.py`` applies to its rows) is taken. int8 never matches by cosine
alone; it is taken only where the caller can check it on the validation split
(``validate``): faster still, and rank-1 and mAP within :data:`INT8_MAX_POINTS` of float32's
(:func:`int8_within`). Like the precision, the backend is settled once per model and
weights (:func:`settle_inference`) and then reused, so query and gallery are computed the
same way. ``torch.compile`` is not used here: its compilation took minutes per batch size
on this CPU and did not beat eager.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import time
import weakref
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

from attnreid.choices import EXPORTED_BACKENDS, INFERENCE_AMP_CHOICES, INFERENCE_BACKENDS
from attnreid.errors import AttnReidError, ConfigError
from attnreid.precision import Precision, resolve_precision
from attnreid.text import plural, the_first

# Features of a path "match" float32 when their mean cosine with eager float32 is at least this.
MATCH_MEAN_COSINE = 0.999

# int8 is taken by ``auto`` only when rank-1 and mAP on the validation split are each within
# this many points (percent) of float32's.
INT8_MAX_POINTS = 0.5

# The exported backends: eval.backend name -> the module that opens and runs a session of the
# exported model, attnreid/inference/<name>_backend.py. A backend module has INSTALL,
# REQUIRES, MIN_IMAGES (auto's threshold), PRECISION_REASON, PRECISIONS (what it can
# compute: fp32, bf16, int8), available(), precisions() (what it computes on this machine),
# open_session(model, input_size, precision="fp32", calibration=None) -> (session, seconds)
# (calibration: a callable returning preprocessed image batches, for int8) and
# features(session, images, flip) (see onnxruntime_backend.py, openvino_backend.py); a new
# one is that file and its name in attnreid.choices.EXPORTED_BACKENDS.
BACKENDS = {name: f"attnreid.inference.{name}_backend" for name in EXPORTED_BACKENDS}
CHOICES = INFERENCE_BACKENDS

_announced: set = set()
# Per model: its settled backend choices. Beside the model, not in it: a choice holds a
# session, which cannot be deep-copied or pickled and must not travel with the module.
_settled: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def inference_precision(amp: str | Precision, device: torch.device | str, key: str = "eval.amp") -> Precision:
    """``amp`` (auto | off | bf16 | fp16 | int8, or an already resolved :class:`Precision`) on ``device``.

    ``int8`` is no autocast: it asks an exported backend that quantises (openvino) for its
    post-training int8 graph; the :class:`Precision` says float32 for PyTorch's part."""
    if isinstance(amp, Precision):
        return amp
    if amp == "int8":
        return Precision("int8", None, torch.device(device).type, f"{key}=int8")
    if amp not in INFERENCE_AMP_CHOICES:
        raise ConfigError(f"config key '{key}' is {amp!r}; expected one of: {', '.join(INFERENCE_AMP_CHOICES)}")
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
                         f"on {the_first(n, 'image')}")
    return Precision("off", None, precision.device_type,
                     f"{precision.reason}, but {precision.name} features differ from float32 on this model: "
                     f"mean cosine {cos:.5f} < {MATCH_MEAN_COSINE} on {the_first(n, 'image')}")


def settle_for(model: torch.nn.Module, precision: Precision, forward: Callable[[], torch.Tensor]) -> Precision:
    """:func:`settle`, decided once per model and weights: later calls (the gallery after the
    query, a second extractor on the same model) reuse the decision until a parameter or
    buffer changes (training steps bump their version counters), so one set of features
    is never split between precisions by a borderline cosine."""
    if not needs_check(precision):
        return precision
    key = (precision.dtype, precision.device_type, weights_version(model))
    cached = model.__dict__.get("_attnreid_settled")
    if cached is not None and cached[0] == key:
        return cached[1]
    settled = settle(precision, forward)
    model.__dict__["_attnreid_settled"] = (key, settled)
    return settled


def announce(choice: "Inference | Precision") -> None:
    """Print the choice on stderr, once per process and choice (a later evaluation of the
    same run making the same choice stays quiet): ``inference: openvino bf16 (...)``,
    or for PyTorch ``inference precision: ...`` (with why no exported backend was used, when
    ``auto`` tried one or could not because none is installed)."""
    if isinstance(choice, Precision):
        choice = Inference("torch", "torch", choice, "")
    p = choice.precision
    ident = (choice.backend, choice.compute, p.name, p.device_type, p.requested, choice.note)
    if ident in _announced:
        return
    _announced.add(ident)
    if choice.backend in BACKENDS:
        line = f"inference: {choice.describe()}"
    else:
        line = f"inference precision: {p.describe()}" + (f"; PyTorch: {choice.note}" if choice.note else "")
    print(line, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Inference:
    """How a model's features are computed: ``backend`` and ``precision``, and why.

    ``requested`` is ``eval.backend`` as asked (auto | torch | an exported backend);
    ``backend`` is ``torch`` or an exported backend (``onnxruntime``, ``openvino``) once
    decided, ``auto`` while auto's first-batch comparison is pending (:func:`settle_inference`).
    ``compute`` is an exported backend's precision (fp32 | bf16 | int8; ``auto`` while its
    fp32/bf16 comparison is pending). ``note`` is what the console line adds about no exported
    backend being used ("" for nothing). ``session`` is an exported backend's session.
    ``images`` is the job's size (auto tries a backend only from its ``MIN_IMAGES``);
    ``calibration`` returns the preprocessed image batches int8 is calibrated on and
    ``validate(features) -> {"rank1", "mAP"}`` scores a feature function on the validation
    split (auto takes int8 only with it).
    """

    requested: str
    backend: str
    precision: Precision
    reason: str
    note: str = ""
    session: Any = dataclasses.field(default=None, compare=False, repr=False)
    compute: str = "fp32"
    images: Optional[int] = dataclasses.field(default=None, compare=False)
    calibration: Optional[Callable[[], List[torch.Tensor]]] = dataclasses.field(default=None, compare=False,
                                                                                repr=False)
    validate: Optional[Callable[[Callable[[torch.Tensor], torch.Tensor]], Dict[str, float]]] = dataclasses.field(
        default=None, compare=False, repr=False)

    @property
    def settled(self) -> bool:
        if self.backend == "torch":
            return not needs_check(self.precision)
        return self.backend in BACKENDS and self.session is not None

    def describe(self) -> str:
        """One line, e.g. ``openvino bf16 (...)`` or ``PyTorch bf16 autocast (CPU has AMX)``."""
        if self.backend in BACKENDS:
            return f"{self.backend} {self.compute} ({self.reason})"
        return f"PyTorch {self.precision.describe()}"

    def record(self) -> Dict[str, str]:
        """What eval.json, an index's meta.json and extract's .npz keep of the choice."""
        precision = self.precision.describe()
        if self.backend in BACKENDS and self.compute != "fp32":
            precision = f"{self.compute} ({self.precision.reason})"
        return {"precision": precision, "backend": self.backend, "inference": self.describe()}


def backend_module(name: str) -> ModuleType:
    """The module of exported backend ``name`` (imported on first use: it defers its optional packages)."""
    return importlib.import_module(BACKENDS[name])


def check_backend(backend: str, device: torch.device | str, key: str = "eval.backend") -> str:
    """``backend`` validated: a bad value, or an exported backend where it cannot run, is one line naming ``key``."""
    if backend not in CHOICES:
        raise ConfigError(f"config key '{key}' is {backend!r}; expected one of: {', '.join(CHOICES)}")
    if backend in BACKENDS:
        device = torch.device(device)
        if device.type != "cpu":
            raise ConfigError(f"{key}={backend} runs on the CPU, but the device is {device}; "
                              f"use {key}=torch or auto")
        module = backend_module(backend)
        if not module.available():
            raise ConfigError(f"{key}={backend} needs {module.REQUIRES}, which are not "
                              f"installed: {module.INSTALL} (or set {key}=torch)")
    return backend


def _int8_backends() -> List[str]:
    """The installed exported backends that quantise to int8 here."""
    return [n for n in BACKENDS if "int8" in backend_module(n).PRECISIONS and backend_module(n).available()
            and "int8" in backend_module(n).precisions()]


def _compute(module: ModuleType, name: str, precision: Precision, amp_key: str, backend_key: str) -> Tuple[str, str]:
    """What an exported backend computes for ``eval.amp``, and why: off -> fp32; auto -> its
    fastest of fp32/bf16 that matches (decided on the first batch); bf16 -> bf16 where it runs
    here, else fp32; int8 -> int8 (refused where the backend has none); fp16 -> fp32."""
    here = module.precisions()
    asked = precision.requested
    if asked == "int8":
        if "int8" not in here:
            have = [n for n in BACKENDS if "int8" in backend_module(n).PRECISIONS]
            raise ConfigError(f"{amp_key}=int8 needs a backend that quantises ({backend_key}={' or '.join(have)}); "
                              f"{name} computes {', '.join(here)}")
        return "int8", f"{amp_key}=int8: post-training quantisation"
    if asked == "auto" and "bf16" in here:
        return "auto", ""
    if asked == "bf16" and "bf16" in here:
        return "bf16", f"{amp_key}=bf16"
    if asked in ("bf16", "fp16"):
        return "fp32", f"{module.PRECISION_REASON}; {name} has no {asked} on this CPU"
    return "fp32", module.PRECISION_REASON


def resolve_inference(amp: "str | Precision | Inference", backend: str, device: torch.device | str,
                      num_images: Optional[int] = None, amp_key: str = "eval.amp",
                      backend_key: str = "eval.backend",
                      calibration: Optional[Callable[[], List[torch.Tensor]]] = None,
                      validate: Optional[Callable] = None) -> Inference:
    """What ``backend`` and ``amp`` mean for a job of ``num_images`` images on ``device``.

    An :class:`Inference` passed as ``amp`` (one already decided, e.g. by the query set) is
    returned unchanged. ``auto`` is decided here where it can be without the model (the
    device, the job's size, which exported backends are installed, an explicit ``bf16``/``fp16``
    precision, which only PyTorch's autocast gives); otherwise it stays pending until
    :func:`settle_inference` sees the first batch. ``num_images`` None (unknown) counts as
    too few. ``calibration`` and ``validate``: see :class:`Inference` (int8 only).
    """
    if isinstance(amp, Inference):
        return amp
    device = torch.device(device)
    precision = inference_precision(amp, device, key=amp_key)
    check_backend(backend, device, backend_key)
    extra = dict(images=num_images, calibration=calibration, validate=validate)
    if backend == "torch":
        if precision.requested == "int8":
            raise ConfigError(f"{amp_key}=int8 needs {backend_key}=openvino (PyTorch has no int8 path here)")
        return Inference(backend, "torch", precision, f"{backend_key}=torch", **extra)
    if backend in BACKENDS:
        module = backend_module(backend)
        compute, why = _compute(module, backend, precision, amp_key, backend_key)
        return Inference(backend, backend, Precision("off", None, device.type, why or module.PRECISION_REASON),
                         f"{backend_key}={backend}" + (f"; {why}" if compute != "fp32" and why else ""),
                         compute=compute, **extra)
    if precision.requested == "int8":  # auto + int8: the backend that quantises
        names = _int8_backends()
        if not names:
            have = [backend_module(n).INSTALL for n in BACKENDS if "int8" in backend_module(n).PRECISIONS]
            raise ConfigError(f"{amp_key}=int8 needs an int8 backend, and none is installed ({'; '.join(have)})")
        return resolve_inference(amp, names[0], device, num_images, amp_key, backend_key, calibration, validate)
    installed = [n for n in BACKENDS if backend_module(n).available()]
    small = min((backend_module(n).MIN_IMAGES for n in installed), default=None)
    note = ""
    if precision.requested in ("bf16", "fp16"):  # an explicit reduced precision is PyTorch's autocast
        why = f"{amp_key}={precision.requested} asks for PyTorch autocast"
    elif device.type != "cpu":
        why = f"the device is {device.type}"
    elif not installed:
        why = note = "no exported backend is installed (" + "; ".join(
            f"{n}: {backend_module(n).INSTALL}" for n in BACKENDS) + ")"
    elif num_images is None or num_images < small:
        what = "an unknown number of images" if num_images is None else plural(num_images, "image")
        why = f"{what} (< {small}): too few for a conversion to pay"
    else:
        return Inference("auto", "auto", precision, f"{backend_key}=auto: {plural(num_images, 'image')}", **extra)
    return Inference("auto", "torch", precision, f"{backend_key}=auto, PyTorch: {why}", note, **extra)


def weights_version(model: torch.nn.Module) -> tuple:
    """Changes whenever a parameter or buffer of ``model`` is written (a training step, a load)."""
    return tuple(t._version for t in (*model.parameters(), *model.buffers()))


def settle_inference(model: torch.nn.Module, choice: Inference, images: torch.Tensor,
                     features: Callable[[torch.Tensor], torch.Tensor], flip: bool = False) -> Inference:
    """``choice`` made concrete on the first batch ``images``; ``features(x)`` is PyTorch's
    (flip included) under the ambient autocast.

    An exported backend (asked) in one precision: its session. An exported backend with
    ``eval.amp=auto``, or ``auto``: every candidate path (PyTorch in its settled precision
    and float32; each installed exported backend the job is big enough for, in fp32 and,
    where the CPU has it, bf16) computes ``images``, timed after a warm-up call, and the
    fastest one whose features match eager float32 (mean cosine >= :data:`MATCH_MEAN_COSINE`,
    :func:`fastest_matching_path`) is taken. int8 (auto only) additionally needs
    ``choice.validate``: taken when it is faster still and its rank-1 and mAP on the
    validation split are within :data:`INT8_MAX_POINTS` of float32's (:func:`int8_within`).
    A candidate whose conversion fails is left out with its reason. PyTorch alone: the
    precision's own check (:func:`settle_for`). Decided once per model and weights: a later
    call with the same request (the gallery after the query, a second extractor) gets the same answer.
    """
    if choice.settled:
        return choice
    if choice.backend == "torch":
        return dataclasses.replace(choice, precision=settle_for(model, choice.precision, lambda: features(images)))
    key = (choice.requested, choice.compute, choice.precision.requested, choice.precision.dtype,
           tuple(images.shape[1:]), bool(flip), torch.get_num_threads(), weights_version(model))
    cached = _settled.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    if choice.backend in BACKENDS and choice.compute != "auto":
        session, seconds = backend_module(choice.backend).open_session(
            model, images.shape[2:], precision=choice.compute, calibration=choice.calibration)
        settled = dataclasses.replace(choice, session=session, reason=f"{choice.reason}; setup {seconds:.1f} s")
    else:
        settled = _settle_auto(model, choice, images, features, flip)
    _settled[model] = (key, settled)
    return settled


def _measure(path: str, run: Callable[[], torch.Tensor]) -> Tuple[torch.Tensor, float]:
    """``run()``'s features and the seconds of a second call (the first pays one-time costs).
    ``path`` names the candidate (tests replace this function to give paths designed speeds)."""
    run()
    t0 = time.perf_counter()
    out = run()
    return out, time.perf_counter() - t0


def _mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float().cpu(), b.float().cpu(), dim=1).mean())


def int8_within(fp32: Dict[str, float], int8: Dict[str, float], points: float = INT8_MAX_POINTS) -> Tuple[bool, str]:
    """Whether int8's rank-1 and mAP (fractions) are each within ``points`` percentage points of
    float32's, and the sentence that says so."""
    d1, dm = 100 * (int8["rank1"] - fp32["rank1"]), 100 * (int8["mAP"] - fp32["mAP"])
    ok = max(abs(d1), abs(dm)) <= points + 1e-9  # 0.895 - 0.9 is 0.5000000000000004 points in binary
    return ok, (f"int8 rank-1 {100 * int8['rank1']:.2f}% vs fp32 {100 * fp32['rank1']:.2f}%, mAP "
                f"{100 * int8['mAP']:.2f}% vs {100 * fp32['mAP']:.2f}% on the validation split: "
                f"{'within' if ok else 'not within'} {points} points")


def _settle_auto(model: torch.nn.Module, choice: Inference, images: torch.Tensor,
                 features: Callable[[torch.Tensor], torch.Tensor], flip: bool) -> Inference:
    """The fastest candidate path whose features match eager float32 (see :func:`settle_inference`)."""
    size, n = images.shape[2:], images.shape[0]
    with torch.inference_mode():
        reference = features(images).float()
    rows: List[Dict[str, Any]] = []
    taken: Dict[str, Inference] = {}
    left_out: List[str] = []

    def add(path: str, option: Inference, run: Callable[[], torch.Tensor]) -> None:
        got, seconds = _measure(path, run)
        rows.append({"path": path, "img_per_s": n / max(seconds, 1e-9), "mean_cosine": _mean_cosine(got, reference)})
        taken[path] = option

    def session_of(name: str, precision: str):
        try:
            return backend_module(name).open_session(model, size, precision=precision, calibration=choice.calibration)
        except AttnReidError as exc:  # a conversion that fails (an unsupported op, a failed check)
            left_out.append(f"{name} {precision}: {exc}")
            return None, 0.0

    if choice.backend == "auto":  # PyTorch is a candidate too: in its settled precision and in fp32
        torch_choice = dataclasses.replace(choice, backend="torch")
        precision = settle_for(model, choice.precision, lambda: features(images))
        fp32 = Precision("off", None, precision.device_type, "the fastest path matching float32")
        for p in {precision.name: precision, "fp32": fp32}.values():
            option = dataclasses.replace(torch_choice, precision=p)
            add(f"torch {p.name}", option, lambda o=option: run_features(model, o, images, features, flip))
        names = [m for m in BACKENDS if backend_module(m).available()
                 and (choice.images or 0) >= backend_module(m).MIN_IMAGES]
    else:
        names = [choice.backend]
    for name in names:
        module = backend_module(name)
        for precision in (p for p in module.precisions() if p != "int8"):
            session, seconds = session_of(name, precision)
            if session is not None:
                option = dataclasses.replace(choice, backend=name, session=session, compute=precision,
                                             precision=Precision("off", None, "cpu", module.PRECISION_REASON),
                                             reason=f"{choice.reason}; setup {seconds:.1f} s")
                add(f"{name} {precision}", option, lambda s=session, m=module: m.features(s, images, flip))
    best = fastest_matching_path(rows)
    summary = ", ".join(f"{r['path']} {r['img_per_s']:.1f} img/s cos {r['mean_cosine']:.5f}" for r in rows)
    why = (f"fastest matching PyTorch fp32 (mean cosine >= {MATCH_MEAN_COSINE} on {the_first(n, 'image')}): "
           f"{summary}" + (f"; left out: {'; '.join(left_out)}" if left_out else ""))
    if best is None:  # eager fp32 always matches itself: only an explicitly asked backend gets here
        best = next((r["path"] for r in rows if r["path"].endswith(" fp32")), None)
        if best is None:
            raise AttnReidError(f"{choice.backend} could not be set up ({'; '.join(left_out)})")
    picked = taken[best]
    int8_note = _try_int8(model, choice, picked, rows, best, images, features, flip)
    if isinstance(int8_note, Inference):
        return int8_note
    why += int8_note
    if picked.backend == "torch":
        return dataclasses.replace(picked, reason=f"{choice.reason}; {why}", note=why)
    return dataclasses.replace(picked, reason=f"{picked.reason}; {why}")


def _try_int8(model: torch.nn.Module, choice: Inference, picked: Inference, rows: List[Dict[str, Any]], best: str,
              images: torch.Tensor, features: Callable[[torch.Tensor], torch.Tensor], flip: bool) -> "Inference | str":
    """``auto``'s int8: taken (returned as the :class:`Inference`) when it is faster than ``best``
    and :func:`int8_within` holds on the validation split; else the sentence why not ("" when
    no int8 backend is installed or this is not a full ``auto``)."""
    if choice.requested != "auto" or choice.precision.requested != "auto":
        return ""
    names = [m for m in _int8_backends() if (choice.images or 0) >= backend_module(m).MIN_IMAGES]
    if not names:
        return ""
    if choice.validate is None or choice.calibration is None:
        return "; int8 not tried: no validation split to check it on (data.val_ids)"
    name = names[0]
    module = backend_module(name)
    try:
        session, seconds = module.open_session(model, images.shape[2:], precision="int8",
                                               calibration=choice.calibration)
    except AttnReidError as exc:
        return f"; int8 not taken: {exc}"
    _, secs = _measure(f"{name} int8", lambda: module.features(session, images, flip))
    speed = images.shape[0] / max(secs, 1e-9)
    fastest = max(r["img_per_s"] for r in rows if r["path"] == best)
    if speed <= fastest:
        return f"; int8 not taken: {name} int8 {speed:.1f} img/s is not faster than {best}"
    with torch.inference_mode():
        fp32 = choice.validate(lambda x: features(x).float())
    int8 = choice.validate(lambda x: module.features(session, x, flip))
    ok, text = int8_within(fp32, int8)
    if not ok:
        return f"; int8 not taken: {text}"
    return dataclasses.replace(choice, backend=name, session=session, compute="int8",
                               precision=Precision("off", None, "cpu", module.PRECISION_REASON),
                               reason=f"{choice.reason}; {name} int8 {speed:.1f} img/s, faster than {best} "
                                      f"{fastest:.1f} img/s, and {text}; setup {seconds:.1f} s")


def explicit(choice: Inference) -> Tuple[str, str]:
    """``(eval.amp, eval.backend)`` that ask for exactly this settled choice, with no first-batch
    comparison: how the other ranks of a torchrun job take rank 0's decision."""
    if choice.backend in BACKENDS:
        return {"fp32": "off", "bf16": "bf16", "int8": "int8"}[choice.compute], choice.backend
    return {"fp32": "off", "bf16": "bf16", "fp16": "fp16"}[choice.precision.name], "torch"


def run_features(model: torch.nn.Module, choice: Inference, images: torch.Tensor,
                 features: Callable[[torch.Tensor], torch.Tensor], flip: bool = False) -> torch.Tensor:
    """One batch's float32 features by a settled ``choice`` (on the CPU for an exported backend)."""
    if choice.backend in BACKENDS:
        return backend_module(choice.backend).features(choice.session, images, flip)
    with torch.inference_mode(), choice.precision.autocast():
        return features(images).float()


def fastest_matching_path(rows: Iterable[Dict[str, Any]], threshold: float = MATCH_MEAN_COSINE) -> Optional[str]:
    """The path with the highest images/s among those whose features match eager float32.

    ``rows`` are ``bench_infer`` result rows (``path``, ``img_per_s``, ``mean_cosine``)
    of one model and batch size; paths that failed carry no ``img_per_s`` and are skipped.
    """
    ok = [r for r in rows if r.get("img_per_s") is not None and r.get("mean_cosine", 0.0) >= threshold]
    return max(ok, key=lambda r: r["img_per_s"])["path"] if ok else None
