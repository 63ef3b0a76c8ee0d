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
``onnxruntime`` is :mod:`attnreid.inference.onnxruntime_backend`) exports the model
in-process (:func:`attnreid.inference.export.export_onnx`, with its own equivalence check)
and computes every batch in its session (float32, as many intra-op threads as torch has);
``auto`` (the default) takes the first exported backend (onnxruntime) only when all of
these hold, else PyTorch: its optional packages import, the device is the CPU, the job has
at least the backend's ``MIN_IMAGES`` images (the export must pay for itself), the model
exports, and the first batch's features match eager float32 (mean cosine >=
:data:`MATCH_MEAN_COSINE`). Like the precision, the backend is
settled once per model and weights (:func:`settle_inference`) and then reused, so query
and gallery are computed the same way. onnxruntime fp32 was the fastest path whose
features match float32 for both MHSA-Net (ResNet-50) and HA-CNN, at batch 1 and 64
(benchmarks/bench_infer.py, docs/deployment.md). ``torch.compile`` is not used here: its
compilation took minutes per batch size on this CPU and did not beat eager.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
import weakref
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Dict, Iterable, Optional

import torch

from attnreid.choices import EXPORTED_BACKENDS, INFERENCE_BACKENDS
from attnreid.errors import AttnReidError, ConfigError
from attnreid.precision import Precision, resolve_precision
from attnreid.text import plural, the_first

# Features of a path "match" float32 when their mean cosine with eager float32 is at least this.
MATCH_MEAN_COSINE = 0.999

# The exported backends: eval.backend name -> the module that opens and runs a session of the
# exported model, attnreid/inference/<name>_backend.py. A backend module has INSTALL,
# REQUIRES, MIN_IMAGES (auto's threshold), PRECISION_REASON, available(),
# open_session(model, input_size) -> (session, seconds) and features(session, images, flip)
# (see onnxruntime_backend.py); a new one is that file and its name in
# attnreid.choices.EXPORTED_BACKENDS.
BACKENDS = {name: f"attnreid.inference.{name}_backend" for name in EXPORTED_BACKENDS}
CHOICES = INFERENCE_BACKENDS
# The exported backend ``auto`` tries.
AUTO_BACKEND = "onnxruntime"

