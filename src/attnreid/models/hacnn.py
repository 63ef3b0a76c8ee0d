"""HA-CNN: Harmonious Attention CNN (Li, Zhu, Gong, CVPR 2018), docs/spec.md §2.

Shapes are for the paper's 160x64 input, widths d = (128, 256, 384) and T = 4:

    image B x 3 x 160 x 64
    stem   3x3 conv 32, stride 2                                   -> B x 32 x 80 x 32
    level 1: Inception-A(d1) -> Inception-B(d1) -> HA module       -> B x 128 x 40 x 16
    level 2: Inception-A(d2) -> Inception-B(d2) -> HA module       -> B x 256 x 20 x 8
    level 3: Inception-A(d3) -> Inception-B(d3) -> HA module       -> B x 384 x 10 x 4
    global:  GAP -> FC 512                                          -> B x 512
    local:   T streams (shared weights), level l crops the level's *input* map with
             the level's hard attention (24x28, 12x14, 6x7) -> Inception-B
             -> B*T x 128 x 12 x 14 -> B*T x 256 x 6 x 7 -> B*T x 384 x 3 x 4
             -> GAP, concatenate T vectors -> FC 512                 -> B x 512

Choices where the paper leaves room (docs/spec.md §2), each visible in one place below:

* Every conv of the backbone and of the local streams is conv (no bias, BN follows)
  + BN + ReLU.
* Spatial attention (HA Eq. 2, Fig. 3b) has exactly the paper's 10 parameters: a 3x3
  stride-2 conv 1->1 without bias (9) + BN without affine pair (0) + ReLU, and a 1x1
  scaling conv without bias (1) and with no BN (a BN after it would cancel the scale
  it exists to learn). Without the BN the ReLU would start dead for about half of the
  seeds (the channel mean is positive, so the map's sign is the sign of the kernel
  sum) and never recover.
* Channel attention (HA Eq. 3-4) is exactly ``ReLU(W2 ReLU(W1 x))`` with bias-free
  W1 (c/r x c) and W2 (c x c/r): 2c^2/r parameters as the paper states, r = 16.
* The fusion conv after the product (HA Eq. 1) is conv c->c + BN + ReLU, and the
  sigmoid follows the ReLU, so the soft attention lies in [0.5, 1): the paper's
  "range between 0.5 and 1".
* Hard attention (HA Eq. 5): an FC with bias from the level's channel GAP vector to
  2T values, tanh; theta_k = [[s_w, 0, t_x], [0, s_h, t_y]] in affine_grid's (x, y)
  order. The bias is atanh of the stripe centres, so that the regions start centred
  on T horizontal stripes (torchreid writes the centres into the bias before the
  tanh, which makes its initial stripes overlap). Regions are sampled directly at the
  crop size (24x28, 12x14, 6x7) by one bilinear grid_sample.
* Region scale (``region_scale``), fixed as the paper says but not to what value:
  ``stripes`` (default) s_w = 1, s_h = 1/T: each region is a full-width 1/T stripe of
  the level's input, resampled to the crop size. ``native``: the region is the crop
  size itself measured on the level's input (24x28 of 80x32, 12x14 of 40x16, 6x7 of
  20x8 at 160x64, i.e. s_h = 0.3 and s_w = 0.875 at every level), so nothing is
  stretched. With T = 4 such a region is 1.2 stripes tall: started on the stripe
  centres, neighbours overlap by 0.2 stripe and the outer two reach 0.1 stripe past
  the edge (read as zeros).
* Without hard attention (``attention`` none, spatial, channel, soft) the local streams
  crop fixed horizontal stripes (the initial regions), the JLML-style local branch the
  paper's ablation rows imply.
* Cross-attention interaction (``cross_attention``, HA Eq. 6-7, Table 6 "w/o CAIL"):
  ``on`` as written. ``off``: a stream only sees the level-1 crop of the shared stem;
  levels 2 and 3 take no crop, so their hard attention is not built and the global
  branch gets no gradient from the local loss beyond the level-1 regions. ``detach``,
  the other reading of "w/o CAIL": the forward pass is ``on``'s (hard regional
  attention at levels 2-3, Eq. 6's addition), but Eq. 7's second term is removed: the
  global maps cropped at levels 2-3 and the global vectors their hard attention reads
  are detached, so the local loss trains no global-branch layer through them; the
  hard attention's own FC is still trained by it through the sampling grid (else it
  would never leave the stripes). YAML ``true``/``false`` mean ``on``/``off``.
* FC 512 layers are Linear (no bias) + BN1d + ReLU; the classifiers are plain Linear
  layers in the ``classifiers`` ModuleDict (``global``, ``local``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from attnreid.choices import CROSS_ATTENTION_MODES, HACNN_ATTENTION as ATTENTION_MODES, REGION_SCALES
from attnreid.errors import ConfigError
from attnreid.models.baseline import BNNeckClassifier, make_classifier, neck
from attnreid.models.output import TrainOutput
from attnreid.models.registry import get_spec

CHANNEL_REDUCTION = 16  # r of HA Eq. 4
STEM_CHANNELS = 32
REGION_SIZES = ((24, 28), (12, 14), (6, 7))  # hard-attention crop (h, w) at levels 1..3
# ``native``: the crop sizes above as fractions of each level's input at 160x64
# (80x32, 40x16, 20x8): 24/80 = 12/40 = 6/20 = 0.3, 28/32 = 14/16 = 7/8 = 0.875.
NATIVE_SCALE = (0.875, 0.3)  # (s_w, s_h)


def cross_attention_mode(value: Any) -> str:
    """``model.hacnn.cross_attention`` as on | off | detach (``True``/``False`` are on/off)."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value not in CROSS_ATTENTION_MODES:
        raise ConfigError(f"config key 'model.hacnn.cross_attention' is {value!r}; expected one of: "
                          + ", ".join(CROSS_ATTENTION_MODES) + " (or true/false)")
    return value


