"""The allowed values of the config's choice keys, each list defined once.

Torch-free on purpose: :mod:`attnreid.config` validates a config with these lists without
importing torch, and the module that owns each choice (the model, loss, loader or backend
that acts on it) imports the same list from here. ``model.name`` and ``model.test_feature``
come from the model registry (:mod:`attnreid.models.registry`) instead.
"""

from __future__ import annotations

from typing import Union

from attnreid.errors import ConfigError

# model.backbone (models/backbones.py)
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet50_ibn_a", "mobilenetv3_small", "mobilenetv2")
LAST_STRIDES = (1, 2)

# model.mhsanet (models/mhsanet.py)
ATTENTION_NORMS = ("spatial", "heads")
HEAD_PRIORS = ("none", "rows", "rows_learned")
FUSIONS = ("saffm", "concat", "sum")

# model.hacnn (models/hacnn.py)
HACNN_ATTENTION = ("none", "spatial", "channel", "soft", "hard", "all")
CROSS_ATTENTION_MODES = ("on", "off", "detach")
REGION_SCALES = ("stripes", "native")

# loss (losses/triplet.py, losses/regularizers.py)
DISTANCES = ("euclidean", "squared")
FDRT_FORMS = ("paper", "gram")
ACM_FORMS = ("paper", "linear")

# optim, train, data (engine/optim.py, precision.py, engine/compiled.py, data/sampler.py)
OPTIMIZERS = ("adam", "sgd")
AMP_CHOICES = ("auto", "off", "bf16", "fp16")
# eval.amp also takes int8: an exported backend's post-training quantisation (inference/backend.py).
INFERENCE_AMP_CHOICES = (*AMP_CHOICES, "int8")
COMPILE_CHOICES = ("auto", "off", "on")
EPOCH_MODES = ("images", "identities")
CUHK03_SPLITS = ("new",)

# eval (evaluation/distance.py, evaluation/rerank.py, inference/backend.py)
METRICS = ("euclidean_sq", "cosine")
RERANK_INPUTS = ("zhong", "torchreid")
# The exported inference backends; each is one module, attnreid/inference/<name>_backend.py.
EXPORTED_BACKENDS = ("onnxruntime", "openvino")
INFERENCE_BACKENDS = ("auto", "torch", *EXPORTED_BACKENDS)

Margin = Union[float, str]  # a number >= 0 (hinge) or "soft" (softplus)


def parse_margin(value, key: str) -> Margin:
    """A config margin (``soft``, a number, or a numeric string) -> ``"soft"`` or a float >= 0.

    ``key`` names the config key in the one-line :class:`ConfigError` for anything else.
    """
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "soft":
            return "soft"
        try:
            number = float(text)
        except ValueError:
            raise ConfigError(f"config key '{key}' is {value!r}; expected 'soft' or a number >= 0") from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    else:
        raise ConfigError(f"config key '{key}' is {value!r}; expected 'soft' or a number >= 0")
    if not number >= 0 or number == float("inf"):
        raise ConfigError(f"config key '{key}' is {value!r}; a numeric margin must be finite and >= 0")
    return number


MAX_WORKERS = 64


def check_workers(value) -> Union[int, str]:
    """``data.workers``: ``auto`` or a number in 0..MAX_WORKERS (:func:`attnreid.data.loader.resolve_workers`
    resolves it)."""
    if value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"config key 'data.workers' is {value!r}; expected 'auto' or a number >= 0")
    if value > MAX_WORKERS:  # each worker is a process: a typo must not fork thousands
        raise ConfigError(f"config key 'data.workers' is {value}; it must be <= {MAX_WORKERS}")
    return value
