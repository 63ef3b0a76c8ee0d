"""Losses: the weighted sum a model's config asks for (MHSA-Net Eq. 8, 10, 11, 13).

``build_criterion(loss_cfg, model_cfg)`` returns a :class:`Criterion`;
``criterion(outputs, labels) -> (total, terms)``, where ``outputs`` is a model's
training-mode output (:class:`~attnreid.models.output.TrainOutput`) and ``terms`` maps each
computed term to its *unweighted* value (a detached 0-dim tensor); ``total = sum(weight *
term)``. Which terms a model has, in which order, with which weight key, is its registry
entry's ``loss_terms`` (:mod:`attnreid.models.registry`); the table below is the built-in
models' terms.

=============  =================================  =====================  ========
term           what                               weight (config)        paper
=============  =================================  =====================  ========
``ce_global``  CE on q*                           1 if loss.global_ce    L_GFB
``ce_saffm``   CE on p*                           loss.saffm_ce          Eq. 8
``tri_saffm``  batch-hard triplet on p*           loss.saffm_triplet     Eq. 4, 8
``ce_rlm``     CE on z (if model.mhsanet.rlm)     loss.rlm_ce            Eq. 10
``tri_rlm``    batch-hard triplet on z            loss.rlm_triplet       Eq. 4, 10
``fdrt``       FDRT on P                          loss.lambda_fdrt       Eq. 3, 11
``ihtl``       IHTL on P                          loss.lambda_ihtl       Eq. 5, 11
``acm``        ACM on alpha                       loss.lambda_acm        Eq. 12, 13
``attn_orth``  ||A A^T - I||^2 on alpha           loss.lambda_attention  not in the paper
                                                  _orth (default 0)      ([56], option)
``ce_local``   CE on HA-CNN's local feature       1                      HA Sec. 3
``tri_global`` batch-hard triplet on the global   loss.global_triplet    BoT
               feature (before the BNNeck)
``center``     center loss on the same feature    loss.center_weight     BoT
=============  =================================  =====================  ========

``tri_global`` and ``center`` (the strong baseline's, any model) act on
``features["global"]``, which HA-CNN always returns and the baseline and MHSA-Net return
with ``model.bnneck: true``. The center loss's centres live in the criterion
(:mod:`attnreid.losses.center`: they need their own optimiser, see there), so
``build_criterion`` then needs ``num_classes`` and ``global_dim`` (the model's).

How each term is computed (docs/spec.md §1; defaults first):

- triplets on p* and z: ``loss.triplet_distance`` euclidean | squared,
  ``loss.triplet_margin`` soft | a number (the paper gives neither; default the
  authors' code: Euclidean distance, soft margin);
- IHTL: ``loss.ihtl_distance`` euclidean | squared, ``loss.ihtl_margin`` soft | a
  number (default the authors' code; the paper writes squared with m = 3.0, see
  ``configs/mhsanet/paper_literal.yaml``);
- FDRT: ``loss.fdrt_form`` paper (Eq. 3) | gram (the authors' code);
- ACM: ``loss.acm_form`` paper (Eq. 12) | linear (the authors' code), threshold
  ``loss.acm_gamma``.

Batch-hard mining across processes: under DDP each rank holds ``data.batch_size`` images
of the step's batch. With ``loss.gather_triplets`` (default true) the mined terms
(``tri_saffm``, ``tri_rlm``, ``ihtl``) first gather every rank's features, with gradient,
and labels (:func:`attnreid.distributed.all_gather_with_grad`), so anchors are mined within
the whole step's batch as the authors mined within their batch of 128; every rank then
computes the same value of those terms and DDP's gradient average gives the one-process
gradient. With one process the gather is the identity.

A term whose weight is 0 is not computed, so each Table V ablation row is a set of
weights (e.g. Baseline+MHSAM: lambda_fdrt = lambda_ihtl = lambda_acm = 0). A new kind of
term is one more entry in :func:`build_criterion`'s ``kinds`` (and in
:data:`~attnreid.models.registry.TERM_KINDS`); a model uses it by naming it in its entry.
:mod:`attnreid.losses.balance` measures each term's gradient at the backbone.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from attnreid.choices import ACM_FORMS, DISTANCES, FDRT_FORMS, parse_margin
from attnreid.distributed import all_gather_labels, all_gather_with_grad
from attnreid.errors import ConfigError
from attnreid.losses.center import CenterLoss, center_parameters
from attnreid.losses.regularizers import attention_competition, attention_orthogonality, feature_diversity
from attnreid.losses.triplet import batch_hard_triplet, improved_hard_triplet
from attnreid.models.registry import get_spec

Term = Tuple[str, float, Callable[[dict, torch.Tensor], torch.Tensor]]


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Softmax cross-entropy, optionally with label smoothing epsilon (the papers use none)."""
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


