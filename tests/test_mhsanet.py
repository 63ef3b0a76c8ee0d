"""MHSA-Net and the baseline: each component against its equation, variants, gradients, a training step."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from attnreid.config import load_config
from attnreid.errors import AttnReidError, CheckpointError, ConfigError
from attnreid.losses import build_criterion
from attnreid.models import build_model, load_state_dict_checked
from attnreid.models.mhsanet import MultiHeadSelfAttention, ResidualLearningModule, SelfAttentionFeatureFusion

SMALL = ["model.backbone.name=mobilenetv3_small"]
LABELS = torch.tensor([0, 0, 1, 1])


def _cfg(*overrides):
    return load_config(overrides=SMALL + list(overrides))


def _model(*overrides, num_classes=5):
    cfg = _cfg(*overrides)
    torch.manual_seed(0)
    return build_model(cfg.model, num_classes), cfg


def _images(b=4, h=64, w=32, seed=0):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ components vs equations


def _fmap():
    return torch.randn(2, 6, 3, 2, generator=torch.Generator().manual_seed(0))  # B=2, C=6, J=6


def test_mhsam_spatial_is_eq_1_2_with_softmax_over_positions():
    m = MultiHeadSelfAttention(6, num_heads=3, attention_dim=4, embed_dim=5, norm="spatial")
    fmap = _fmap()
    p, alpha = m(fmap)
    q = fmap.flatten(2).transpose(1, 2)  # B x J x C
    logits = torch.relu(q @ m.w1.weight.t()) @ m.w2.weight.t()  # B x J x K
    expected_alpha = logits.softmax(dim=1).transpose(1, 2)  # each head sums to 1 over J
    assert torch.allclose(alpha, expected_alpha, atol=1e-6)
    assert torch.allclose(alpha.sum(2), torch.ones(2, 3), atol=1e-6)
    expected_p = (expected_alpha @ q) @ m.w3.weight.t() + m.w3.bias
    assert p.shape == (2, 3, 5) and torch.allclose(p, expected_p, atol=1e-5)
    assert m.w1.bias is None and m.w2.bias is None and m.w3.bias is not None


def test_mhsam_heads_normalises_over_heads_and_divides_by_j():
    m = MultiHeadSelfAttention(6, num_heads=3, attention_dim=4, embed_dim=5, norm="heads")
    fmap = _fmap()
    p, alpha = m(fmap)
    q = fmap.flatten(2).transpose(1, 2)
    logits = torch.relu(q @ m.w1.weight.t()) @ m.w2.weight.t()
    expected_alpha = logits.softmax(dim=2).transpose(1, 2)
    assert torch.allclose(alpha, expected_alpha, atol=1e-6)
    assert torch.allclose(alpha.sum(1), torch.ones(2, 6), atol=1e-6)  # K weights per position sum to 1
    expected_p = (expected_alpha @ q / 6) @ m.w3.weight.t() + m.w3.bias
    assert torch.allclose(p, expected_p, atol=1e-5)


def test_saffm_is_eq_6_7():
    k, e = 3, 8
    m = SelfAttentionFeatureFusion(k, e)
    assert (m.w4.in_features, m.w4.out_features, m.w5.out_features, m.w6.out_features) == (e * k, 128 * k, 64 * k, k)
    p = torch.randn(2, k, e, generator=torch.Generator().manual_seed(0))
    p_star, beta = m(p)
    flat = p.reshape(2, k * e)
    expected_beta = (torch.relu(flat @ m.w4.weight.t() @ m.w5.weight.t()) @ m.w6.weight.t()).softmax(1)
    assert torch.allclose(beta, expected_beta, atol=1e-6)
    fused = (expected_beta[:, :, None] * p).sum(1)
    assert torch.allclose(p_star, F.layer_norm(fused, (e,), m.norm.weight, m.norm.bias), atol=1e-5)


def test_rlm_is_eq_9_summed_over_heads_then_layer_normalised():
    q_star, p = torch.randn(2, 4), torch.randn(2, 3, 4)
    rows = q_star[:, None, :].expand(2, 3, 4) + p
    mean = rows.mean(-1, keepdim=True)
    z_rows = (rows - mean) / (rows.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()  # LayerNorm, fresh weights
    literal = z_rows.sum(1)
    assert torch.allclose(ResidualLearningModule(4, out_norm=False)(q_star, p), literal, atol=1e-5)
    expected = (literal - literal.mean(-1, keepdim=True)) / (literal.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
    m = ResidualLearningModule(4)
    assert m.out_norm is not None and torch.allclose(m(q_star, p), expected, atol=1e-5)


def test_rlm_out_norm_keeps_z_at_the_scale_of_p_star():
    """Without the LayerNorm on z, ||z|| is about K x sqrt(E) at initialisation (docs/spec.md §1, RLM)."""
    norms = {}
    for out_norm in (True, False):
        model, _ = _model("model.mhsanet.num_heads=4", f"model.mhsanet.rlm_out_norm={str(out_norm).lower()}")
        model.train()
        out = model(_images())
        norms[out_norm] = out["z"].norm(dim=1).mean().item()
        assert ("out_norm.weight" in dict(model.rlm.named_parameters())) == out_norm
    e = 512
    assert norms[True] == pytest.approx(e**0.5, rel=0.01)
    assert norms[False] > 3 * e**0.5


# -------------------------------------------------------------------- whole model, variants


def test_training_outputs_and_attention_grid_follow_input_size():
    model, _ = _model("model.mhsanet.num_heads=3")
    model.train()
    out = model(_images(h=64, w=32))
    assert set(out) == {"logits", "features", "P", "alpha", "q_star", "p_star", "z", "beta"}
    assert set(out["logits"]) == {"global", "saffm", "rlm"} and set(out["features"]) == {"saffm", "rlm"}
    assert out["P"].shape == (4, 3, 512) and out["alpha"].shape == (4, 3, 8)  # 64x32 / 16 = 4 x 2
    assert out["logits"]["saffm"].shape == (4, 5) and out["beta"].shape == (4, 3)
    model.eval()
    with torch.no_grad():
        att = model.forward_attention(_images(b=1, h=128, w=64))
    assert att["attention"].shape == (1, 3, 8, 4) and att["feature"].shape == (1, 1024)
    assert torch.allclose(att["attention"].sum((2, 3)), torch.ones(1, 3), atol=1e-5)


def test_resnet50_mhsanet_grid_at_384x128():
    cfg = load_config()
    torch.manual_seed(0)
    model = build_model(cfg.model, 3).eval()
    with torch.no_grad():
        att = model.forward_attention(torch.randn(1, 3, 384, 128))
    assert model.backbone.out_channels == 2048 and model.mhsam.w1.in_features == 2048
    assert att["attention"].shape == (1, 8, 24, 8) and att["feature"].shape == (1, 1024)


@pytest.mark.parametrize(
    "overrides, dim",
    [
        ([], 1024),
        (["model.test_feature=concat"], 1024),
        (["model.test_feature=star"], 512),
        (["model.test_feature=global"], 512),
        (["model.test_feature=head", "model.test_head=2"], 512),
        (["model.mhsanet.fusion=concat"], 512 * 4 + 512),
        (["model.mhsanet.fusion=concat", "model.test_feature=star"], 512 * 4),
        (["model.mhsanet.fusion=sum", "model.test_feature=star"], 512),
    ],
)
def test_test_feature_dims(overrides, dim):
    model, _ = _model("model.mhsanet.num_heads=4", *overrides)
    model.eval()
    with torch.no_grad():
        f = model(_images(b=2))
    assert model.feature_dim == dim and f.shape == (2, dim)


def test_test_features_are_the_named_vectors_and_feature_norm():
    model, _ = _model("model.mhsanet.num_heads=4")
    x = _images(b=2)
    model.eval()
    with torch.no_grad():
        fmap = model.backbone(x)
        q_star = model.global_branch(fmap)
        p, _ = model.mhsam(fmap)
        p_star, _ = model.fusion(p)
        assert torch.allclose(model(x), torch.cat([p_star, q_star], 1), atol=1e-5)
        for feature, expected in (("star", p_star), ("global", q_star), ("head", p[:, 1])):
            other, _ = _model("model.mhsanet.num_heads=4", f"model.test_feature={feature}", "model.test_head=1")
            other.load_state_dict(model.state_dict())
            assert torch.allclose(other.eval()(x), expected, atol=1e-5), feature
        normed, _ = _model("model.mhsanet.num_heads=4", "model.feature_norm=true")
        normed.load_state_dict(model.state_dict())
        f = normed.eval()(x)
        assert torch.allclose(f, F.normalize(torch.cat([p_star, q_star], 1), dim=1), atol=1e-6)
        assert torch.allclose(f.norm(dim=1), torch.ones(2), atol=1e-5)


def test_rlm_false_and_fusion_switches_build_only_their_modules():
    full, _ = _model()
    no_rlm, _ = _model("model.mhsanet.rlm=false")
    assert no_rlm.rlm is None and "rlm" not in no_rlm.classifiers
    rlm_params = sum(p.numel() for n, p in full.named_parameters() if n.startswith(("rlm.", "classifiers.rlm")))
    assert sum(p.numel() for p in full.parameters()) - sum(p.numel() for p in no_rlm.parameters()) == rlm_params
    no_rlm.train()
    out = no_rlm(_images())
    assert "z" not in out and "rlm" not in out["logits"] and "rlm" not in out["features"]
    summed, _ = _model("model.mhsanet.fusion=sum")
    assert not any(n.startswith("fusion.w") for n, _ in summed.named_parameters())
    summed.train()
    assert "beta" not in summed(_images())


def test_k_1_to_9_build_and_run():
    for k in range(1, 10):
        model, _ = _model(f"model.mhsanet.num_heads={k}", "model.mhsanet.rlm=false")
        model.train()
        out = model(_images(b=2))
        assert out["P"].shape[1] == k and out["beta"].shape == (2, k)
        assert model.fusion.w4.in_features == 512 * k


def test_k_below_one_is_rejected():
    with pytest.raises(ConfigError, match="model.mhsanet.num_heads"):
        load_config(overrides=["model.mhsanet.num_heads=0"])
    cfg = _cfg()
    bad = dataclasses.replace(cfg.model, mhsanet=dataclasses.replace(cfg.model.mhsanet, num_heads=0))
    with pytest.raises(ConfigError, match="num_heads"):
        build_model(bad, 5)


def test_input_too_small_is_one_line():
    model, _ = _model("model.backbone.last_stride=2")
    model.eval()
    with pytest.raises(AttnReidError, match="input 16x16 is too small for backbone mobilenetv3_small") as exc:
        model(torch.zeros(1, 3, 16, 16))
    assert "\n" not in str(exc.value)


# ------------------------------------------------------------------ gradients and training


def test_every_parameter_trains_including_attention_and_saffm():
    """The authors' code left the attention layers out of its optimiser; the trainer's leaves nothing out."""
    from attnreid.engine.optim import build_optimizer

    model, cfg = _model("model.mhsanet.num_heads=3")
    criterion = build_criterion(cfg.loss, cfg.model)
    optimizer = build_optimizer(cfg.optim, [model, criterion])
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    model.train()
    total, _ = criterion(model(_images()), LABELS)
    total.backward()
    no_grad = [n for n, p in model.named_parameters() if id(p) not in in_optimizer or p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    for name in ("mhsam.w1.weight", "mhsam.w2.weight", "mhsam.w3.weight", "mhsam.w3.bias",
                 "fusion.w4.weight", "fusion.w5.weight", "fusion.w6.weight"):
        assert dict(model.named_parameters())[name].grad.abs().sum() > 0, name


def test_dagger_leaves_only_the_global_classifier_without_gradient():
    model, cfg = _model("model.mhsanet.num_heads=2", "loss.global_ce=false")
    criterion = build_criterion(cfg.loss, cfg.model)
    model.train()
    total, terms = criterion(model(_images()), LABELS)
    assert "ce_global" not in terms
    total.backward()
    no_grad = sorted(n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0)
    assert no_grad == ["classifiers.global.bias", "classifiers.global.weight"]


def test_one_adam_step_lowers_the_loss():
    model, cfg = _model("model.mhsanet.num_heads=2")
    criterion = build_criterion(cfg.loss, cfg.model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = _images()
    model.train()
    before, _ = criterion(model(x), LABELS)
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after, _ = criterion(model(x), LABELS)
    assert after.item() < before.item()


# -------------------------------------------------------------------------------- baseline


def test_baseline_is_the_global_branch_alone():
    model, _ = _model("model.name=baseline")
    model.train()
    out = model(_images())
    assert set(out["logits"]) == {"global"} and out["features"] == {}
    model.eval()
    with torch.no_grad():
        assert model(_images()).shape == (4, 512) and model.feature_dim == 512
    with pytest.raises(AttnReidError, match="no attention maps"):
        model.forward_attention(_images())
    with pytest.raises(ConfigError, match="model.test_feature"):
        _model("model.name=baseline", "model.test_feature=star")


# ------------------------------------------------------------------------------- checkpoints


def test_load_state_dict_checked():
    model, _ = _model("model.mhsanet.num_heads=2")
    state = {"module." + k: v for k, v in model.state_dict().items()}
    fresh, _ = _model("model.mhsanet.num_heads=2")
    load_state_dict_checked(fresh, state, "a.pth")
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    other_classes, _ = _model("model.mhsanet.num_heads=2", num_classes=9)
    with pytest.raises(CheckpointError, match="a.pth was trained with 5 classes but the mhsanet model has 9"):
        load_state_dict_checked(other_classes, state, "a.pth")
    baseline, _ = _model("model.name=baseline")
    with pytest.raises(CheckpointError, match="does not fit this baseline model") as exc:
        load_state_dict_checked(baseline, state, "a.pth")
    assert "\n" not in str(exc.value)
    other_k, _ = _model("model.mhsanet.num_heads=3")
    with pytest.raises(CheckpointError, match="other shapes"):
        load_state_dict_checked(other_k, state, "a.pth")


def test_hacnn_is_dispatched_to_its_module():
    model, _ = _model("model.name=hacnn")
    assert model.model_name == "hacnn" and "local" in model.classifiers
    with pytest.raises(ConfigError, match="model.name"):
        build_model(dataclasses.replace(_cfg().model, name="osnet"), 5)


def test_attention_logit_cap_bounds_the_softmax():
    """c tanh(l / c): with c = 2 no position can take more than e^4 times another's weight."""
    from attnreid.models.mhsanet import MultiHeadSelfAttention

    torch.manual_seed(0)
    capped = MultiHeadSelfAttention(8, 2, 4, 4, logit_cap=2.0)
    plain = MultiHeadSelfAttention(8, 2, 4, 4)
    plain.load_state_dict(capped.state_dict())
    q = torch.randn(3, 5, 8) * 100.0  # huge logits: the plain softmax is one-hot
    with torch.no_grad():
        a_cap, a_plain = capped.attention(q), plain.attention(q)
        logits = plain.w2(torch.relu(plain.w1(q))).transpose(1, 2)
    assert float(a_plain.max()) > 0.999
    ratio = a_cap.max(dim=2).values / a_cap.min(dim=2).values
    assert float(ratio.max()) <= math.exp(4.0) * (1 + 1e-5)
    expected = (2.0 * torch.tanh(logits / 2.0)).softmax(dim=2)
    torch.testing.assert_close(a_cap, expected)


