"""Paper equations that a plausible wrong edit used to leave every test green (issue 14).

Each test names the equation and the mutation it kills; docs/testing.md lists them.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from attnreid.config import load_config
from attnreid.engine.optim import build_optimizer
from attnreid.losses import build_criterion
from attnreid.models import build_model
from attnreid.models.baseline import GlobalFeatureBranch
from attnreid.models.hacnn import REGION_SIZES, build_hacnn, sample_regions

# ------------------------------------------------------------------ HA-CNN, Eq. 6-7


def small_hacnn(attention="all", cross_attention=True):
    cfg = SimpleNamespace(
        name="hacnn", test_feature="default", feature_norm=False,
        hacnn=SimpleNamespace(attention=attention, cross_attention=cross_attention, num_regions=4,
                              widths=[16, 32, 48], embed_dim=32),
    )
    torch.manual_seed(0)
    return build_hacnn(cfg, 4)


def _record(model):
    """Forward hooks: each level's attended global map, regions, and the local streams' inputs/outputs."""
    seen = {"global": {}, "theta": {}, "stream_in": {}, "stream_out": {}}

    def keep(kind, level):
        def hook(module, args, out):
            if kind == "ha":
                seen["global"][level], seen["theta"][level] = out[0], out[2]
            else:
                seen["stream_in"][level], seen["stream_out"][level] = args[0], out
        return hook

    for level in range(3):
        model.ha[level].register_forward_hook(keep("ha", level))
        model.local_inceptions[level].register_forward_hook(keep("stream", level))
    return seen


@pytest.mark.parametrize("attention", ["all", "soft"])
def test_ha_eq6_stream_input_is_stream_feature_plus_global_crop(attention):
    """HA Eq. 6: X~_L^(l) = X_L^(l) + X_G^(l). Kills "stream input = crop alone" (the stream's own
    feature dropped) and "= stream feature alone" (no global crop). ``soft``: fixed stripes."""
    model = small_hacnn(attention).train()
    seen = _record(model)
    b = 3
    model(torch.randn(b, 3, 80, 32, generator=torch.Generator().manual_seed(1)))
    for level in (1, 2):
        theta = seen["theta"][level] if seen["theta"][level] is not None else model.stripes.expand(b, -1, -1, -1)
        crop = sample_regions(seen["global"][level - 1], theta, REGION_SIZES[level]).flatten(0, 1)
        previous = seen["stream_out"][level - 1].detach()
        crop = crop.detach()
        expected = previous + crop
        got = seen["stream_in"][level].detach()
        scale = float(expected.abs().max())
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5 * scale)
        # neither addend alone is the input (both are far from zero)
        assert float((got - crop).abs().max()) > 1e-2 * scale and float((got - previous).abs().max()) > 1e-2 * scale


def test_ha_eq6_without_interaction_the_stream_carries_on_alone():
    model = small_hacnn(cross_attention=False).train()
    seen = _record(model)
    model(torch.randn(2, 3, 80, 32))
    for level in (1, 2):
        assert torch.equal(seen["stream_in"][level], seen["stream_out"][level - 1])


def test_ha_eq7_local_loss_reaches_global_levels_through_the_crops_themselves():
    """HA Eq. 7, second term: dL_local/dX_G through the cropped values, not only through theta.

    With the hard-attention FC weights at 0 (their initial value) theta does not depend on the
    global features, so the local loss reaches the level-1 / level-2 global Inception units only
    through the level-2 / level-3 crops. Kills detaching the global map before cropping at levels 2-3.
    """
    model = small_hacnn().train()
    with torch.no_grad():
        for m in model.ha:
            if m.hard is not None:
                m.hard.fc.weight.zero_()
    x, y = torch.randn(4, 3, 80, 32, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 0, 1, 1])
    F.cross_entropy(model(x)["logits"]["local"], y).backward()
    for level in (0, 1):  # global units whose output the next level crops
        grads = [p.grad for p in model.inceptions[level].parameters()]
        assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0, level
    # and the stream's own earlier levels get the local loss through Eq. 6's sum
    assert float(model.local_inceptions[0].branch3[0][0].weight.grad.abs().sum()) > 0


def test_ha_eq7_without_interaction_no_crop_gradient_reaches_level_2_and_3():
    model = small_hacnn(cross_attention=False).train()
    x, y = torch.randn(4, 3, 80, 32), torch.tensor([0, 0, 1, 1])
    F.cross_entropy(model(x)["logits"]["local"], y).backward()
    assert all(p.grad is None for p in model.inceptions[1].parameters())
    assert all(p.grad is None for p in model.inceptions[2].parameters())


# ------------------------------------------------------------------ Global Feature Branch (Sec. IV)


def test_global_feature_branch_is_gap_conv_bn_relu_by_hand():
    """q* = ReLU(BN(W GAP(Q))). Kills max-pool for GAP and a missing ReLU after the BN (some of
    the BN outputs are negative here, so ReLU zeroes them)."""
    gen = torch.Generator().manual_seed(0)
    branch = GlobalFeatureBranch(6, 5)
    conv, bn = branch.reduce[0], branch.reduce[1]
    with torch.no_grad():
        conv.weight.copy_(torch.randn(5, 6, 1, 1, generator=gen))
        bn.running_mean.copy_(torch.randn(5, generator=gen))
        bn.running_var.copy_(torch.rand(5, generator=gen) + 0.5)
        bn.weight.copy_(torch.randn(5, generator=gen))
        bn.bias.copy_(torch.randn(5, generator=gen))
    fmap = torch.randn(3, 6, 4, 2, generator=gen, dtype=torch.float64)
    branch = branch.double().eval()
    q = fmap.mean(dim=(2, 3))  # GAP
    pre = (q @ conv.weight.double().view(5, 6).t() - bn.running_mean.double()) / torch.sqrt(
        bn.running_var.double() + bn.eps) * bn.weight.double() + bn.bias.double()
    assert (pre < 0).any() and (pre > 0).any()
    with torch.no_grad():
        torch.testing.assert_close(branch(fmap), pre.clamp_min(0), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ MHSA-Net losses (Eq. 8, 10; Sec. IV)

TINY = ["model.backbone.name=mobilenetv3_small", "model.mhsanet.num_heads=2", "model.mhsanet.attention_dim=16",
        "model.mhsanet.embed_dim=16"]
LABELS = torch.tensor([0, 0, 1, 1])


def _tiny_mhsanet(*overrides):
    cfg = load_config(overrides=TINY + list(overrides))
    torch.manual_seed(0)
    return build_model(cfg.model, 3).train(), cfg


def test_triplet_inputs_are_p_star_and_z_of_the_model():
    """Eq. 8 and 10: the batch-hard triplets' inputs are p* = fusion(P) and z = RLM(q*, P)."""
    model, _ = _tiny_mhsanet()
    out = model(torch.randn(4, 3, 64, 32, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        torch.testing.assert_close(out["features"]["saffm"], model.fusion(out["P"])[0])
        torch.testing.assert_close(out["features"]["rlm"], model.rlm(out["q_star"], out["P"]))
    assert not torch.allclose(out["features"]["saffm"], out["q_star"])


def _as_leaves(tree, leaves):
    """The model's output dict with every tensor replaced by a leaf (one leaf per distinct tensor)."""
    if isinstance(tree, dict):
        return {k: _as_leaves(v, leaves) for k, v in tree.items()}
    if isinstance(tree, torch.Tensor):
        if id(tree) not in leaves:
            leaves[id(tree)] = tree.detach().clone().requires_grad_(True)
        return leaves[id(tree)]
    return tree


@pytest.mark.parametrize("rlm", [True, False])
def test_batch_hard_triplets_act_on_p_star_and_z_never_on_q_star(rlm):
    """MHSA-Net Sec. IV: no triplet loss on q*; Eq. 8 / 10 put them on p* and z. Kills pointing
    either triplet at q* (the set-up the paper reports as worse), in the model or in the criterion.

    Whatever the triplet's distance and margin: the positives are made far and the negatives
    near, so every anchor's triplet is active (non-zero gradient) under a hinge or a soft margin.
    """
    model, cfg = _tiny_mhsanet(f"model.mhsanet.rlm={str(rlm).lower()}")
    raw = model(torch.randn(4, 3, 64, 32, generator=torch.Generator().manual_seed(0)))
    hard = torch.zeros(4, 16)
    hard[:, 0] = torch.tensor([0.0, 3.0, 0.5, 3.5])  # d(a, p) = 3 > d(a, n) = 0.5 for every anchor
    with torch.no_grad():
        raw["features"]["saffm"].copy_(hard)  # the same tensor as raw["p_star"]
        if rlm:
            raw["features"]["rlm"].copy_(hard + 0.1)
    out = _as_leaves(raw, {})
    total, _ = build_criterion(cfg.loss, cfg.model)(out, LABELS)
    total.backward()
    assert out["q_star"].grad is None or not out["q_star"].grad.any(), "a loss acts on q* directly"
    assert out["features"]["saffm"].grad is not None and out["features"]["saffm"].grad.abs().sum() > 0
    if rlm:
        assert out["features"]["rlm"].grad is not None and out["features"]["rlm"].grad.abs().sum() > 0
    else:
        assert "rlm" not in out["features"]


# ------------------------------------------------------------------ the trainer's optimiser


@pytest.mark.parametrize("model_name", ["mhsanet", "baseline"])
def test_the_trainers_optimiser_updates_every_parameter(model_name):
    """The optimiser the trainer builds (``build_optimizer(cfg.optim, [model, criterion])``) holds
    every parameter, and one step moves each one that the loss reaches (the authors' code left
    the attention layers out of its optimiser)."""
    model, cfg = _tiny_mhsanet(f"model.name={model_name}")
    criterion = build_criterion(cfg.loss, cfg.model)
    optimizer = build_optimizer(cfg.optim, [model, criterion])
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert [n for n, p in model.named_parameters() if id(p) not in held] == []
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    total, _ = criterion(model(torch.randn(4, 3, 64, 32)), LABELS)
    optimizer.zero_grad()
    total.backward()
    optimizer.step()
    unmoved = [n for n, p in model.named_parameters() if torch.equal(p.detach(), before[n])]
    assert unmoved == []
    if model_name == "mhsanet":
        assert {"mhsam.w1.weight", "mhsam.w2.weight", "fusion.w4.weight", "fusion.w6.weight"} <= set(before)


def test_baseline_test_feature_is_q_star_by_default_or_by_name():
    """The Baseline row (Tables I, V, VIII) is tested on q*; ``global`` names the same feature."""
    default, _ = _tiny_mhsanet("model.name=baseline")
    named, _ = _tiny_mhsanet("model.name=baseline", "model.test_feature=global")
    x = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        q_star = default.train()(x)["q_star"]  # train-mode BN on both sides
        assert torch.equal(named.train()(x)["q_star"], q_star)
    assert named.feature_dim == default.feature_dim == 16
