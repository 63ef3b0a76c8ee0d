"""The Global Feature Branch (MHSA-Net Sec. IV), alone it is the paper's Baseline; and BNNeck.

``Q(x)`` (B x C x h x w) -> GAP -> q (B x C) -> 1x1 conv C->512 + BatchNorm + ReLU
-> q* (B x 512) -> linear classifier -> L_CE. No triplet loss acts on q* (Sec. IV).

BNNeck (Luo et al., "Bag of Tricks and a Strong Baseline for Deep Person Re-identification",
CVPR-W 2019, "BoT"): ``model.bnneck: true`` puts a BatchNorm1d (shift frozen at 0) between a
feature and its bias-free classifier: the triplet (and center) loss acts on the feature f_t
before the BN, CE on f_i = BN(f_t) after it, and the test feature is f_i. It is a property
of the classifier heads (:class:`BNNeckClassifier`), so every model takes it; ``neck(...)``
gives a head's after-BN feature. ``model.global_reduce: false`` makes q = GAP(Q) the global
feature (no 1x1 conv), BoT's ResNet-50 baseline (2048-d).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnreid.errors import AttnReidError
from attnreid.models.backbones import build_backbone
from attnreid.models.output import TrainOutput
from attnreid.models.registry import get_spec


def make_classifier(in_dim: int, num_classes: int, bnneck: bool = False) -> nn.Module:
    """A linear identity classifier (one per CE head), small-normal initialised; with ``bnneck``
    a :class:`BNNeckClassifier`."""
    if bnneck:
        return BNNeckClassifier(in_dim, num_classes)
    fc = nn.Linear(in_dim, num_classes)
    nn.init.normal_(fc.weight, std=0.001)
    nn.init.zeros_(fc.bias)
    return fc


class BNNeckClassifier(nn.Module):
    """BoT's BNNeck: f_i = BatchNorm1d(f_t) with the shift frozen at 0, then a bias-free linear layer.

    BoT removes the BN's bias and the classifier's bias so that f_i stays centred on the
    hypersphere the CE's linear boundaries cut (its Sec. 3.6). ``bn`` is applied to the test
    feature as well (``neck``). B x D -> B x num_classes.
    """

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(in_dim)
        nn.init.ones_(self.bn.weight)
        nn.init.zeros_(self.bn.bias)
        self.bn.bias.requires_grad_(False)
        self.fc = nn.Linear(in_dim, num_classes, bias=False)
        nn.init.normal_(self.fc.weight, std=0.001)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(feature))


def neck(classifiers: nn.ModuleDict, head: str, feature: torch.Tensor) -> torch.Tensor:
    """The after-BN feature f_i of a BNNeck head (the feature itself for a plain classifier,
    or when the classifiers are detached, as the ONNX exporter does for plain ones)."""
    classifier = classifiers[head] if head in classifiers else None
    return classifier.bn(feature) if isinstance(classifier, BNNeckClassifier) else feature


class GlobalFeatureBranch(nn.Module):
    """Sec. IV: q* = ReLU(BN(conv1x1(GAP(Q)))), B x C x h x w -> B x ``embed_dim``.

    The 1x1 conv has no bias: the BatchNorm after it carries one. ``reduce=False``: q =
    GAP(Q) itself, B x C (BoT's global feature); ``out_dim`` is the width either way.
    """

    def __init__(self, in_channels: int, embed_dim: int = 512, reduce: bool = True):
        super().__init__()
        self.reduce = nn.Sequential(
            nn.Conv2d(in_channels, embed_dim, 1, bias=False),
            nn.BatchNorm2d(embed_dim),
            nn.ReLU(inplace=True),
        ) if reduce else None
        self.out_dim = embed_dim if reduce else in_channels

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        q = F.adaptive_avg_pool2d(feature_map, 1)
        return (self.reduce(q) if self.reduce is not None else q).flatten(1)


class Baseline(nn.Module):
    """Backbone + Global Feature Branch + one classifier (the paper's "Baseline" row).

    Training forward (a :class:`~attnreid.models.output.TrainOutput`): ``{"logits": {"global":
    B x C}, "features": {}, "q_star": B x 512}``;
    with ``model.bnneck`` ``features`` holds ``{"global": q*}`` (before the BN, for the triplet
    and center losses) and the logits come after the BN. Eval forward: q* (B x 512), after
    the BNNeck's BN when it is on, then L2-normalised if ``feature_norm``.
    Classifiers live in ``self.classifiers`` (a ModuleDict), which
    :func:`attnreid.models.complexity.count_params` leaves out on request.
    """

    model_name = "baseline"

    def __init__(self, model_cfg, num_classes: int):
        super().__init__()
        get_spec(self.model_name).test_feature(model_cfg)  # the baseline has only q*
        self.backbone = build_backbone(model_cfg.backbone)
        self.global_branch = GlobalFeatureBranch(self.backbone.out_channels, model_cfg.mhsanet.embed_dim,
                                                 reduce=bool(getattr(model_cfg, "global_reduce", True)))
        self.bnneck = bool(getattr(model_cfg, "bnneck", False))
        dim = self.global_branch.out_dim
        self.classifiers = nn.ModuleDict({"global": make_classifier(dim, num_classes, self.bnneck)})
        self.feature_norm = bool(model_cfg.feature_norm)
        self.feature_dim = dim
        self.global_dim = dim
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor):
        q_star = self.global_branch(self.backbone(x))
        if not self.training:
            f = neck(self.classifiers, "global", q_star)
            return F.normalize(f, dim=1) if self.feature_norm else f
        out: TrainOutput = {
            "logits": {"global": self.classifiers["global"](q_star)},
            "features": {"global": q_star} if self.bnneck else {},
            "q_star": q_star,
        }
        return out

    def forward_attention(self, x: torch.Tensor):
        raise AttnReidError("model 'baseline' has no attention maps; use an mhsanet or hacnn model")