def test_row_prior_matches_a_hand_computation():
    """model.mhsanet.head_prior=rows: head k's logits get -(y - mu_k)^2 / (2 sigma^2), mu_k = (k + .5) / K."""
    from attnreid.models.mhsanet import MultiHeadSelfAttention

    m = MultiHeadSelfAttention(4, 2, 3, 3, head_prior="rows", head_prior_width=1.0)
    prior = m.row_prior(2, 3)  # grid 2 x 3: rows at heights 0.25 and 0.75; K = 2: mu = 0.25, 0.75; sigma = 0.5
    top, bottom = 0.0, -(0.5 ** 2) / (2 * 0.25)  # -0.5
    expected = torch.tensor([[top] * 3 + [bottom] * 3, [bottom] * 3 + [top] * 3])
    torch.testing.assert_close(prior, expected)
    q = torch.randn(2, 6, 4)
    with torch.no_grad():
        logits = m.w2(torch.relu(m.w1(q))).transpose(1, 2)
        torch.testing.assert_close(m.attention(q, (2, 3)), (logits + expected).softmax(dim=2))
    with pytest.raises(ValueError, match="grid"):
        m.attention(q)


def test_head_prior_separates_the_heads_and_keeps_the_checkpoint_layout():
    """Identical heads (same w2 rows) give identical maps without a prior and different heights with one."""
    from attnreid.evaluation.attention_stats import head_heights, head_overlap
    from attnreid.models.mhsanet import MultiHeadSelfAttention

    torch.manual_seed(0)
    plain = MultiHeadSelfAttention(8, 4, 6, 5)
    with torch.no_grad():
        plain.w2.weight.copy_(plain.w2.weight[:1].expand(4, -1))  # exchangeable heads
    rows = MultiHeadSelfAttention(8, 4, 6, 5, head_prior="rows")
    assert set(rows.state_dict()) == set(plain.state_dict())  # the stripes are not saved
    rows.load_state_dict(plain.state_dict())
    fmap = torch.randn(3, 8, 8, 4)
    _, a_plain = plain(fmap)
    _, a_rows = rows(fmap)
    assert head_overlap(a_plain) == pytest.approx(1.0, abs=1e-6)
    assert head_overlap(a_rows) < 0.7
    heights = head_heights(a_rows.reshape(3, 4, 8, 4))
    assert heights == sorted(heights) and heights[-1] - heights[0] > 0.4


