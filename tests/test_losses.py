"""Each loss equation against a hand computation on tiny tensors."""

import math

import pytest
import torch

from attnreid.config import load_config
from attnreid.errors import ConfigError
from attnreid.losses import build_criterion, cross_entropy
from attnreid.losses.regularizers import attention_competition, feature_diversity
from attnreid.losses.triplet import batch_hard_triplet, improved_hard_triplet, pairwise_squared_distance


def test_pairwise_squared_distance_matches_definition():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 3, generator=g), torch.randn(5, 3, generator=g)
    expected = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    assert torch.allclose(pairwise_squared_distance(a, b), expected, atol=1e-5)


def test_batch_hard_triplet_by_hand():
    # 1-D features; squared distances: hardest positive / negative per anchor worked out by hand.
    f = torch.tensor([[0.0], [2.0], [1.0], [5.0]])
    y = torch.tensor([0, 0, 1, 1])
    # anchor 0: pos 4, neg min(1, 25) = 1 -> 3.3; anchor 1: pos 4, neg min(1, 9) = 1 -> 3.3
    # anchor 2: pos 16, neg min(1, 1) = 1 -> 15.3; anchor 3: pos 16, neg min(25, 9) = 9 -> 7.3
    expected = (3.3 + 3.3 + 15.3 + 7.3) / 4
    assert batch_hard_triplet(f, y, margin=0.3).item() == pytest.approx(expected, rel=1e-6)
    # Far-apart identities: every hinge inactive.
    f2 = torch.tensor([[0.0], [0.1], [10.0], [10.1]])
    assert batch_hard_triplet(f2, y, margin=0.3).item() == 0.0


def test_batch_hard_triplet_ignores_anchor_without_positive():
    f = torch.tensor([[0.0], [2.0], [1.0]])
    y = torch.tensor([0, 0, 1])  # image 2 has no other image of its identity
    expected = (0.3 + 4 - 1) * 2 / 2
    assert batch_hard_triplet(f, y, margin=0.3).item() == pytest.approx(expected, rel=1e-6)


IHTL_P = torch.tensor([[[0.0], [1.0]], [[2.0], [4.0]], [[10.0], [11.0]], [[1.5], [20.0]]])  # B=4, K=2, E=1
IHTL_Y = torch.tensor([0, 0, 1, 1])
# Per image pair (K x K block): positives take the max, negatives the min:
#   d(0,1) = max{4, 16, 1, 9} = 16        d(2,3) = max{72.25, 100, 90.25, 81} = 100
#   d(0,2) = 81, d(0,3) = 0.25, d(1,2) = 36, d(1,3) = 0.25
# Hardest per anchor: 0: (16, 0.25)  1: (16, 0.25)  2: (100, 36)  3: (100, 0.25)
IHTL_GAPS = [16 - 0.25, 16 - 0.25, 100 - 36, 100 - 0.25]


def test_ihtl_hinge_by_hand():
    expected = sum(3.0 + g for g in IHTL_GAPS) / 4  # 51.8125
    assert improved_hard_triplet(IHTL_P, IHTL_Y, margin=3.0).item() == pytest.approx(expected, rel=1e-6)


def test_ihtl_soft_by_hand():
    expected = sum(math.log1p(math.exp(g)) for g in IHTL_GAPS) / 4
    assert improved_hard_triplet(IHTL_P, IHTL_Y, soft=True).item() == pytest.approx(expected, rel=1e-6)


def _ihtl_reference(p, y, margin):
    """Eq. 5 written as loops over anchors, other images and head pairs."""
    b, k, _ = p.shape
    losses = []
    for a in range(b):
        pos, neg = -math.inf, math.inf
        for o in range(b):
            if o == a:
                continue
            d = [float(((p[a, i] - p[o, j]) ** 2).sum()) for i in range(k) for j in range(k)]
            if y[a] == y[o]:
                pos = max(pos, max(d))
            else:
                neg = min(neg, min(d))
        losses.append(max(0.0, margin + pos - neg))
    return sum(losses) / b


def test_ihtl_matches_loop_reference_on_random_heads():
    g = torch.Generator().manual_seed(1)
    p = torch.randn(6, 3, 4, generator=g)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    assert improved_hard_triplet(p, y, margin=3.0).item() == pytest.approx(_ihtl_reference(p, y, 3.0), rel=1e-5)


def test_fdrt_zero_for_orthonormal_heads_and_by_hand():
    orth = torch.eye(3, 5) * torch.tensor([[2.0], [0.5], [3.0]])  # orthogonal rows of any length
    assert feature_diversity(orth[None]).item() == pytest.approx(0.0, abs=1e-7)
    # rows [1,0] and [1,1]: G - I has off-diagonals 1/sqrt(2); ||.||_F = 1; / K^2 = 0.25.
    skew = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert feature_diversity(skew[None]).item() == pytest.approx(0.25, rel=1e-6)
    batch = torch.stack([skew, torch.eye(2)])
    assert feature_diversity(batch).item() == pytest.approx(0.125, rel=1e-6)


def test_acm_counts_only_entries_below_gamma():
    alpha = torch.tensor([[[0.0005, 0.002, 0.5, 0.0001]], [[0.9, 0.05, 0.0, 0.0002]]], requires_grad=True)
    gamma = 1e-3
    per_image = [0.0005**2 + 2 * gamma**2 + 0.0001**2, 2 * gamma**2 + 0.0 + 0.0002**2]
    loss = attention_competition(alpha, gamma)
    assert loss.item() == pytest.approx(sum(per_image) / 2, rel=1e-5)
    loss.backward()
    below = alpha.detach() < gamma
    assert torch.allclose(alpha.grad[below], alpha.detach()[below])  # d/da (a^2 / B) = 2a / 2
    assert torch.all(alpha.grad[~below] == 0)


