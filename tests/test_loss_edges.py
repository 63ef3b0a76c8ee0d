"""Loss contracts outside the equations: bad config values are one line naming the key and the
choices, a batch without any valid triplet gives 0 (not NaN), and the documented defaults."""

from __future__ import annotations

import re

import pytest
import torch

from attnreid.config import load_config
from attnreid.errors import ConfigError
from attnreid.losses import batch_hard_triplet, build_criterion
from attnreid.losses.triplet import pairwise_distance

TINY = ["model.backbone.name=mobilenetv3_small", "model.mhsanet.num_heads=2"]


@pytest.mark.parametrize("key, value, needle", [
    ("triplet_distance", "cosine", "expected one of: euclidean, squared"),
    ("ihtl_distance", "cosine", "expected one of: euclidean, squared"),
    ("fdrt_form", "frobenius", "expected one of: paper, gram"),
    ("acm_form", "square", "expected one of: paper, linear"),
    ("triplet_margin", "wide", ""),
    ("ihtl_margin", "wide", ""),
])
def test_bad_loss_choice_is_one_line_naming_the_key_and_the_choices(key, value, needle):
    cfg = load_config(overrides=TINY)
    setattr(cfg.loss, key, value)  # past the schema's own check: the criterion checks again
    with pytest.raises(ConfigError) as info:
        build_criterion(cfg.loss, cfg.model)
    message = str(info.value)
    assert "\n" not in message and f"config key 'loss.{key}' is {value!r}" in message
    assert re.search(re.escape(needle), message)


@pytest.mark.parametrize("margin, distance", [("soft", "euclidean"), (0.3, "squared")])
def test_batch_without_a_positive_pair_gives_zero_and_a_zero_gradient(margin, distance):
    """An anchor without a positive (or negative) is left out; with none left the loss is 0."""
    features = torch.randn(4, 8, requires_grad=True)
    loss = batch_hard_triplet(features, torch.arange(4), margin, distance)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(features.grad, torch.zeros_like(features))


def test_pairwise_distance_defaults_to_euclidean():
    a, b = torch.randn(3, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    ref = torch.cdist(a, b)
    torch.testing.assert_close(pairwise_distance(a, b).double(), ref, rtol=1e-5, atol=1e-5 * float(ref.max()))