def test_learned_head_prior_gets_gradients_and_starts_on_the_stripes():
    from attnreid.models.mhsanet import MultiHeadSelfAttention

    torch.manual_seed(0)
    fixed = MultiHeadSelfAttention(8, 3, 6, 5, head_prior="rows", head_prior_width=0.5)
    learned = MultiHeadSelfAttention(8, 3, 6, 5, head_prior="rows_learned", head_prior_width=0.5)
    assert {"prior_shift", "prior_log_scale"} <= {n for n, _ in learned.named_parameters()}
    learned.load_state_dict({**fixed.state_dict(), "prior_shift": torch.zeros(3), "prior_log_scale": torch.zeros(3)})
    fmap = torch.randn(2, 8, 6, 2)
    torch.testing.assert_close(learned(fmap)[1], fixed(fmap)[1])
    learned(fmap)[0].square().sum().backward()
    assert float(learned.prior_shift.grad.abs().sum()) > 0 and float(learned.prior_log_scale.grad.abs().sum()) > 0


@pytest.mark.parametrize("prior", ["rows", "rows_learned"])
def test_mhsanet_with_a_head_prior_trains_and_exports_its_maps(prior):
    model, _ = _model(f"model.mhsanet.head_prior={prior}", "model.mhsanet.attention_logit_cap=2.0")
    out = model(torch.randn(4, 3, 64, 32))
    assert out["alpha"].shape[1] == model.num_heads
    model.eval()
    att = model.forward_attention(torch.randn(2, 3, 64, 32))["attention"]
    assert att.shape[:2] == (2, model.num_heads) and torch.allclose(att.flatten(2).sum(2), torch.ones(2, model.num_heads))


def test_head_prior_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.mhsanet.head_prior"):
        _model("model.mhsanet.head_prior=columns")
    with pytest.raises(ConfigError, match="model.mhsanet.head_prior_width"):
        _model("model.mhsanet.head_prior_width=0")


def test_column_term_of_the_head_prior_by_hand():
    """head_prior_columns = s: every head's logits also get -(x - 0.5)^2 / (2 s^2), x = (col + .5) / w."""
    from attnreid.models.mhsanet import MultiHeadSelfAttention

    rows = MultiHeadSelfAttention(4, 2, 3, 3, head_prior="rows")
    both = MultiHeadSelfAttention(4, 2, 3, 3, head_prior="rows", head_prior_columns=0.25)
    x = torch.tensor([0.125, 0.375, 0.625, 0.875])
    col = -((x - 0.5) ** 2) / (2 * 0.25 ** 2)  # -1.125, -0.125, -0.125, -1.125
    torch.testing.assert_close(both.row_prior(3, 4), rows.row_prior(3, 4) + col.repeat(3)[None, :])
    with pytest.raises(ConfigError, match="head_prior_columns"):
        MultiHeadSelfAttention(4, 2, 3, 3, head_prior_columns=0.25)