def region_scale_factors(region_scale: str, num_regions: int) -> Tuple[float, float]:
    """(s_w, s_h) of HA Eq. 5 for ``region_scale``: stripes (1, 1/T) or native (0.875, 0.3)."""
    if region_scale not in REGION_SCALES:
        raise ConfigError(f"config key 'model.hacnn.region_scale' is {region_scale!r}; expected one of: "
                          + ", ".join(REGION_SCALES))
    return (1.0, 1.0 / num_regions) if region_scale == "stripes" else NATIVE_SCALE


class ConvBNReLU(nn.Sequential):
    """conv (no bias: the BN shift replaces it) + BN + ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1):
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class InceptionA(nn.Module):
    """Inception-A unit of width d (HA Fig. 2; BN-Inception / Inception-v4 layout).

    Four branches of d/4 channels each, resolution kept:
    1x1 | 1x1 -> 3x3 | 1x1 -> 3x3 -> 3x3 | 3x3 avg pool -> 1x1.
    """

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        mid = out_ch // 4
        self.branch1 = ConvBNReLU(in_ch, mid, 1)
        self.branch3 = nn.Sequential(ConvBNReLU(in_ch, mid, 1), ConvBNReLU(mid, mid, 3))
        self.branch33 = nn.Sequential(
            ConvBNReLU(in_ch, mid, 1), ConvBNReLU(mid, mid, 3), ConvBNReLU(mid, mid, 3)
        )
        self.branch_pool = nn.Sequential(
            nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False), ConvBNReLU(in_ch, mid, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch3(x), self.branch33(x), self.branch_pool(x)], 1)


class InceptionB(nn.Module):
    """Inception-B (reduction) unit of width d: halves height and width (HA Fig. 2).

    Branches 1x1 -> 3x3/2 (d/4) | 1x1 -> 3x3 -> 3x3/2 (d/4) | 3x3/2 max pool -> 1x1 (d/2).
    """

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        mid = out_ch // 4
        self.branch3 = nn.Sequential(ConvBNReLU(in_ch, mid, 1), ConvBNReLU(mid, mid, 3, stride=2))
        self.branch33 = nn.Sequential(
            ConvBNReLU(in_ch, mid, 1), ConvBNReLU(mid, mid, 3), ConvBNReLU(mid, mid, 3, stride=2)
        )
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, stride=2, padding=1), ConvBNReLU(in_ch, out_ch - 2 * mid, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch3(x), self.branch33(x), self.branch_pool(x)], 1)


def cross_channel_mean(x: torch.Tensor) -> torch.Tensor:
    """HA Eq. 2: S_input = (1/c) sum_i X[:, :, i]; B x c x h x w -> B x 1 x h x w."""
    return x.mean(dim=1, keepdim=True)


def channel_squeeze(x: torch.Tensor) -> torch.Tensor:
    """HA Eq. 3: C_input = (1/(h w)) sum_{i,j} X[i, j, :]; B x c x h x w -> B x c."""
    return x.mean(dim=(2, 3))


def soft_attention_product(spatial: Optional[torch.Tensor], channel: Optional[torch.Tensor],
                           like: torch.Tensor) -> torch.Tensor:
    """HA Eq. 1: A = S x C, S: B x 1 x h x w, C: B x c x 1 x 1 -> A: B x c x h x w.

    For the single-attention ablations the missing factor is 1 (so A is S broadcast
    over channels, or C broadcast over positions), shaped like ``like``.
    """
    if spatial is not None and channel is not None:
        return spatial * channel
    factor = spatial if spatial is not None else channel
    return factor.expand_as(like)


def region_transforms(translations: torch.Tensor, num_regions: int,
                      scale: Optional[Tuple[float, float]] = None) -> torch.Tensor:
    """HA Eq. 5: theta_k = [[s_w, 0, t_x], [0, s_h, t_y]], (s_w, s_h) = ``scale`` (default (1, 1/T)).

    ``translations``: B x T x 2 (t_x, t_y) in [-1, 1] (after the tanh), normalised
    feature-map coordinates. Returns B x T x 2 x 3 in ``F.affine_grid``'s convention
    (row 0 maps the output's x, row 1 its y, into the input's normalised coordinates).
    """
    s_w, s_h = scale if scale is not None else (1.0, 1.0 / num_regions)
    b, t, _ = translations.shape
    theta = translations.new_zeros(b, t, 2, 3)
    theta[..., 0, 0] = s_w
    theta[..., 1, 1] = s_h
    theta[..., :, 2] = translations
    return theta


def stripe_translations(num_regions: int) -> torch.Tensor:
    """(t_x, t_y) of T horizontal stripes, top to bottom: t_y = -1 + (2k + 1)/T; T x 2."""
    ty = torch.tensor([-1.0 + (2 * k + 1) / num_regions for k in range(num_regions)])
    return torch.stack([torch.zeros(num_regions), ty], dim=1)


def sample_regions(x: torch.Tensor, theta: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Crop T regions of ``x`` (B x C x H x W) by the affine ``theta`` (B x T x 2 x 3).

    Bilinear sampling straight at ``size`` (h, w); outside the map reads zeros (HA: a
    region may leave the image when only part of the person was detected). The T
    grids are stacked along the height so ``x`` is read once, not copied T times.
    Returns B x T x C x h x w, laid out so that ``flatten(0, 1)`` is a channels-last
    (B*T) x C x h x w view for the local streams' convolutions.
    """
    b, c = x.shape[:2]
    t = theta.shape[1]
    h, w = size
    # float32 sampling under mixed precision: a bf16 grid would misplace a region by
    # up to a third of a pixel on the 80-pixel level-1 map.
    grid = F.affine_grid(theta.float().reshape(b * t, 2, 3), [b * t, c, h, w], align_corners=False)
    grid = grid.reshape(b, t * h, w, 2)
    crops = F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # grid_sample writes NCHW; one copy into (B, T, h, w, C) memory both separates the
    # T regions and gives the streams channels-last input (see HACNN._backbone).
    crops = crops.to(x.dtype).reshape(b, c, t, h, w).permute(0, 2, 3, 4, 1).contiguous()
    return crops.permute(0, 1, 4, 2, 3)