_announced: set = set()
# Per model: its settled backend choices. Beside the model, not in it: a choice holds a
# session, which cannot be deep-copied or pickled and must not travel with the module.
_settled: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


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
    same run making the same choice stays quiet): ``inference: onnxruntime fp32 (...)``,
    or for PyTorch ``inference precision: ...`` (with why no exported backend was used, when
    ``auto`` tried one or could not because it is not installed)."""
    if isinstance(choice, Precision):
        choice = Inference("torch", "torch", choice, "")
    p = choice.precision
    ident = (choice.backend, p.name, p.device_type, p.requested, choice.note)
    if ident in _announced:
        return
    _announced.add(ident)
    if choice.backend in BACKENDS:
        line = f"inference: {choice.describe()}"
    else:
        line = (f"inference precision: {p.describe()}"
                + (f"; PyTorch, not {AUTO_BACKEND}: {choice.note}" if choice.note else ""))
    print(line, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Inference:
    """How a model's features are computed: ``backend`` and ``precision``, and why.

    ``requested`` is ``eval.backend`` as asked (auto | torch | an exported backend);
    ``backend`` is ``torch`` or an exported backend (``onnxruntime``) once decided, ``auto``
    while auto's export and first-batch check are pending (:func:`settle_inference`).
    ``note`` is what the console line adds about no exported backend being used ("" for
    nothing). ``session`` is an exported backend's session.
    """

    requested: str
    backend: str
    precision: Precision
    reason: str
    note: str = ""
    session: Any = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def settled(self) -> bool:
        if self.backend == "torch":
            return not needs_check(self.precision)
        return self.backend in BACKENDS and self.session is not None

    def describe(self) -> str:
        """One line, e.g. ``onnxruntime fp32 (...)`` or ``PyTorch bf16 autocast (CPU has AMX)``."""
        if self.backend in BACKENDS:
            return f"{self.backend} fp32 ({self.reason})"
        return f"PyTorch {self.precision.describe()}"

    def record(self) -> Dict[str, str]:
        """What eval.json, an index's meta.json and extract's .npz keep of the choice."""
        return {"precision": self.precision.describe(), "backend": self.backend, "inference": self.describe()}


def backend_module(name: str) -> ModuleType:
    """The module of exported backend ``name`` (imported on first use: it defers its optional packages)."""
    return importlib.import_module(BACKENDS[name])


def check_backend(backend: str, device: torch.device | str, key: str = "eval.backend") -> str:
    """``backend`` validated: a bad value, or ``onnxruntime`` where it cannot run, is one line naming ``key``."""
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


def resolve_inference(amp: "str | Precision | Inference", backend: str, device: torch.device | str,
                      num_images: Optional[int] = None, amp_key: str = "eval.amp",
                      backend_key: str = "eval.backend") -> Inference:
    """What ``backend`` and ``amp`` mean for a job of ``num_images`` images on ``device``.

    An :class:`Inference` passed as ``amp`` (one already decided, e.g. by the query set) is
    returned unchanged. ``auto`` is decided here where it can be without the model (the
    device, the job's size, whether onnxruntime is installed, an explicit ``bf16``/``fp16``
    precision, which only PyTorch's autocast gives); otherwise it stays pending until
    :func:`settle_inference` sees the first batch. ``num_images`` None (unknown) counts as
    too few.
    """
    if isinstance(amp, Inference):
        return amp
    device = torch.device(device)
    precision = inference_precision(amp, device, key=amp_key)
    check_backend(backend, device, backend_key)
    if backend == "torch":
        return Inference(backend, "torch", precision, f"{backend_key}=torch")
    if backend in BACKENDS:
        reason = backend_module(backend).PRECISION_REASON
        return Inference(backend, backend, Precision("off", None, device.type, reason), f"{backend_key}={backend}")
    note = ""
    auto = backend_module(AUTO_BACKEND)
    if precision.requested in ("bf16", "fp16"):  # an explicit reduced precision is PyTorch's autocast
        why = f"{amp_key}={precision.requested} asks for PyTorch autocast"
    elif device.type != "cpu":
        why = f"the device is {device.type}"
    elif num_images is None or num_images < auto.MIN_IMAGES:
        what = "an unknown number of images" if num_images is None else plural(num_images, "image")
        why = f"{what} (< {auto.MIN_IMAGES}): too few for an ONNX export to pay"
    elif not auto.available():
        why = note = f"{AUTO_BACKEND} is not installed ({auto.INSTALL})"
    else:
        return Inference("auto", "auto", precision, f"{backend_key}=auto: {plural(num_images, 'image')}")
    return Inference("auto", "torch", precision, f"{backend_key}=auto, not {AUTO_BACKEND}: {why}", note)


def weights_version(model: torch.nn.Module) -> tuple:
    """Changes whenever a parameter or buffer of ``model`` is written (a training step, a load)."""
    return tuple(t._version for t in (*model.parameters(), *model.buffers()))


def settle_inference(model: torch.nn.Module, choice: Inference, images: torch.Tensor,
                     features: Callable[[torch.Tensor], torch.Tensor], flip: bool = False) -> Inference:
    """``choice`` made concrete on the first batch ``images``; ``features(x)`` is PyTorch's
    (flip included) under the ambient autocast.

    An exported backend (asked): the export. auto: the export, then the backend stays when its
    features of ``images`` match eager float32 (mean cosine >= :data:`MATCH_MEAN_COSINE`);
    an export that fails or features that differ give PyTorch, with the reason. PyTorch:
    the precision's own check (:func:`settle_for`). Decided once per model and weights: a
    later call with the same request (the gallery after the query, a second extractor)
    gets the same answer.
    """
    if choice.settled:
        return choice
    if choice.backend == "torch":
        return dataclasses.replace(choice, precision=settle_for(model, choice.precision, lambda: features(images)))
    key = (choice.requested, choice.precision.requested, choice.precision.dtype, tuple(images.shape[1:]), bool(flip),
           torch.get_num_threads(), weights_version(model))
    cached = _settled.get(model)
    if cached is not None and cached[0] == key:
        return cached[1]
    if choice.backend in BACKENDS:
        session, seconds = backend_module(choice.backend).open_session(model, images.shape[2:])
        settled = dataclasses.replace(choice, session=session, reason=f"{choice.reason}; export {seconds:.1f} s")
    else:
        settled = _settle_auto(model, choice, images, features, flip)
    _settled[model] = (key, settled)
    return settled


def _settle_auto(model: torch.nn.Module, choice: Inference, images: torch.Tensor,
                 features: Callable[[torch.Tensor], torch.Tensor], flip: bool) -> Inference:
    def fallback(why: str) -> Inference:
        torch_choice = dataclasses.replace(choice, backend="torch",
                                           reason=f"{choice.reason}, not {AUTO_BACKEND}: {why}", note=why)
        return settle_inference(model, torch_choice, images, features, flip)

    backend = backend_module(AUTO_BACKEND)
    try:
        session, seconds = backend.open_session(model, images.shape[2:])
    except AttnReidError as exc:  # the exporter's one line (an unsupported op, a failed check)
        return fallback(f"the ONNX export failed ({exc})")
    with torch.inference_mode():
        reference = features(images).float()
        got = backend.features(session, images, flip)
    cos = float(torch.nn.functional.cosine_similarity(got, reference.cpu(), dim=1).mean())
    n = images.shape[0]
    if cos < MATCH_MEAN_COSINE:
        return fallback(f"its features differ from PyTorch fp32: mean cosine {cos:.5f} < {MATCH_MEAN_COSINE} "
                        f"on {the_first(n, 'image')}")
    return dataclasses.replace(choice, backend=AUTO_BACKEND, session=session,
                               precision=Precision("off", None, "cpu", backend.PRECISION_REASON),
                               reason=f"{choice.reason}; mean cosine {cos:.5f} with PyTorch fp32 on "
                                      f"{the_first(n, 'image')}; export {seconds:.1f} s")


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