class Criterion(nn.Module):
    """The weighted sum of the terms chosen at build time (each a name, weight and function)."""

    def __init__(self, terms: List[Term], classifier_heads: Sequence[str] = ()):
        super().__init__()
        if not terms:
            raise ConfigError("every loss weight is 0: the model would not train (check the loss.* weights)")
        self.terms = terms
        self.weights = {name: weight for name, weight, _ in terms}
        self._classifier_heads = tuple(classifier_heads)

    def classifier_heads(self) -> Tuple[str, ...]:
        """The heads of ``outputs["logits"]`` some term reads; a model classifier not listed
        gets no gradient (DDP then needs ``find_unused_parameters``)."""
        return self._classifier_heads

    def term_values(self, outputs: dict, labels: torch.Tensor) -> Dict[str, Tuple[float, torch.Tensor]]:
        """Each term's (weight, unweighted value), values still attached to the graph."""
        return {name: (weight, fn(outputs, labels)) for name, weight, fn in self.terms}

    def forward(self, outputs: dict, labels: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        values = self.term_values(outputs, labels)
        total = sum(weight * value for weight, value in values.values())
        return total, {name: value.detach() for name, (_, value) in values.items()}  # type: ignore[return-value]

    def extra_repr(self) -> str:
        return ", ".join(f"{name}*{weight:g}" for name, weight, _ in self.terms)


def build_criterion(loss_cfg, model_cfg, num_classes: Optional[int] = None,
                    global_dim: Optional[int] = None) -> Criterion:
    """The total loss for ``model_cfg.name`` with the weights of ``loss_cfg`` (Eq. 11 + 13).

    The terms are the model's registry entry's (:class:`~attnreid.models.registry.LossTerm`:
    name, kind, weight key, head), in its order; this function knows how to compute each kind
    (:data:`~attnreid.models.registry.TERM_KINDS`) and never tests a model's name.
    Distances, margins and forms are read and checked here, once: a bad value is a
    :class:`ConfigError` naming its ``loss.*`` key. ``num_classes`` and ``global_dim``
    (``model.global_dim``) size the centres when ``loss.center_weight > 0``.
    """
    eps = loss_cfg.label_smoothing
    tri_distance = _check_choice(loss_cfg.triplet_distance, DISTANCES, "loss.triplet_distance")
    tri_margin = parse_margin(loss_cfg.triplet_margin, "loss.triplet_margin")
    ihtl_distance = _check_choice(loss_cfg.ihtl_distance, DISTANCES, "loss.ihtl_distance")
    ihtl_margin = parse_margin(loss_cfg.ihtl_margin, "loss.ihtl_margin")
    fdrt_form = _check_choice(loss_cfg.fdrt_form, FDRT_FORMS, "loss.fdrt_form")
    acm_form = _check_choice(loss_cfg.acm_form, ACM_FORMS, "loss.acm_form")
    gamma = loss_cfg.acm_gamma

    gather = bool(loss_cfg.gather_triplets)

    def mining_batch(x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return (all_gather_with_grad(x), all_gather_labels(y)) if gather else (x, y)

    center: Optional[CenterLoss] = None

    def centres(head: str):
        nonlocal center
        if num_classes is None or global_dim is None:
            raise ConfigError("config key 'loss.center_weight' > 0 needs the centres' size: "
                              "build_criterion(..., num_classes=..., global_dim=model.global_dim)")
        center = CenterLoss(num_classes, global_dim)
        return lambda out, y: center(out["features"][head], y)

    # Each kind of term: what it reads from the training output (TrainOutput) and computes.
    kinds = {
        "ce": lambda head: lambda out, y: cross_entropy(out["logits"][head], y, eps),
        "triplet": lambda head: lambda out, y: batch_hard_triplet(*mining_batch(out["features"][head], y),
                                                                  tri_margin, tri_distance),
        "center": centres,
        "fdrt": lambda _: lambda out, y: feature_diversity(out["P"], fdrt_form),
        "ihtl": lambda _: lambda out, y: improved_hard_triplet(*mining_batch(out["P"], y), ihtl_margin,
                                                               ihtl_distance),
        "acm": lambda _: lambda out, y: attention_competition(out["alpha"], gamma, acm_form),
        "attn_orth": lambda _: lambda out, y: attention_orthogonality(out["alpha"]),
    }
    kept: List[Term] = []
    heads: List[str] = []  # the logits heads some term reads
    for term in get_spec(model_cfg.name).loss_terms(model_cfg):
        weight = _weight(loss_cfg, term.weight)
        if weight == 0:
            continue  # a term whose weight is 0 is not computed
        if term.needs:
            raise ConfigError(f"config key 'loss.{term.weight}' needs {term.needs}")
        if term.kind not in kinds:
            raise ValueError(f"model {model_cfg.name!r}: loss term {term.name!r} has kind {term.kind!r}; "
                             f"the criterion computes {', '.join(kinds)}")
        kept.append((term.name, weight, kinds[term.kind](term.head)))
        if term.kind == "ce":
            heads.append(term.head)
    criterion = Criterion(kept, classifier_heads=heads)
    if center is not None:
        criterion.center = center  # registered, so .to(device) and state_dict() carry the centres
    return criterion


def _weight(loss_cfg, weight) -> float:
    """A term's weight: a fixed number, or the value of its ``loss.*`` key (a boolean weighs 1 or 0)."""
    return float(getattr(loss_cfg, weight)) if isinstance(weight, str) else float(weight)


def _check_choice(value: str, allowed, key: str) -> str:
    if value not in allowed:
        raise ConfigError(f"config key '{key}' is {value!r}; expected one of: {', '.join(allowed)}")
    return value


__all__ = ["Criterion", "build_criterion", "cross_entropy", "batch_hard_triplet", "improved_hard_triplet",
           "feature_diversity", "attention_competition", "attention_orthogonality", "CenterLoss",
           "center_parameters"]
