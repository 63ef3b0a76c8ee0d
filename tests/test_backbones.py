"""Backbones: torchvision parameter names, last stride, weight loading, bad input."""

import types

import pytest
import torch

from attnreid.errors import AttnReidError, CheckpointError
from attnreid.models import backbones
from attnreid.models.backbones import PRETRAINED_URLS, build_backbone, load_pretrained_weights


def _bcfg(name="resnet18", last_stride=1, pretrained=False, weights=None):
    return types.SimpleNamespace(name=name, last_stride=last_stride, pretrained=pretrained, weights=weights)


@pytest.mark.parametrize("name, channels", [("resnet18", 512), ("mobilenetv3_small", 576)])
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
    assert set(PRETRAINED_URLS) == {"resnet18", "resnet34", "resnet50", "mobilenetv3_small"}
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
