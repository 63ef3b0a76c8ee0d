"""A few-lines feature-extraction API: ``FeatureExtractor(checkpoint)(images) -> N x D``.

>>> from attnreid import FeatureExtractor
>>> extractor = FeatureExtractor("runs/market/checkpoints/last.pth")
>>> feats = extractor(["a.jpg", "b.jpg"])          # torch.Tensor 2 x feature_dim

Inputs may be mixed in one call:

- an image path (``str`` / ``Path``; also ``archive.zip::member.jpg``),
- a ``PIL.Image`` (any mode; converted to RGB),
- a ``numpy`` array ``H x W x 3`` of ``uint8`` RGB pixels (or ``N x H x W x 3``),
- a ``torch.uint8`` tensor ``3 x H x W`` (or ``B x 3 x H x W``): raw RGB pixels, treated
  exactly like the numpy array (resized and normalised here),
- a floating-point tensor ``3 x H x W`` (or ``B x 3 x H x W``): taken as an **already
  preprocessed** model input, i.e. resized to the config's ``data.height x data.width``
  and normalised with its ``data.mean``/``data.std`` (what
  :meth:`FeatureExtractor.preprocess` returns). Its size must match; it is not resized.

Everything except float tensors goes through the data layer's test transform
(:func:`attnreid.data.transforms.build_transforms` with ``train=False``), so the features
are the ones ``attnreid eval`` computes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator, List, NamedTuple, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from attnreid.data.io import read_image
from attnreid.data.transforms import build_transforms
from attnreid.engine.build import config_fingerprint, load_for_inference, resolve_device
from attnreid.errors import ConfigError, DataError
from attnreid.inference.backend import (Inference, announce, check_backend, inference_precision, resolve_inference,
                                        run_features, settle_inference)
from attnreid.inference.int8 import calibration_images
from attnreid.precision import Precision

MAX_BATCH = 4096  # as data.test_batch_size



class Verdict(NamedTuple):
    """The answer of :meth:`FeatureExtractor.verify`: ``same`` when ``distance < threshold``;
    ``fpr`` is the calibrated false-positive rate of that threshold (None for a given threshold)."""

    same: bool
    distance: float
    threshold: float
    fpr: Optional[float]


def _resolve_device(device: str | torch.device) -> torch.device:
    return device if isinstance(device, torch.device) else resolve_device(str(device))


def _is_batch(item: Any) -> bool:
    return isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim == 4


class FeatureExtractor:
    """Test features of images from a trained model, batched, under ``torch.inference_mode``.

    Args:
        config_or_checkpoint: a run folder (its ``config.yaml`` and ``checkpoints/last.pth``),
            a checkpoint file (its saved config is used), a config file (``.yaml``) or a
            :class:`~attnreid.config.Config`. With a config, pass the
            weights as ``checkpoint``; a config without a checkpoint gives a randomly
            initialised model (useful for speed measurements only).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        batch_size: images per forward pass; inputs of any length are split into batches.
        flip: average the features of each image and its horizontal mirror (the same
            plain average ``attnreid eval`` uses with ``eval.flip``; not re-normalised).
        checkpoint: the weights when ``config_or_checkpoint`` is a config; its model
            section decides the architecture and test-feature variant.
        amp: the precision, ``auto | off | bf16 | fp16 | int8`` (default: the config's
            ``eval.amp``, itself ``auto``: bf16 where the hardware runs it natively and the
            first batch matches float32; ``int8`` is OpenVINO's post-training quantisation,
            calibrated on ``eval.int8_calibration`` training images of the config's data set;
            see :mod:`attnreid.inference.backend`). Features are float32 either way.
        backend: ``auto | torch | onnxruntime | openvino`` (default: the config's
            ``eval.backend``, itself ``auto``): eager PyTorch, or the model converted
            in-process and run in onnxruntime or OpenVINO. ``auto`` takes, for a job of at
            least a backend's ``MIN_IMAGES`` images (the first call's images, or what
            :meth:`expect` announced), the fastest installed path whose first batch matches
            PyTorch float32; decided once.

    Attributes: ``model`` (eval mode), ``cfg``, ``device``, ``precision``, ``backend``
    (``torch`` / ``onnxruntime`` / ``openvino``; ``auto`` until the first batch), ``inference`` (both, and
    why: an :class:`~attnreid.inference.backend.Inference`), ``feature_dim``,
    ``model_name``, ``checkpoint`` (path or None), ``fingerprint`` (see
    :func:`attnreid.engine.build.config_fingerprint`), ``metric`` (``cosine`` when the model L2-normalises its
    feature or the config's ``eval.metric`` says so, else ``euclidean_sq``).
    """

    def __init__(self, config_or_checkpoint: Any, device: str | torch.device = "cpu",
                 batch_size: int = 64, flip: bool = False, checkpoint: Optional[str | Path] = None,
                 amp: Optional[str] = None, backend: Optional[str] = None):
        if not 1 <= batch_size <= MAX_BATCH:  # a batch's images are all in memory at once
            raise ConfigError(f"batch_size is {batch_size}; it must be in 1..{MAX_BATCH}")
        self.device = _resolve_device(device)
        # bad values are refused before the checkpoint is read
        if amp is not None:
            amp = inference_precision(amp, self.device, key="amp")
        if backend is not None:
            check_backend(backend, self.device, key="backend")
        model, cfg, checkpoint = load_for_inference(config_or_checkpoint, checkpoint, self.device)
        self._setup(model, cfg, batch_size, flip, None if checkpoint is None else str(Path(checkpoint).resolve()), amp,
                    backend)

    @classmethod
    def from_model(cls, model: nn.Module, cfg: Any, device: str | torch.device = "cpu",
                   batch_size: int = 64, flip: bool = False, amp: Optional[str] = None,
                   backend: Optional[str] = None) -> "FeatureExtractor":
        """Wrap a model already in memory (e.g. at the end of training)."""
        self = cls.__new__(cls)
        self.device = _resolve_device(device)
        self._setup(model, cfg, batch_size, flip, None, amp, backend)
        return self

    def _setup(self, model: nn.Module, cfg: Any, batch_size: int, flip: bool, checkpoint: Optional[str],
               amp: Optional[str | Precision], backend: Optional[str] = None) -> None:
        self.precision = inference_precision(cfg.eval.amp if amp is None else amp, self.device,
                                             key="eval.amp" if amp is None else "amp")
        self._backend_key = "eval.backend" if backend is None else "backend"
        requested = check_backend(cfg.eval.backend if backend is None else backend, self.device, self._backend_key)
        self.inference: Optional[Inference] = None  # decided on the first batch
        self._requested_backend = requested
        self._job_images: Optional[int] = None

        self.model = model.to(self.device).eval()
        self.cfg = cfg
        self.batch_size = int(batch_size)
        self.flip = bool(flip)
        self.checkpoint = checkpoint
        self.model_name = getattr(model, "model_name", cfg.model.name)
        self.feature_dim = int(model.feature_dim)
        self.fingerprint = config_fingerprint(cfg)
        self.metric = "cosine" if (cfg.model.feature_norm or cfg.eval.metric == "cosine") else "euclidean_sq"
        d = cfg.data
        self.input_size = (d.height, d.width)
        self._transform = build_transforms(height=d.height, width=d.width, mean=list(d.mean), std=list(d.std),
                                           train=False, flip=False, random_erasing=0.0)

    # -- preprocessing -------------------------------------------------------------------

    def _from_pixels(self, array: np.ndarray, what: str) -> torch.Tensor:
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise DataError(f"{what} must be an H x W x 3 uint8 RGB array, got shape {tuple(array.shape)} "
                            f"dtype {array.dtype}")
        return self._transform(Image.fromarray(np.ascontiguousarray(array), "RGB"))

    def _check_input(self, x: torch.Tensor, what: str) -> torch.Tensor:
        if x.ndim != 3 or x.shape[0] != 3 or tuple(x.shape[1:]) != self.input_size:
            h, w = self.input_size
            raise DataError(f"{what} is a float tensor of shape {tuple(x.shape)}; float tensors are taken as "
                            f"preprocessed model input and must be 3 x {h} x {w} (pass uint8 pixels to resize)")
        return x.float()

    def _expand(self, item: Any) -> Iterator[Any]:
        """One input item -> one or more single images (batched arrays/tensors are split)."""
        if _is_batch(item):
            yield from item
        else:
            yield item

    def preprocess(self, item: Any) -> torch.Tensor:
        """One image (path, PIL image, HxWx3 uint8 array, 3xHxW tensor) -> the model's 3 x H x W input."""
        if isinstance(item, (str, Path)):
            return self._transform(read_image(str(item)))
        if isinstance(item, Image.Image):
            return self._transform(item.convert("RGB"))
        if isinstance(item, np.ndarray):
            return self._from_pixels(item, "numpy image")
        if isinstance(item, torch.Tensor):
            if item.dtype == torch.uint8:
                if item.ndim != 3 or item.shape[0] != 3:
                    raise DataError(f"uint8 image tensor must be 3 x H x W, got shape {tuple(item.shape)}")
                return self._from_pixels(item.permute(1, 2, 0).cpu().numpy(), "uint8 image tensor")
            if item.is_floating_point():
                return self._check_input(item.detach().cpu(), "image tensor")
        raise DataError(f"cannot read an image from a {type(item).__name__}; expected a path, PIL image, "
                        f"H x W x 3 uint8 array or 3 x H x W tensor")

    # -- inference -----------------------------------------------------------------------

    @property
    def backend(self) -> str:
        return self._requested_backend if self.inference is None else self.inference.backend

    def expect(self, num_images: int) -> None:
        """The number of images this extractor is about to compute (e.g. a gallery folder),
        for ``auto``'s onnxruntime threshold; only before the first batch."""
        if self.inference is None:
            self._job_images = int(num_images)

    def follow(self, amp: str, backend: str) -> None:
        """Compute exactly ``amp`` on ``backend`` (explicit values, no first-batch comparison):
        how the other ranks of a torchrun job take rank 0's settled choice. Only before the first batch."""
        if self.inference is None:
            self.precision = inference_precision(amp, self.device, key="amp")
            self._requested_backend = check_backend(backend, self.device, key="backend")

    def forward_batch(self, images: torch.Tensor) -> torch.Tensor:
        """Features of a preprocessed B x 3 x H x W batch (flip-averaged when asked), float32 on the CPU."""
        x = images.to(self.device)
        if self.inference is None or not self.inference.settled:
            # the backend (auto: onnxruntime if it pays and matches) and precision (auto: bf16 only
            # if it matches float32) are settled on this model's first batch
            choice = self.inference or resolve_inference(
                self.precision, self._requested_backend, self.device,
                self._job_images if self._job_images is not None else len(x), backend_key=self._backend_key,
                calibration=calibration_images(self.cfg))
            self.inference = settle_inference(self.model, choice, x, self._features, self.flip)
            self.precision = self.inference.precision
        announce(self.inference)
        return run_features(self.model, self.inference, x, self._features, self.flip).cpu()

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        f = self.model(x).float()
        if self.flip:
            f = (f + self.model(torch.flip(x, dims=[3])).float()) / 2
        return f

    def _batches(self, items: Iterable[Any]) -> Iterator[torch.Tensor]:
        pending: List[torch.Tensor] = []
        for item in items:
            for single in self._expand(item):
                pending.append(self.preprocess(single))
                if len(pending) == self.batch_size:
                    yield torch.stack(pending)
                    pending = []
        if pending:
            yield torch.stack(pending)

    def __call__(self, images: Any) -> torch.Tensor:
        """Features N x ``feature_dim`` (float32, CPU) of one image or a sequence of images, in order."""
        items: Sequence[Any] = images if isinstance(images, (list, tuple)) else [images]
        self.expect(sum(len(i) if _is_batch(i) else 1 for i in items))
        feats = [self.forward_batch(batch) for batch in self._batches(items)]
        if not feats:
            return torch.zeros(0, self.feature_dim)
        return torch.cat(feats)

    extract = __call__

    # -- verification ----------------------------------------------------------------------

    @property
    def weights_fingerprint(self) -> str:
        """A hash of the model's weights (:func:`attnreid.deploy.calibration.weights_fingerprint`)."""
        if getattr(self, "_weights_hash", None) is None:
            from attnreid.deploy.calibration import weights_fingerprint

            self._weights_hash = weights_fingerprint(self.model)
        return self._weights_hash

    @property
    def calibration(self) -> Optional[dict]:
        """The calibration :meth:`verify` uses: set it, or ``calibration.json`` beside the checkpoint
        is read on first use (it must have been made with this model's features)."""
        if getattr(self, "_calibration", None) is None and self.checkpoint is not None:
            from attnreid.deploy.calibration import default_path

            if default_path(self.checkpoint).is_file():
                self.calibration = default_path(self.checkpoint)
        return getattr(self, "_calibration", None)

    @calibration.setter
    def calibration(self, value: "str | Path | dict | None") -> None:
        from attnreid.deploy.calibration import check_fits, load_calibration
        from attnreid.deploy.index import model_meta

        cal = load_calibration(value) if isinstance(value, (str, Path)) else value
        if cal is not None:
            check_fits(cal, model_meta(self), f"this extractor's model ({self.checkpoint})",
                       str(value) if isinstance(value, (str, Path)) else "given")
        self._calibration = cal

    def verify(self, a: Any, b: Any, fpr: Optional[float] = None, threshold: Optional[float] = None):
        """Same person or not: ``a`` and ``b`` are two images (anything ``__call__`` takes) or two
        equally long lists of them. The pair is the same person when its distance (the model's
        metric) is below the threshold: ``threshold`` as given, or the calibration's for the
        false-positive rate ``fpr`` (:attr:`calibration`). Returns a :class:`Verdict` (a list of
        them for lists)."""
        from attnreid.deploy.calibration import resolve_threshold

        t, info = resolve_threshold(self.calibration if fpr is not None else None, fpr, threshold,
                                    f"the checkpoint {self.checkpoint}")
        single = not isinstance(a, (list, tuple))
        fa, fb = self(a), self(b)
        if fa.shape[0] != fb.shape[0]:
            raise DataError(f"verify needs as many images in a as in b, got {fa.shape[0]} and {fb.shape[0]}")
        if self.metric == "cosine":  # 1 - cos, from differences as the index computes its winners
            fa, fb = torch.nn.functional.normalize(fa, dim=1), torch.nn.functional.normalize(fb, dim=1)
        d = (fa - fb).pow(2).sum(1) * (0.5 if self.metric == "cosine" else 1.0)
        out = [Verdict(float(x) < t, float(x), t, info.get("target_fpr")) for x in d.tolist()]
        return out[0] if single else out

    def __repr__(self) -> str:
        return (f"FeatureExtractor(model={self.model_name!r}, feature_dim={self.feature_dim}, "
                f"input={self.input_size[0]}x{self.input_size[1]}, device={str(self.device)!r}, flip={self.flip}, "
                f"precision={self.precision.name!r}, backend={self.backend!r})")
