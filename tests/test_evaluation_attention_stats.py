"""Head-diversity diagnostics against hand computations."""

import math

import pytest
import torch

from attnreid.evaluation.attention_stats import (
    attention_stats,
    beta_entropy,
    beta_entropy_max,
    beta_mean,
    alpha_below,
    head_overlap,
)

# Image 0: head 0 on the left half, head 1 on the right half, head 2 uniform.
#   overlaps: (0,1) = 0, (0,2) = 0.25 + 0.25 = 0.5, (1,2) = 0.5 -> mean 1/3
# Image 1: three identical maps -> 1.
ALPHA = torch.tensor([
    [[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 0.25, 0.25]],
    [[0.1, 0.2, 0.3, 0.4]] * 3,
])


def test_head_overlap_by_hand():
    assert head_overlap(ALPHA[:1]) == pytest.approx(1 / 3, rel=1e-6)
    assert head_overlap(ALPHA[1:]) == pytest.approx(1.0, rel=1e-6)
    assert head_overlap(ALPHA) == pytest.approx((1 / 3 + 1) / 2, rel=1e-6)
    disjoint = torch.eye(4)[None, :2]  # two one-hot maps on different positions
    assert head_overlap(disjoint) == 0.0


def test_head_overlap_accepts_grids_and_unnormalised_maps():
    assert head_overlap(ALPHA.view(2, 3, 2, 2)) == pytest.approx(2 / 3, rel=1e-6)
    scaled = ALPHA * torch.tensor([2.0, 0.5, 3.0])[None, :, None]  # attention_norm=heads: maps need not sum to 1
    assert head_overlap(scaled) == pytest.approx(2 / 3, rel=1e-6)
    assert head_overlap(ALPHA[:, :1]) is None  # K = 1: no pair of heads


def test_beta_entropy_in_nats_by_hand():
    beta = torch.tensor([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]])
    assert beta_entropy(beta) == pytest.approx(math.log(3) / 2, rel=1e-6)
    assert beta_entropy(torch.tensor([[0.5, 0.5, 0.0]])) == pytest.approx(math.log(2), rel=1e-6)
    assert beta_entropy_max(3) == pytest.approx(1.0986123, rel=1e-6)
    assert beta_mean(beta) == pytest.approx([2 / 3, 1 / 6, 1 / 6], rel=1e-6)


def test_alpha_below_and_summary():
    alpha = torch.tensor([[[0.0005, 0.002, 0.5, 0.0001]], [[0.9, 0.05, 0.001, 0.0002]]])
    assert alpha_below(alpha, 1e-3) == pytest.approx(3 / 8)  # 0.001 itself is not below
    stats = attention_stats(ALPHA, torch.tensor([[1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]]), gamma=0.2)
    assert stats["head_overlap"] == pytest.approx(2 / 3, rel=1e-6)
    assert stats["beta_entropy"] == pytest.approx(math.log(3) / 2, rel=1e-6)
    assert stats["beta_entropy_max"] == pytest.approx(math.log(3), rel=1e-6)
    # below 0.2: the 4 zeros of image 0, the 0.1 of each of image 1's 3 heads (0.2 is not below)
    assert stats["alpha_below_gamma"] == pytest.approx(7 / 24)
    assert stats["num_images"] == 2
    one = attention_stats(ALPHA[:, :1])  # K = 1: no pairs, no beta
    assert set(one) == {"num_images", "map_consistency"}
    # mean map (.3, .35, .15, .2): min with (.5, .5, 0, 0) = .65, with (.1, .2, .3, .4) = .65
    assert one["map_consistency"] == pytest.approx(0.65)


def test_eval_json_holds_the_attention_stats_of_mhsanet(synthetic_root, tmp_path):
    import json

    from attnreid.config import load_config
    from attnreid.data.datasets import build_dataset
    from attnreid.engine.evaluator import attention_diagnostics, evaluate_model
    from attnreid.models import build_model

    cfg = load_config(overrides=["model.backbone.name=mobilenetv3_small", "model.mhsanet.num_heads=3",
                                 "data.height=64", "data.width=32", "data.workers=0", "data.test_batch_size=16"])
    dataset = build_dataset("market1501", synthetic_root)
    torch.manual_seed(0)
    model = build_model(cfg.model, dataset.num_train_pids)
    metrics = evaluate_model(model, dataset, cfg, out_dir=tmp_path)
    stats = json.loads((tmp_path / "eval.json").read_text())["attention_stats"]
    assert stats == metrics["attention_stats"]  # JSON round-trips Python floats exactly
    assert stats["num_images"] == min(len(dataset.query), 128)
    assert 0.0 <= stats["head_overlap"] <= 1.0 and 0.0 <= stats["beta_entropy"] <= stats["beta_entropy_max"]
    assert stats["beta_entropy_max"] == pytest.approx(math.log(3)) and len(stats["beta_mean"]) == 3
    assert 0.0 <= stats["alpha_below_gamma"] <= 1.0
    assert attention_diagnostics(model, dataset.query, cfg.data, max_images=5)["num_images"] == 5
    baseline = build_model(load_config(overrides=["model.name=baseline", "model.backbone.name=mobilenetv3_small"]).model, 4)
    assert attention_diagnostics(baseline, dataset.query, cfg.data) is None


def test_head_heights_and_centre_mass_by_hand():
    """Grid 2 x 4. Head 0: all on the top row's middle columns; head 1: half on each bottom corner."""
    from attnreid.evaluation.attention_stats import centre_columns, centre_mass, head_heights

    a = torch.zeros(1, 2, 2, 4)
    a[0, 0, 0, 1] = a[0, 0, 0, 2] = 0.5
    a[0, 1, 1, 0] = a[0, 1, 1, 3] = 0.5
    assert head_heights(a) == pytest.approx([0.25, 0.75])
    # columns at 0.125, 0.375, 0.625, 0.875: the middle half counts the two inner ones
    assert centre_mass(a) == pytest.approx((1.0 + 0.0) / 2)
    assert centre_columns(4) == pytest.approx(0.5)
    assert centre_mass(torch.full((3, 2, 2, 4), 1 / 8)) == pytest.approx(centre_columns(4))
    assert centre_columns(3) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="grid"):
        centre_mass(a.flatten(2))


def test_map_consistency_by_hand():
    """Two images, one head, three positions: maps (1, 0, 0) and (0, 1, 0); mean (.5, .5, 0) -> overlap .5 each."""
    from attnreid.evaluation.attention_stats import map_consistency

    a = torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]]])
    assert map_consistency(a) == pytest.approx(0.5)
    assert map_consistency(torch.cat([a[:1], a[:1]])) == pytest.approx(1.0)
    assert map_consistency(a[:1]) is None
