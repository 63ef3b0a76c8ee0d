"""The model registry: one :class:`ModelSpec` per network, all that the rest of attnreid knows of it.

Each model has one entry, ``register(ModelSpec(...))``: its builder and config section, its
loss terms, its test features and its capabilities. The config's ``model.name`` and
``model.test_feature`` choices, the criterion (:func:`attnreid.losses.build_criterion`),
the training and evaluation diagnostics, the ONNX export, ``attnreid model-info``, the
attention overlays, the report and the demo read the spec instead of comparing names.

Torch-free, so that loading a config imports no torch: a built-in spec names its builder
as ``"module:callable"``, imported when the first model is built. A model defined outside
the package registers its spec from its own file, with the builder itself
(``docs/design.md``, "Adding a model"). The built-in entries follow the machinery below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from attnreid.errors import ConfigError

# What the criterion can compute (attnreid.losses.build_criterion) and what each kind reads from
# the training output (attnreid.models.output.TrainOutput).
TERM_KINDS = {
    "ce": "logits[head]: softmax cross-entropy",
    "triplet": "features[head]: batch-hard triplet",
    "center": "features[head]: center loss (its centres in the criterion)",
    "fdrt": "P: feature diversity (MHSA-Net Eq. 3)",
    "ihtl": "P: improved hard triplet (MHSA-Net Eq. 5)",
    "acm": "alpha: attention competition (MHSA-Net Eq. 12)",
    "attn_orth": "alpha: ||A A^T - I||^2",
}
# What ``forward_attention`` returns (viz/attention.py draws each; docs/design.md, Models):
# "heads": ``attention`` B x K x h x w (one map per head) and ``beta`` B x K (optional);
# "levels": ``soft_attention`` (list over levels of B x h x w), ``regions`` (list of B x T x 4
# boxes) and ``region_levels``.
ATTENTION_KINDS = ("heads", "levels")


@dataclass(frozen=True)
class LossTerm:
    """One term of a model's loss, by name; :mod:`attnreid.losses` computes it.

    ``name`` is the term's name in logs (``ce_saffm``), ``kind`` one of :data:`TERM_KINDS`,
    ``weight`` the ``loss.*`` key holding its weight (a boolean key weighs 1 or 0) or a fixed
    number, ``head`` the logits or features entry a ``ce``/``triplet``/``center`` term reads.
    ``needs`` is set when this configuration cannot compute the term: a weight > 0 is then a
    one-line error ``config key 'loss.<weight>' needs <needs>``.
    """

    name: str
    kind: str
    weight: Union[str, float]
    head: Optional[str] = None
    needs: str = ""


@dataclass(frozen=True)
class TestFeature:
    """A ``model.test_feature`` value: ``what`` the vector is, and ``label``, the paper's name for
    the model evaluated with it when it has one (MHSA-Net* for p*)."""

    __test__ = False  # not a pytest class

    name: str
    what: str
    label: str = ""


@dataclass(frozen=True)
class ModelSpec:
    """Everything attnreid knows of one model besides its network.

    - ``name``: ``model.name``; the network's ``model_name``. ``label``: its name in tables.
    - ``build``: ``callable(model_cfg, num_classes) -> nn.Module``, or ``"module:callable"``.
    - ``section``: its config section ``model.<section>``, None when it has only the common keys.
    - ``test_features``: the ``model.test_feature`` values it takes; the first is its default.
    - ``loss_terms(model_cfg) -> [LossTerm]``: the terms its training output supports, in the
      order they are summed.
    - ``backbone``: it is built on ``model.backbone``.
    - ``attention``: what ``forward_attention`` returns (:data:`ATTENTION_KINDS`), None without.
      ``heads`` also means head diagnostics: the training output's ``alpha`` (and ``P``, ``beta``)
      give the per-epoch ``diagnostics`` records and eval.json's ``attention_stats``.
    - ``onnx_min_opset`` and ``onnx_opset_reason``: the oldest opset its graph exports to, and why.
    - ``summary``: (label, config keys) rows of the report's config summary.
    - ``validate(model_cfg)``: checks beyond the choice lists, run when a config is loaded.
    """

    name: str
    label: str
    build: Union[str, Callable[..., Any]]
    test_features: Tuple[TestFeature, ...]
    loss_terms: Callable[[Any], Sequence[LossTerm]]
    section: Optional[str] = None
    backbone: bool = True
    attention: Optional[str] = None
    onnx_min_opset: int = 0
    onnx_opset_reason: str = ""
    summary: Tuple[Tuple[str, Tuple[str, ...]], ...] = ()
    validate: Optional[Callable[[Any], None]] = None

    @property
    def head_diagnostics(self) -> bool:
        return self.attention == "heads"

    @property
    def default_test_feature(self) -> str:
        return self.test_features[0].name

    def feature(self, name: str) -> TestFeature:
        """The :class:`TestFeature` that ``model.test_feature`` = ``name`` (``default`` or a name) means."""
        found = [f for f in self.test_features if f.name == name or (name == "default" and f is self.test_features[0])]
        if not found:
            raise ConfigError(f"config key 'model.test_feature' is {name!r}; {self.name} takes "
                              f"one of: default, {', '.join(f.name for f in self.test_features)}")
        return found[0]

    def test_feature(self, model_cfg: Any) -> TestFeature:
        """:meth:`feature` of ``model_cfg.test_feature``."""
        return self.feature(model_cfg.test_feature)

    def builder(self) -> Callable[..., Any]:
        """The build callable (a ``"module:callable"`` is imported here)."""
        if callable(self.build):
            return self.build
        module, _, attr = self.build.partition(":")
        return getattr(importlib.import_module(module), attr)


MODELS: Dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Add ``spec`` (a name registered again is replaced: re-importing a model's file is harmless)."""
    if spec.attention is not None and spec.attention not in ATTENTION_KINDS:
        raise ValueError(f"model {spec.name!r}: attention {spec.attention!r} is not one of {ATTENTION_KINDS}")
    if not spec.test_features:
        raise ValueError(f"model {spec.name!r} has no test feature")
    MODELS[spec.name] = spec
    return spec