def test_cross_entropy_label_smoothing_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0]])
    logp = torch.log_softmax(logits, 1)[0]
    assert cross_entropy(logits, torch.tensor([0])).item() == pytest.approx(-logp[0].item(), rel=1e-6)
    eps = 0.3
    expected = -(1 - eps) * logp[0].item() - eps / 3 * logp.sum().item()
    assert cross_entropy(logits, torch.tensor([0]), eps).item() == pytest.approx(expected, rel=1e-6)


def _fake_mhsanet_outputs(b=4, k=3, e=6, j=5, c=7, rlm=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    out = {
        "logits": {"global": r(b, c), "saffm": r(b, c)},
        "features": {"saffm": r(b, e)},
        "P": r(b, k, e),
        "alpha": r(b, k, j).softmax(-1),
    }
    if rlm:
        out["logits"]["rlm"] = r(b, c)
        out["features"]["rlm"] = r(b, e)
    return out


LABELS = torch.tensor([0, 0, 1, 1])
ALL_TERMS = {"ce_global", "ce_saffm", "tri_saffm", "ce_rlm", "tri_rlm", "fdrt", "ihtl", "acm"}


def _criterion(*overrides):
    cfg = load_config(overrides=list(overrides))
    return build_criterion(cfg.loss, cfg.model), cfg


def test_total_is_eq_11_plus_13_with_config_weights():
    crit, cfg = _criterion("loss.lambda_fdrt=0.5", "loss.rlm_triplet=2.0")
    out = _fake_mhsanet_outputs()
    total, terms = crit(out, LABELS)
    assert set(terms) == ALL_TERMS
    w = {"ce_global": 1, "ce_saffm": 1, "tri_saffm": 1, "ce_rlm": 1, "tri_rlm": 2.0, "fdrt": 0.5,
         "ihtl": cfg.loss.lambda_ihtl, "acm": cfg.loss.lambda_acm}
    assert total.item() == pytest.approx(sum(w[k] * terms[k].item() for k in terms), rel=1e-6)
    assert terms["fdrt"].item() == pytest.approx(feature_diversity(out["P"]).item(), rel=1e-6)
    assert terms["ihtl"].item() == pytest.approx(improved_hard_triplet(out["P"], LABELS, 3.0).item(), rel=1e-6)
    assert all(not v.requires_grad and v.dim() == 0 for v in terms.values())


@pytest.mark.parametrize(
    "overrides, removed",
    [
        (["loss.global_ce=false"], {"ce_global"}),  # MHSA-Net-dagger
        (["model.mhsanet.rlm=false"], {"ce_rlm", "tri_rlm"}),  # Table IX w/o RLM
        (["loss.lambda_fdrt=0", "loss.lambda_ihtl=0", "loss.lambda_acm=0"], {"fdrt", "ihtl", "acm"}),  # +MHSAM
        (["loss.lambda_acm=0"], {"acm"}),
        (["loss.saffm_triplet=0", "loss.rlm_triplet=0"], {"tri_saffm", "tri_rlm"}),
    ],
)
def test_variant_switches_remove_exactly_their_terms(overrides, removed):
    crit, cfg = _criterion(*overrides)
    out = _fake_mhsanet_outputs(rlm=cfg.model.mhsanet.rlm)
    _, terms = crit(out, LABELS)
    assert set(terms) == ALL_TERMS - removed


def test_zero_weight_term_is_not_computed():
    out = _fake_mhsanet_outputs()
    del out["P"]  # FDRT and IHTL are the only terms that read P
    crit, _ = _criterion("loss.lambda_ihtl=0", "loss.lambda_fdrt=0")
    _, terms = crit(out, LABELS)
    assert "ihtl" not in terms and "fdrt" not in terms
    with pytest.raises(KeyError):
        _criterion("loss.lambda_ihtl=0")[0](out, LABELS)


def test_baseline_and_hacnn_criteria():
    crit, _ = _criterion("model.name=baseline")
    logits = torch.randn(4, 7)
    total, terms = crit({"logits": {"global": logits}, "features": {}}, LABELS)
    assert set(terms) == {"ce_global"}
    crit, _ = _criterion("model.name=hacnn", "loss.label_smoothing=0.1")
    local = torch.randn(4, 7)
    total, terms = crit({"logits": {"global": logits, "local": local}, "features": {}}, LABELS)
    assert set(terms) == {"ce_global", "ce_local"}
    expected = cross_entropy(logits, LABELS, 0.1) + cross_entropy(local, LABELS, 0.1)
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)


def test_all_weights_zero_is_one_line_error():
    with pytest.raises(ConfigError, match="every loss weight is 0"):
        _criterion("model.name=baseline", "loss.global_ce=false")


def test_distances_stay_float32_under_autocast():
    g = torch.Generator().manual_seed(0)
    a = 50 + torch.randn(6, 64, generator=g)  # large norms, small differences: bf16 expansion would cancel badly
    exact = ((a[:, None, :] - a[None, :, :]) ** 2).sum(-1)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        d = pairwise_squared_distance(a, a)
        f = feature_diversity(a.view(2, 3, 64))
    assert d.dtype == torch.float32 and torch.allclose(d, exact, rtol=1e-3, atol=1e-2)
    assert f.dtype == torch.float32 and f.item() == pytest.approx(feature_diversity(a.view(2, 3, 64)).item(), rel=1e-5)
