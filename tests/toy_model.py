"""A third model in one file: the network and its registry entry (docs/design.md, "Adding a model")."""

import torch
from torch import nn

from attnreid.models.registry import ModelSpec, TestFeature, ce, register, triplet


class ToyNet(nn.Module):
    """conv 3x3 / 4 + BN + ReLU -> K attention maps over the grid -> the mean of the K pooled vectors."""

    model_name = "toy"

    def __init__(self, model_cfg, num_classes: int, width: int = 16, heads: int = 2):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=4, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.attend = nn.Conv2d(width, heads, 1)
        self.classifiers = nn.ModuleDict({"global": nn.Linear(width, num_classes)})
        self.feature_dim = self.global_dim = width

    def _features(self, x: torch.Tensor):
        fmap = self.stem(x)  # B x C x h x w
        alpha = self.attend(fmap).flatten(2).softmax(dim=2)  # B x K x J: each head sums to 1 over the grid
        f = torch.einsum("bkj,bcj->bc", alpha, fmap.flatten(2)) / alpha.shape[1]
        return f, alpha, fmap.shape[-2:]

    def forward(self, x: torch.Tensor):
        f, alpha, _ = self._features(x)
        if not self.training:
            return f  # eval mode: the test feature
        return {"logits": {"global": self.classifiers["global"](f)}, "features": {"global": f}, "alpha": alpha}

    def forward_attention(self, x: torch.Tensor):
        f, alpha, (h, w) = self._features(x)
        return {"feature": f, "attention": alpha.reshape(*alpha.shape[:2], h, w)}


register(ModelSpec(
    name="toy",
    label="Toy",
    build=ToyNet,
    test_features=(TestFeature("global", "the attention-pooled feature"),),
    loss_terms=lambda model_cfg: [ce("global", "global_ce"), triplet("global", "global_triplet")],
    backbone=False,
    attention="heads",
))