def model_names() -> Tuple[str, ...]:
    return tuple(MODELS)


def feature_choices() -> Tuple[str, ...]:
    """Every registered model's ``model.test_feature`` values, after ``default``."""
    names: List[str] = ["default"]
    for spec in MODELS.values():
        names += [f.name for f in spec.test_features if f.name not in names]
    return tuple(names)


def get_spec(name: str) -> ModelSpec:
    """The spec of ``model.name`` = ``name``; an unknown name is one line naming the key."""
    spec = MODELS.get(name)
    if spec is None:
        raise ConfigError(f"config key 'model.name' is {name!r}; expected one of: {', '.join(MODELS)}")
    return spec


def find_spec(name: Any) -> Optional[ModelSpec]:
    """The spec of ``name``, or None (a run or a network of a model not registered here)."""
    return MODELS.get(name) if isinstance(name, str) else None


def spec_of(model: Any) -> Optional[ModelSpec]:
    """The spec of a built network (by its ``model_name``), or None."""
    return find_spec(getattr(model, "model_name", None))


# -- helpers for the entries ------------------------------------------------------------------

def ce(head: str, weight: Union[str, float]) -> LossTerm:
    """Cross-entropy on ``logits[head]``, named ``ce_<head>`` (DDP's unused-classifier check reads the name)."""
    return LossTerm(f"ce_{head}", "ce", weight, head)


def triplet(head: str, weight: Union[str, float], needs: str = "") -> LossTerm:
    """Batch-hard triplet on ``features[head]``, named ``tri_<head>``."""
    return LossTerm(f"tri_{head}", "triplet", weight, head, needs)


def strong_baseline_terms(model_cfg: Any, always: bool = False) -> List[LossTerm]:
    """BoT's triplet and center loss on ``features["global"]`` (the global feature before the
    BNNeck), any model: HA-CNN always returns that feature (``always``), the others with
    ``model.bnneck: true``."""
    needs = "" if always or getattr(model_cfg, "bnneck", False) else \
        f"model.bnneck: true for {model_cfg.name} (the loss acts on the global feature before the BNNeck)"
    return [triplet("global", "global_triplet", needs), LossTerm("center", "center", "center_weight", "global", needs)]


# -- the built-in models ----------------------------------------------------------------------

register(ModelSpec(
    name="baseline",
    label="Baseline",
    build="attnreid.models.baseline:Baseline",
    test_features=(TestFeature("global", "q* (512)"),),
    loss_terms=lambda m: [ce("global", "global_ce"), *strong_baseline_terms(m)],
))


def _mhsanet_terms(model_cfg: Any) -> List[LossTerm]:
    terms = [ce("global", "global_ce"), ce("saffm", "saffm_ce"), triplet("saffm", "saffm_triplet")]
    if model_cfg.mhsanet.rlm:
        terms += [ce("rlm", "rlm_ce"), triplet("rlm", "rlm_triplet")]
    terms += [LossTerm("fdrt", "fdrt", "lambda_fdrt"), LossTerm("ihtl", "ihtl", "lambda_ihtl"),
              LossTerm("acm", "acm", "lambda_acm"), LossTerm("attn_orth", "attn_orth", "lambda_attention_orth")]
    return terms + strong_baseline_terms(model_cfg)


def _mhsanet_validate(model_cfg: Any) -> None:
    if model_cfg.test_feature == "head" and model_cfg.test_head >= model_cfg.mhsanet.num_heads:
        raise ConfigError(f"config key 'model.test_head' is {model_cfg.test_head}; it must be < "
                          f"model.mhsanet.num_heads ({model_cfg.mhsanet.num_heads})")


register(ModelSpec(
    name="mhsanet",
    label="MHSA-Net",
    build="attnreid.models.mhsanet:MHSANet",
    section="mhsanet",
    test_features=(TestFeature("concat", "concat(p*, q*)"), TestFeature("star", "p* (SAFFM)", "MHSA-Net*"),
                   TestFeature("head", "P_k (k = model.test_head)"), TestFeature("global", "q*")),
    loss_terms=_mhsanet_terms,
    attention="heads",
    summary=(("heads K / fusion", ("model.mhsanet.num_heads", "model.mhsanet.fusion")),),
    validate=_mhsanet_validate,
))

register(ModelSpec(
    name="hacnn",
    label="HA-CNN",
    build="attnreid.models.hacnn:build_hacnn",
    section="hacnn",
    test_features=(TestFeature("joint", "global+local"), TestFeature("global", "global"),
                   TestFeature("local", "local")),
    loss_terms=lambda m: [ce("global", "global_ce"), ce("local", 1.0), *strong_baseline_terms(m, always=True)],
    backbone=False,
    attention="levels",
    onnx_min_opset=16,  # GridSample entered the ONNX standard in opset 16
    onnx_opset_reason="its hard attention uses grid_sample",
    summary=(("attention", ("model.hacnn.attention",)),),
))