def region_boxes(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Boxes x1, y1, x2, y2 in pixels of a ``height`` x ``width`` image; B x T x 4.

    With align_corners=False normalised coordinate -1 is the image's left/top edge and
    +1 its right/bottom edge, whatever the feature-map stride, so the region
    [t - s, t + s] maps to pixels (t - s + 1) / 2 * size.
    """
    sx, sy = theta[..., 0, 0], theta[..., 1, 1]
    tx, ty = theta[..., 0, 2], theta[..., 1, 2]
    return torch.stack(
        [(tx - sx + 1) / 2 * width, (ty - sy + 1) / 2 * height, (tx + sx + 1) / 2 * width, (ty + sy + 1) / 2 * height],
        dim=-1,
    )


def cross_attention_interaction(local: torch.Tensor, global_crop: torch.Tensor) -> torch.Tensor:
    """HA Eq. 6: X~_L^(l,k) = X_L^(l,k) + X_G^(l,k), both B x T x c x h x w.

    X_G^(l,k) is the global map cropped by level l+1's hard attention; the addition is
    what lets the local loss reach the global branch (HA Eq. 7).
    """
    return local + global_crop


class SpatialAttention(nn.Module):
    """HA Fig. 3b, 10 parameters: channel mean (Eq. 2) -> 3x3/2 conv (9) -> BN (no affine)
    -> ReLU -> bilinear resize back -> 1x1 scaling conv (1). B x c x h x w -> B x 1 x h x w."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(1, affine=False)
        self.scale = nn.Conv2d(1, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.bn(self.conv(cross_channel_mean(x))))
        s = F.interpolate(s, size=x.shape[2:], mode="bilinear", align_corners=False)
        return self.scale(s)


class ChannelAttention(nn.Module):
    """HA Eq. 3-4, 2c^2/r parameters: C = ReLU(W2 ReLU(W1 GAP(X))), B x c -> B x c x 1 x 1.

    W1: c/r x c, W2: c x c/r as bias-free 1x1 convs (the paper counts no biases).
    """

    def __init__(self, channels: int, reduction: int = CHANNEL_REDUCTION):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.reduce = nn.Conv2d(channels, hidden, 1, bias=False)  # W1^ca
        self.expand = nn.Conv2d(hidden, channels, 1, bias=False)  # W2^ca

    def forward(self, squeezed: torch.Tensor) -> torch.Tensor:
        z = squeezed[:, :, None, None]
        return F.relu(self.expand(F.relu(self.reduce(z))))


class HardAttention(nn.Module):
    """HA Eq. 5 and Fig. 3d: FC (c -> 2T, with bias) on the channel GAP vector, tanh.

    Returns the T region transforms B x T x 2 x 3 of size ``scale`` (s_w, s_h). Zero
    weights and a bias of atanh(stripe centres) centre the initial regions on T
    horizontal stripes (exact stripes at the default scale).
    """

    def __init__(self, channels: int, num_regions: int, scale: Optional[Tuple[float, float]] = None):
        super().__init__()
        self.num_regions = num_regions
        self.scale = scale
        self.fc = nn.Linear(channels, 2 * num_regions)
        nn.init.zeros_(self.fc.weight)
        with torch.no_grad():
            self.fc.bias.copy_(torch.atanh(stripe_translations(num_regions)).flatten())

    def forward(self, squeezed: torch.Tensor) -> torch.Tensor:
        t = torch.tanh(self.fc(squeezed)).view(-1, self.num_regions, 2)
        return region_transforms(t, self.num_regions, self.scale)


class HarmoniousAttention(nn.Module):
    """HA module (Fig. 3) on X^l (B x c x h x w).

    Soft attention (Eq. 1): sigmoid(ReLU(BN(conv1x1(S x C)))), in [0.5, 1); the block
    output is X * A. Hard attention (Eq. 5): the T region transforms. Either part is
    absent when the ablation switches it off. ``detach_hard``: the hard attention reads
    a detached copy of the channel vector (``cross_attention: detach``).
    """

    def __init__(self, channels: int, num_regions: int, spatial: bool, channel: bool, hard: bool,
                 region_scale: Optional[Tuple[float, float]] = None, detach_hard: bool = False):
        super().__init__()
        self.spatial = SpatialAttention() if spatial else None
        self.channel = ChannelAttention(channels) if channel else None
        self.fuse = ConvBNReLU(channels, channels, 1) if (spatial or channel) else None
        self.hard = HardAttention(channels, num_regions, region_scale) if hard else None
        self.detach_hard = detach_hard

    def soft_attention(self, x: torch.Tensor, squeezed: torch.Tensor) -> torch.Tensor:
        s = self.spatial(x) if self.spatial is not None else None
        c = self.channel(squeezed) if self.channel is not None else None
        product = soft_attention_product(s, c, x).contiguous(memory_format=torch.channels_last)
        return torch.sigmoid(self.fuse(product))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Returns (attended X, soft attention B x c x h x w or None, theta B x T x 2 x 3 or None)."""
        squeezed = channel_squeeze(x)
        attention = self.soft_attention(x, squeezed) if self.fuse is not None else None
        theta = self.hard(squeezed.detach() if self.detach_hard else squeezed) if self.hard is not None else None
        return (x * attention if attention is not None else x), attention, theta


class HACNN(nn.Module):
    """Harmonious Attention CNN, global and local branch (HA Fig. 2, docs/spec.md §2).

    ``forward`` in training mode: ``{"logits": {"global", "local"}, "features":
    {"global", "local"}}``; in eval mode the test feature (``test_feature``: joint =
    [L2(global); L2(local)], 1024-d, or one of them, 512-d; ``feature_norm`` then
    L2-normalises the whole vector).
    """

    model_name = "hacnn"

    def __init__(
        self,
        num_classes: int,
        attention: str = "all",
        cross_attention: Any = "on",
        num_regions: int = 4,
        widths: Sequence[int] = (128, 256, 384),
        embed_dim: int = 512,
        test_feature: str = "joint",
        feature_norm: bool = False,
        region_scale: str = "stripes",
        bnneck: bool = False,
    ):
        super().__init__()
        mode = cross_attention_mode(cross_attention)
        scale = region_scale_factors(region_scale, num_regions)
        self.attention = attention
        self.cross_attention = mode
        self.region_scale = region_scale
        # detach: Eq. 6 as in "on", Eq. 7's second term cut at the levels it sums over
        self.detach_interaction = mode == "detach"
        self.num_regions = num_regions
        self.test_feature = test_feature
        self.feature_norm = feature_norm
        self.learn_regions = attention in ("hard", "all")
        spatial = attention in ("spatial", "soft", "all")
        channel = attention in ("channel", "soft", "all")
        d1, d2, d3 = widths

        self.stem = ConvBNReLU(3, STEM_CHANNELS, 3, stride=2)
        in_widths = (STEM_CHANNELS, d1, d2)
        self.inceptions = nn.ModuleList(
            nn.Sequential(InceptionA(cin, d), InceptionB(d, d)) for cin, d in zip(in_widths, widths)
        )
        # Levels whose regions feed the local branch: all three with the interaction,
        # only level 1 (the shared stem) without it.
        self.region_levels = (0, 1, 2) if mode != "off" else (0,)
        self.ha = nn.ModuleList(
            HarmoniousAttention(d, num_regions, spatial, channel, self.learn_regions and level in self.region_levels,
                                scale, detach_hard=self.detach_interaction and level > 0)
            for level, d in enumerate(widths)
        )
        self.local_inceptions = nn.ModuleList(InceptionB(cin, d) for cin, d in zip(in_widths, widths))
        self.register_buffer("stripes", region_transforms(stripe_translations(num_regions)[None], num_regions, scale)[0],
                             persistent=False)

        self.fc_global = _embedding(d3, embed_dim)
        self.fc_local = _embedding(num_regions * d3, embed_dim)
        # The project's convention (models/__init__.py): identity classifiers live in
        # ``classifiers`` so that complexity counts and checkpoint checks can skip them.
        # bnneck (models/baseline.py): CE and the test feature after a BN, a triplet before it
        self.classifiers = nn.ModuleDict(
            {head: make_classifier(embed_dim, num_classes, bnneck) for head in ("global", "local")}
        )
        self.feature_dim = 2 * embed_dim if test_feature == "joint" else embed_dim
        self.global_dim = embed_dim
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)) and m.affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, SpatialAttention):
                nn.init.ones_(m.scale.weight)  # the fusion scale starts as the identity
        for fc in (self.fc_global[0], self.fc_local[0]):
            nn.init.kaiming_normal_(fc.weight, mode="fan_out", nonlinearity="relu")
        for clf in self.classifiers.values():
            fc = clf.fc if isinstance(clf, BNNeckClassifier) else clf
            nn.init.normal_(fc.weight, std=0.01)
            if fc.bias is not None:
                nn.init.zeros_(fc.bias)

    def _regions(self, theta: Optional[torch.Tensor], batch: int) -> torch.Tensor:
        return theta if theta is not None else self.stripes.expand(batch, -1, -1, -1)

    def _backbone(self, x: torch.Tensor) -> Dict[str, Any]:
        """Both branches; returns the 512-d features and the per-level attention.

        Activations are kept channels-last: on a CPU, oneDNN's NCHW path reorders every
        activation to a blocked layout and back around each convolution, and NCHW
        pooling is not vectorised. HA-CNN's many thin maps (1x1 convs to d/4 channels
        at 80x32, pools at full resolution) made that cost dominate a training step
        (1x1 conv 128->32 at 80x32: 47 ms NCHW vs 7 ms channels-last; 3x3/2 max pool:
        92 vs 13 ms). The values are the same up to float rounding.
        """
        b = x.shape[0]
        level_input = self.stem(x.contiguous(memory_format=torch.channels_last))
        local = None
        soft_maps: List[torch.Tensor] = []
        regions: List[torch.Tensor] = []
        for level in range(3):
            feat, attention, theta = self.ha[level](self.inceptions[level](level_input))
            if attention is not None:
                soft_maps.append(attention)
            if level in self.region_levels:
                theta = self._regions(theta, b)
                regions.append(theta)
                source = level_input.detach() if self.detach_interaction and level > 0 else level_input
                crop = sample_regions(source, theta, REGION_SIZES[level])
                local_in = crop if local is None else cross_attention_interaction(local, crop)
            else:
                local_in = local
            out = self.local_inceptions[level](local_in.flatten(0, 1).contiguous(memory_format=torch.channels_last))
            local = out.reshape(b, self.num_regions, *out.shape[1:])
            level_input = feat
        global_feat = self.fc_global(channel_squeeze(level_input))
        local_feat = self.fc_local(local.mean(dim=(3, 4)).flatten(1))
        return {"global": global_feat, "local": local_feat, "soft_attention": soft_maps, "regions": regions}

    def _test_feature(self, global_feat: torch.Tensor, local_feat: torch.Tensor) -> torch.Tensor:
        global_feat = neck(self.classifiers, "global", global_feat)
        local_feat = neck(self.classifiers, "local", local_feat)
        parts = {"global": [global_feat], "local": [local_feat], "joint": [global_feat, local_feat]}[self.test_feature]
        feature = torch.cat([F.normalize(p, dim=1) for p in parts], dim=1)
        return F.normalize(feature, dim=1) if self.feature_norm else feature

    def forward(self, x: torch.Tensor):
        out = self._backbone(x)
        if not self.training:
            return self._test_feature(out["global"], out["local"])
        train_out: TrainOutput = {
            "logits": {head: clf(out[head]) for head, clf in self.classifiers.items()},
            "features": {"global": out["global"], "local": out["local"]},
        }
        return train_out

    @torch.no_grad()
    def forward_attention(self, x: torch.Tensor) -> Dict[str, Any]:
        """Test feature plus what the attention looked at, for visualisation.

        ``soft_attention``: list over levels of B x h_l x w_l, the soft attention
        averaged over channels (empty when ``attention`` is none or hard; constant over
        positions for channel-only). ``regions``: list of B x T x 4 boxes x1, y1, x2, y2
        in input-image pixels, one per level in ``region_levels`` (1-based: [1, 2, 3],
        or [1] without cross-attention); fixed stripes when hard attention is off.
        """
        out = self._backbone(x)
        h, w = x.shape[2:]
        return {
            "feature": self._test_feature(out["global"], out["local"]),
            "soft_attention": [a.mean(dim=1) for a in out["soft_attention"]],
            "regions": [region_boxes(t, h, w) for t in out["regions"]],
            "region_levels": [level + 1 for level in self.region_levels],
        }


def _embedding(in_dim: int, out_dim: int) -> nn.Sequential:
    """FC feature layer (HA Fig. 2, 512 outputs) + BN + ReLU, as every layer of the net."""
    return nn.Sequential(nn.Linear(in_dim, out_dim, bias=False), nn.BatchNorm1d(out_dim), nn.ReLU(inplace=True))


def build_hacnn(model_cfg: Any, num_classes: int) -> HACNN:
    """HA-CNN from ``model_cfg.hacnn``, ``model_cfg.test_feature`` and ``model_cfg.feature_norm``.

    Raises ConfigError (one line naming the key) for values the network cannot take.
    """
    hc = model_cfg.hacnn
    if hc.attention not in ATTENTION_MODES:
        raise ConfigError(f"config key 'model.hacnn.attention' is {hc.attention!r}; expected one of: "
                          + ", ".join(ATTENTION_MODES))
    if not isinstance(hc.num_regions, int) or hc.num_regions < 1:
        raise ConfigError(f"config key 'model.hacnn.num_regions' is {hc.num_regions!r}; it must be an integer >= 1")
    widths = list(hc.widths)
    if len(widths) != 3 or any(not isinstance(d, int) or d < 4 or d % 4 for d in widths):
        raise ConfigError(f"config key 'model.hacnn.widths' is {widths!r}; expected 3 positive multiples of 4 "
                          "(d1, d2, d3; the paper's 128, 256, 384)")
    if hc.embed_dim < 1:
        raise ConfigError(f"config key 'model.hacnn.embed_dim' is {hc.embed_dim!r}; it must be >= 1")
    test_feature = get_spec(HACNN.model_name).test_feature(model_cfg).name
    if num_classes < 1:
        raise ConfigError(f"HA-CNN needs at least one training identity, got num_classes={num_classes}")
    return HACNN(
        num_classes,
        attention=hc.attention,
        cross_attention=cross_attention_mode(hc.cross_attention),
        num_regions=hc.num_regions,
        widths=widths,
        embed_dim=hc.embed_dim,
        test_feature=test_feature,
        feature_norm=bool(model_cfg.feature_norm),
        region_scale=getattr(hc, "region_scale", "stripes"),
        bnneck=bool(getattr(model_cfg, "bnneck", False)),
    )
