"""The Global Feature Branch (MHSA-Net Sec. IV), alone it is the paper's Baseline.

``Q(x)`` (B x C x h x w) -> GAP -> q (B x C) -> 1x1 conv C->512 + BatchNorm + ReLU
-> q* (B x 512) -> linear classifier -> L_CE. No triplet loss acts on q* (Sec. IV).
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from attnreid.errors import AttnReidError, ConfigError
from attnreid.models.backbones import build_backbone


def make_classifier(in_dim: int, num_classes: int) -> nn.Linear:
    """A linear identity classifier (one per CE head), small-normal initialised."""
    fc = nn.Linear(in_dim, num_classes)
    nn.init.normal_(fc.weight, std=0.001)
    nn.init.zeros_(fc.bias)
    return fc


class GlobalFeatureBranch(nn.Module):
    """Sec. IV: q* = ReLU(BN(conv1x1(GAP(Q)))), B x C x h x w -> B x ``embed_dim``.

    The 1x1 conv has no bias: the BatchNorm after it carries one.
    """

    def __init__(self, in_channels: int, embed_dim: int = 512):
        super().__init__()
        self.reduce = nn.Sequential(
            nn.Conv2d(in_channels, embed_dim, 1, bias=False),
            nn.BatchNorm2d(embed_dim),
            nn.ReLU(inplace=True),
        )

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        q = F.adaptive_avg_pool2d(feature_map, 1)
        return self.reduce(q).flatten(1)


class Baseline(nn.Module):
    """Backbone + Global Feature Branch + one classifier (the paper's "Baseline" row).

    Training forward: ``{"logits": {"global": B x C}, "features": {}, "q_star": B x 512}``.
    Eval forward: q* (B x 512), L2-normalised if ``feature_norm``.
    Classifiers live in ``self.classifiers`` (a ModuleDict), which
    :func:`attnreid.models.complexity.count_params` leaves out on request.
    """

    model_name = "baseline"

    def __init__(self, model_cfg, num_classes: int):
        super().__init__()
        if model_cfg.test_feature not in ("default", "global"):
            raise ConfigError(f"config key 'model.test_feature' is {model_cfg.test_feature!r}; the baseline only has 'global' (q*)")
        embed_dim = model_cfg.mhsanet.embed_dim
        self.backbone = build_backbone(model_cfg.backbone)
        self.global_branch = GlobalFeatureBranch(self.backbone.out_channels, embed_dim)
        self.classifiers = nn.ModuleDict({"global": make_classifier(embed_dim, num_classes)})
        self.feature_norm = bool(model_cfg.feature_norm)
        self.feature_dim = embed_dim
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor):
        q_star = self.global_branch(self.backbone(x))
        if not self.training:
            return F.normalize(q_star, dim=1) if self.feature_norm else q_star
        out: Dict[str, object] = {
            "logits": {"global": self.classifiers["global"](q_star)},
            "features": {},
            "q_star": q_star,
        }
        return out

    def forward_attention(self, x: torch.Tensor):
        raise AttnReidError("model 'baseline' has no attention maps; use an mhsanet or hacnn model")
