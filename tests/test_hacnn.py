"""HA-CNN (docs/spec.md §2): the HA module's equations by hand, regions, gradients, ablations, size."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from attnreid.errors import ConfigError
from attnreid.models.complexity import count_macs, count_params
from attnreid.models import hacnn
from attnreid.models.hacnn import (
    ChannelAttention,
    HarmoniousAttention,
    SpatialAttention,
    build_hacnn,
    channel_squeeze,
    cross_attention_interaction,
    cross_channel_mean,
    region_boxes,
    region_transforms,
    sample_regions,
    soft_attention_product,
)

SMALL = dict(widths=[32, 64, 96], embed_dim=64)


def make_cfg(attention="all", cross_attention=True, num_regions=4, widths=(128, 256, 384), embed_dim=512,
             test_feature="default", feature_norm=False, region_scale="stripes"):
    return SimpleNamespace(
        name="hacnn",
        hacnn=SimpleNamespace(attention=attention, cross_attention=cross_attention, num_regions=num_regions,
                              widths=list(widths), embed_dim=embed_dim, region_scale=region_scale),
        test_feature=test_feature,
        feature_norm=feature_norm,
    )


def small_model(num_classes=4, **kw):
    torch.manual_seed(0)
    return build_hacnn(make_cfg(**{**SMALL, **kw}), num_classes)


# ---------------------------------------------------------------- HA module, by hand


def test_cross_channel_mean_eq2_and_squeeze_eq3():
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float).view(2, 3, 2, 2)
    expected_s = (x[:, 0] + x[:, 1] + x[:, 2]) / 3
    assert torch.allclose(cross_channel_mean(x)[:, 0], expected_s)
    expected_c = torch.stack([x[:, i].sum(dim=(1, 2)) / 4 for i in range(3)], dim=1)
    assert torch.allclose(channel_squeeze(x), expected_c)


def test_spatial_attention_has_the_papers_ten_parameters():
    sa = SpatialAttention()
    assert sum(p.numel() for p in sa.parameters()) == 10 == 9 + 1


def test_spatial_attention_by_hand():
    sa = SpatialAttention().eval()  # fresh BN statistics (mean 0, var 1): BN is the identity
    with torch.no_grad():
        sa.conv.weight.fill_(1.0)
        sa.scale.weight.fill_(2.0)
    x = torch.full((1, 5, 4, 4), 3.0)  # channel mean 3 everywhere
    # 3x3 ones, stride 2, zero padding on a 4x4 map of 3: the 2x2 output sees 4, 6, 6, 9 pixels.
    conv = torch.tensor([[4.0, 6.0], [6.0, 9.0]]) * 3
    # bilinear 2 -> 4 (half-pixel centres): source coords 0, 0.25, 0.75, 1 along each axis.
    w = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
    expected = 2.0 * (w @ conv @ w.T)
    assert torch.allclose(sa(x)[0, 0], expected, rtol=1e-4)


def test_channel_attention_has_2c2_over_r_parameters():
    for c in (128, 256, 384):
        ca = ChannelAttention(c)
        assert sum(p.numel() for p in ca.parameters()) == 2 * c * c // 16


def test_channel_attention_eq4_by_hand():
    ca = ChannelAttention(16)  # c/r = 1
    with torch.no_grad():
        ca.reduce.weight.fill_(1.0 / 16)  # W1: mean of the signature
        ca.expand.weight.copy_(torch.linspace(-1, 1, 16).view(16, 1, 1, 1))  # W2
    g = torch.arange(16, dtype=torch.float).view(1, 16) - 4.0  # mean 3.5
    expected = torch.relu(torch.linspace(-1, 1, 16) * torch.relu(g.mean()))
    assert torch.allclose(ca(g).flatten(), expected)
    assert torch.equal(ca(-g.abs() - 1).flatten(), torch.zeros(16))  # inner ReLU kills a negative mean


def test_soft_attention_product_eq1():
    s = torch.rand(2, 1, 3, 4)
    c = torch.rand(2, 5, 1, 1)
    like = torch.empty(2, 5, 3, 4)
    a = soft_attention_product(s, c, like)
    assert torch.allclose(a[1, 2, 1, 3], s[1, 0, 1, 3] * c[1, 2, 0, 0])
    assert torch.allclose(soft_attention_product(s, None, like), s.expand(2, 5, 3, 4))
    assert torch.allclose(soft_attention_product(None, c, like), c.expand(2, 5, 3, 4))


def test_soft_attention_lies_in_the_papers_half_to_one_range():
    torch.manual_seed(0)
    ha = HarmoniousAttention(32, 4, spatial=True, channel=True, hard=True)
    x = torch.relu(torch.randn(4, 32, 10, 6))
    out, attention, theta = ha(x)
    assert attention.shape == x.shape and theta.shape == (4, 4, 2, 3)
    assert attention.min() >= 0.5 and attention.max() < 1.0
    assert attention.max() > 0.5  # not a constant: the fusion conv passes something through
    assert torch.allclose(out, x * attention)


# ---------------------------------------------------------------- hard attention (Eq. 5)


def test_region_transform_eq5_and_boxes_by_hand():
    t = torch.tensor([[[0.5, -0.25]]])
    theta = region_transforms(t, 4)
    assert torch.equal(theta[0, 0], torch.tensor([[1.0, 0.0, 0.5], [0.0, 0.25, -0.25]]))
    # x: [-0.5, 1.5] -> pixels 16..80 of 64; y: [-0.5, 0] -> 40..80 of 160
    assert torch.allclose(region_boxes(theta, 160, 64)[0, 0], torch.tensor([16.0, 40.0, 80.0, 80.0]))


def test_sample_regions_reads_the_stripes_by_hand():
    x = torch.arange(8, dtype=torch.float).view(1, 1, 4, 2)
    theta = region_transforms(torch.tensor([[[0.0, -0.5], [0.0, 0.5]]]), 2)
    crops = sample_regions(x, theta, (2, 2))
    assert crops.shape == (1, 2, 1, 2, 2)
    assert torch.allclose(crops[0, 0, 0], x[0, 0, :2])
    assert torch.allclose(crops[0, 1, 0], x[0, 0, 2:])


def test_hard_attention_starts_as_four_horizontal_stripes():
    model = small_model().eval()
    att = model.forward_attention(torch.randn(2, 3, 160, 64))
    stripes = torch.tensor([[0.0, 40.0 * k, 64.0, 40.0 * (k + 1)] for k in range(4)])
    assert att["region_levels"] == [1, 2, 3] and len(att["regions"]) == 3
    for boxes in att["regions"]:
        assert boxes.shape == (2, 4, 4)
        assert torch.allclose(boxes, stripes.expand(2, 4, 4), atol=1e-4)


def test_regions_move_with_the_translation_parameters():
    model = small_model().eval()
    x = torch.randn(2, 3, 160, 64)
    before = model.forward_attention(x)["regions"][1]
    with torch.no_grad():
        model.ha[1].hard.fc.bias[0] = math.atanh(0.5)  # region 0, t_x: half the width to the right
        model.ha[1].hard.fc.weight[3, 0] = 1.0  # region 1, t_y now depends on the image
    after = model.forward_attention(x)["regions"][1]
    assert torch.allclose(after[:, 0], before[:, 0] + torch.tensor([16.0, 0.0, 16.0, 0.0]), atol=1e-4)
    assert not torch.allclose(after[:, 1], before[:, 1])
    assert torch.allclose(after[:, 2:], before[:, 2:])


# ---------------------------------------------------------------- cross-attention (Eq. 6-7)


def test_cross_attention_interaction_eq6_adds():
    a, b = torch.rand(2, 4, 3, 2, 2), torch.rand(2, 4, 3, 2, 2)
    assert torch.equal(cross_attention_interaction(a, b), a + b)


@pytest.mark.parametrize("cross_attention", [True, False])
def test_local_loss_reaches_the_global_branch_only_with_interaction(cross_attention):
    model = small_model(cross_attention=cross_attention).train()
    with torch.no_grad():  # trained regions depend on the image (at init the FC weights are 0)
        for m in model.ha:
            if m.hard is not None:
                m.hard.fc.weight.normal_(std=0.1)
    x, y = torch.randn(4, 3, 80, 32), torch.tensor([0, 0, 1, 1])
    F.cross_entropy(model(x)["logits"]["local"], y).backward()  # HA Eq. 7, second term alone
    global_params = {
        "level-2 Inception-A": model.inceptions[1][0].branch1[0].weight,  # through the level-3 crop
        "level-2 soft-attention fusion": model.ha[1].fuse[0].weight,
        "level-3 Inception-A": model.inceptions[2][0].branch1[0].weight,  # through level-3's regions
    }
    for name, p in global_params.items():
        got = p.grad is not None and bool(p.grad.abs().sum() > 0)
        assert got == cross_attention, name
    assert model.local_inceptions[2].branch3[0][0].weight.grad.abs().sum() > 0
    assert model.inceptions[0][0].branch1[0].weight.grad.abs().sum() > 0  # level-1 regions, either way


# ---------------------------------------------------------------- network, ablations, outputs


@pytest.mark.parametrize("cross_attention", [True, False])
@pytest.mark.parametrize("attention", hacnn.ATTENTION_MODES)
def test_every_ablation_builds_and_runs(attention, cross_attention):
    model = small_model(attention=attention, cross_attention=cross_attention)
    x = torch.randn(2, 3, 80, 32)
    out = model.train()(x)
    assert out["logits"]["global"].shape == out["logits"]["local"].shape == (2, 4)
    assert out["features"]["global"].shape == out["features"]["local"].shape == (2, 64)
    att = model.eval().forward_attention(x)
    assert att["feature"].shape == (2, 128)
    soft = attention in ("spatial", "channel", "soft", "all")
    assert [a.shape for a in att["soft_attention"]] == ([(2, 20, 8), (2, 10, 4), (2, 5, 2)] if soft else [])
    assert att["region_levels"] == ([1, 2, 3] if cross_attention else [1])
    learnt = attention in ("hard", "all")
    assert [m.hard is not None for m in model.ha] == [learnt, learnt and cross_attention, learnt and cross_attention]
    assert [m.spatial is not None for m in model.ha] == [attention in ("spatial", "soft", "all")] * 3
    assert [m.channel is not None for m in model.ha] == [attention in ("channel", "soft", "all")] * 3


@pytest.fixture(scope="module")
def paper_model():
    torch.manual_seed(0)
    return build_hacnn(make_cfg(), 751)


def test_paper_size_training_and_test_outputs(paper_model):
    model = paper_model
    assert model.model_name == "hacnn" and model.feature_dim == 1024
    out = model.train()(torch.randn(2, 3, 160, 64))
    assert set(out) == {"logits", "features"}
    assert {k: v.shape for k, v in out["logits"].items()} == {"global": (2, 751), "local": (2, 751)}
    assert {k: v.shape for k, v in out["features"].items()} == {"global": (2, 512), "local": (2, 512)}
    att = model.eval().forward_attention(torch.randn(2, 3, 160, 64))
    assert [a.shape for a in att["soft_attention"]] == [(2, 40, 16), (2, 20, 8), (2, 10, 4)]


def test_test_features_are_l2_normalised_parts():
    x = torch.randn(3, 3, 80, 32)
    joint = small_model().eval()
    f = joint(x)
    assert f.shape == (3, 128) and joint.feature_dim == 128
    assert torch.allclose(f[:, :64].norm(dim=1), torch.ones(3)) and torch.allclose(f[:, 64:].norm(dim=1), torch.ones(3))
    g = small_model(test_feature="global").eval()
    loc = small_model(test_feature="local").eval()
    assert g.feature_dim == loc.feature_dim == 64
    assert torch.allclose(g(x), f[:, :64], atol=1e-6) and torch.allclose(loc(x), f[:, 64:], atol=1e-6)
    normed = small_model(feature_norm=True).eval()
    assert torch.allclose(normed(x), f / math.sqrt(2), atol=1e-6)


def test_one_step_of_the_recipes_optimiser_lowers_the_loss():
    """The optimiser and criterion the trainer builds from the HA-CNN recipe (HA Sec. 4: Adam,
    lr 5e-4, betas 0.9/0.999), not a hand-made Adam."""
    from attnreid.config import load_config
    from attnreid.engine.optim import build_optimizer
    from attnreid.losses import build_criterion

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "hacnn" / "market1501.yaml")
    model = small_model(num_classes=4).train()
    criterion = build_criterion(cfg.loss, cfg.model)
    opt = build_optimizer(cfg.optim, [model, criterion])
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["lr"] == 5e-4
    torch.manual_seed(1)
    x, y = torch.randn(8, 3, 80, 32), torch.arange(4).repeat_interleave(2)
    first, terms = criterion(model(x), y)
    assert set(terms) == {"ce_global", "ce_local"}
    first.backward()
    opt.step()
    with torch.no_grad():
        assert criterion(model(x), y)[0].item() < first.item()


@pytest.mark.parametrize("attention, cross_attention", [("all", True), ("all", False), ("spatial", True)])
def test_every_conv_and_pool_gets_channels_last_input(attention, cross_attention):
    # NCHW input sends oneDNN through a reorder around every conv and pooling through
    # unvectorised kernels: 1.4-1.5x slower training steps on a CPU (docs/hacnn.md).
    model = small_model(attention=attention, cross_attention=cross_attention).train()
    seen, not_cl = [], []

    def check(module, args, name):
        x = args[0]
        seen.append(name)
        if x.shape[1] > 1 and x.shape[2] * x.shape[3] > 1 and not x.is_contiguous(memory_format=torch.channels_last):
            not_cl.append((name, tuple(x.shape)))

    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.MaxPool2d, torch.nn.AvgPool2d)):
            module.register_forward_pre_hook(lambda m, a, name=name: check(m, a, name))
    model(torch.randn(2, 3, 80, 32))  # plain NCHW in, as the data loader gives it
    assert any(n.startswith("local_inceptions.2") for n in seen)
    assert not_cl == []


def test_sampled_regions_flatten_to_a_channels_last_view():
    x = torch.randn(2, 5, 8, 4).contiguous(memory_format=torch.channels_last)
    theta = region_transforms(torch.rand(2, 3, 2) - 0.5, 3)
    crops = sample_regions(x, theta, (4, 3))
    flat = crops.flatten(0, 1)
    assert flat.is_contiguous(memory_format=torch.channels_last) and flat.data_ptr() == crops.data_ptr()
    reference = F.grid_sample(x[:1].contiguous(), F.affine_grid(theta[0, 1:2], [1, 5, 4, 3], align_corners=False),
                              align_corners=False)
    # bilinear reads of 4 values with weights from a batched vs a single affine grid: float32
    # rounding of a few ulps of the largest value, whatever the kernel's summation order
    torch.testing.assert_close(crops[0, 1], reference[0], rtol=0, atol=1e-5 * float(x.abs().max()))


def test_build_model_dispatches_to_hacnn():
    from attnreid.models import build_model

    assert build_model(make_cfg(**SMALL), 3).model_name == "hacnn"


@pytest.mark.parametrize(
    "override, key",
    [
        ({"num_regions": 0}, "model.hacnn.num_regions"),
        ({"attention": "pixel"}, "model.hacnn.attention"),
        ({"widths": [128, 256]}, "model.hacnn.widths"),
        ({"widths": [128, 250, 384]}, "model.hacnn.widths"),
        ({"test_feature": "concat"}, "model.test_feature"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        build_hacnn(make_cfg(**override), 10)
    assert key in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- size (docs/spec.md §2, docs/hacnn.md)


HACNN_PARAMS = 2_920_790  # classifiers excluded; paper: 2.7 M (docs/hacnn.md explains the gap)
HACNN_MACS = 543_994_538  # at 160x64; paper: 1.09e9 FLOPs = 2 x MACs


def test_size_at_160x64_is_pinned_and_close_to_the_paper(paper_model):
    model = paper_model
    params, macs = count_params(model, exclude_classifiers=True), count_macs(model, input_size=(160, 64))
    assert params == HACNN_PARAMS
    assert macs == HACNN_MACS
    assert abs(2 * macs - 1.09e9) / 1.09e9 < 0.005
    assert count_params(build_hacnn(make_cfg(), 10), exclude_classifiers=True) == params


# ---------------------------------------------------------------- readings the paper leaves open


def test_region_transforms_take_the_native_scale():
    t = torch.tensor([[[0.1, -0.2], [0.0, 0.5]]])
    theta = region_transforms(t, 2, hacnn.region_scale_factors("native", 2))
    assert torch.equal(theta[0, 1], torch.tensor([[0.875, 0.0, 0.0], [0.0, 0.3, 0.5]]))
    assert hacnn.region_scale_factors("stripes", 4) == (1.0, 0.25)
    # the native scale is each level's crop size over its input size at 160x64
    for (h, w), (in_h, in_w) in zip(hacnn.REGION_SIZES, [(80, 32), (40, 16), (20, 8)]):
        assert (w / in_w, h / in_h) == pytest.approx(hacnn.NATIVE_SCALE)


@pytest.mark.parametrize("attention", ["all", "soft"])  # learnt regions, and the fixed ones without hard attention
def test_native_regions_have_the_papers_size_on_the_image(attention):
    x = torch.randn(1, 3, 160, 64)
    for scale, (bw, bh) in (("stripes", (64, 40)), ("native", (0.875 * 64, 0.3 * 160))):
        model = small_model(attention=attention, region_scale=scale).eval()
        boxes = model.forward_attention(x)["regions"]
        assert len(boxes) == 3
        for b in boxes:
            assert torch.allclose(b[..., 2] - b[..., 0], torch.full((1, 4), float(bw)))
            assert torch.allclose(b[..., 3] - b[..., 1], torch.full((1, 4), float(bh)))
            centres = (b[0, :, 1] + b[0, :, 3]) / 2
            assert torch.allclose(centres, torch.tensor([20.0, 60.0, 100.0, 140.0]), atol=1e-4)  # stripe centres


def test_cross_attention_detach_keeps_the_forward_and_removes_eq7s_gradient():
    on = small_model(cross_attention="on").train()
    detach = small_model(cross_attention="detach").train()
    with torch.no_grad():
        for m in on.ha:
            m.hard.fc.weight.normal_(std=0.1)
    detach.load_state_dict(on.state_dict())  # same parameters: hard attention at levels 2-3 in both
    x, y = torch.randn(4, 3, 80, 32), torch.tensor([0, 0, 1, 1])
    out_on, out_detach = on(x), detach(x)
    tol = 1e-5 * float(out_on["logits"]["local"].detach().abs().max())
    assert torch.allclose(out_on["logits"]["local"], out_detach["logits"]["local"], atol=tol)
    F.cross_entropy(out_detach["logits"]["local"], y).backward()
    for name, p in {"level-2 Inception-A": detach.inceptions[1][0].branch1[0].weight,
                    "level-2 soft-attention fusion": detach.ha[1].fuse[0].weight,
                    "level-3 Inception-A": detach.inceptions[2][0].branch1[0].weight}.items():
        assert p.grad is None or not bool(p.grad.abs().sum() > 0), name
    for level in (1, 2):  # the regions of levels 2-3 are still learnt from the local loss
        assert detach.ha[level].hard.fc.weight.grad.abs().sum() > 0
    assert detach.inceptions[0][0].branch1[0].weight.grad.abs().sum() > 0  # level-1 regions, as in "off"
    assert detach.eval().forward_attention(x)["region_levels"] == [1, 2, 3]


def test_cross_attention_accepts_the_old_booleans_and_rejects_others():
    from attnreid.config import from_dict, load_config
    from attnreid.errors import ConfigError

    assert hacnn.cross_attention_mode(True) == "on" and hacnn.cross_attention_mode(False) == "off"
    assert load_config(None, ["model.hacnn.cross_attention=false"]).model.hacnn.cross_attention == "off"
    assert from_dict({"model": {"hacnn": {"cross_attention": True}}}).model.hacnn.cross_attention == "on"
    assert load_config(None, ["model.hacnn.cross_attention=detach"]).model.hacnn.cross_attention == "detach"
    with pytest.raises(ConfigError, match="model.hacnn.cross_attention"):
        load_config(None, ["model.hacnn.cross_attention=sometimes"])
    with pytest.raises(ConfigError, match="model.hacnn.region_scale"):
        load_config(None, ["model.hacnn.region_scale=huge"])
