"""Bag of tricks (BoT, Luo et al. 2019): BNNeck on every model, center loss with its own SGD, the BoT configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from attnreid.config import load_config
from attnreid.errors import ConfigError
from attnreid.losses import build_criterion
from attnreid.engine.optim import center_optimizer, step_centers
from attnreid.losses.center import CenterLoss, center_parameters
from attnreid.models import build_model
from attnreid.models.baseline import BNNeckClassifier

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SMALL = ["model.backbone.name=resnet18", "model.backbone.pretrained=false", "data.height=64", "data.width=32",
         "model.bnneck=true", "model.mhsanet.num_heads=2"]


def _cfg(*extra):
    return load_config(None, SMALL + list(extra))


def _bn_by_hand(bn, f):
    """Eval-mode BatchNorm1d from its running statistics."""
    return (f - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias


def test_bnneck_classifier_has_no_shift_and_no_classifier_bias():
    head = BNNeckClassifier(6, 3)
    assert head.fc.bias is None and not head.bn.bias.requires_grad and torch.all(head.bn.bias == 0)
    f = torch.randn(5, 6)
    head.train()
    by_hand = (f - f.mean(0)) / torch.sqrt(f.var(0, unbiased=False) + head.bn.eps) * head.bn.weight
    assert torch.allclose(head(f), by_hand @ head.fc.weight.T, atol=1e-5)


def test_baseline_bnneck_triplet_before_ce_after_test_feature_after():
    torch.manual_seed(0)
    model = build_model(_cfg("model.name=baseline", "model.test_feature=global", "model.global_reduce=false").model, 4)
    assert model.feature_dim == model.global_dim == 512  # resnet18's C: q = GAP(Q), no reduction
    x = torch.randn(4, 3, 64, 32)
    out = model.train()(x)
    q = out["q_star"]
    assert torch.equal(out["features"]["global"], q)  # the triplet / center input: before the BN
    head = model.classifiers["global"]
    by_hand = (q - q.mean(0)) / torch.sqrt(q.var(0, unbiased=False) + head.bn.eps) * head.bn.weight
    assert torch.allclose(out["logits"]["global"], by_hand @ head.fc.weight.T, atol=1e-4)
    with torch.no_grad():
        head.bn.running_mean.fill_(0.5)
        head.bn.running_var.fill_(4.0)
    model.eval()
    with torch.no_grad():
        q_eval = model.global_branch(model.backbone(x))
        assert torch.allclose(model(x), _bn_by_hand(head.bn, q_eval), atol=1e-5)  # the test feature: after


@pytest.mark.parametrize("name, feature", [("mhsanet", "star"), ("mhsanet", "global"), ("hacnn", "global")])
def test_every_model_takes_the_bnneck(name, feature):
    torch.manual_seed(0)
    extra = ["data.height=80", "data.width=32", "model.hacnn.widths=[32,64,96]"] if name == "hacnn" else []
    model = build_model(_cfg(f"model.name={name}", f"model.test_feature={feature}", *extra).model, 4)
    assert all(isinstance(c, BNNeckClassifier) for c in model.classifiers.values())
    x = torch.randn(4, 3, 80 if name == "hacnn" else 64, 32)
    out = model.train()(x)
    assert "global" in out["features"]
    head = model.classifiers["saffm" if feature == "star" else "global"]
    with torch.no_grad():
        head.bn.running_mean.normal_()
        head.bn.running_var.uniform_(0.5, 2.0)
        model.eval()
        if name == "hacnn":
            pre = model._backbone(x)["global"]
            expected = F.normalize(_bn_by_hand(head.bn, pre), dim=1)
        else:
            fmap = model.backbone(x)
            pre = model.fusion(model.mhsam(fmap)[0])[0] if feature == "star" else model.global_branch(fmap)
            expected = _bn_by_hand(head.bn, pre)
        assert torch.allclose(model(x), expected, atol=1e-4)


def test_center_loss_by_hand_and_its_own_sgd_step():
    torch.manual_seed(0)
    center = CenterLoss(3, 2)
    f = torch.tensor([[1.0, 2.0], [0.0, -1.0], [3.0, 1.0]], requires_grad=True)
    y = torch.tensor([0, 2, 0])
    c = center.centers.detach().clone()
    by_hand = (((f[0] - c[0]) ** 2).sum() + ((f[1] - c[2]) ** 2).sum() + ((f[2] - c[0]) ** 2).sum()) / 3
    loss = center(f, y)
    assert torch.allclose(loss, by_hand)

    weight, lr = 5e-4, 0.5
    holder = torch.nn.Module()
    holder.center = center
    opt = center_optimizer(holder, lr)
    (weight * center(f, y)).backward()  # the total loss carries the weight
    step_centers(holder, opt, weight)
    # BoT: the centres move by lr times the gradient of the *unweighted* loss
    grad = torch.zeros_like(c)
    grad[0] = -2 * ((f[0] - c[0]) + (f[2] - c[0])).detach() / 3
    grad[2] = -2 * (f[1] - c[2]).detach() / 3
    assert torch.allclose(center.centers.detach(), c - lr * grad, atol=1e-6)
    assert center_parameters(holder) == [center.centers] and center_optimizer(torch.nn.Linear(1, 1), lr) is None


def test_criterion_adds_the_global_triplet_and_center_terms():
    cfg = _cfg("model.name=baseline", "model.test_feature=global", "loss.global_triplet=1.0",
               "loss.center_weight=5e-4", "loss.label_smoothing=0.1")
    model = build_model(cfg.model, 4).train()
    criterion = build_criterion(cfg.loss, cfg.model, num_classes=4, global_dim=model.global_dim)
    assert criterion.weights == {"ce_global": 1.0, "tri_global": 1.0, "center": 5e-4}
    assert center_parameters(criterion)[0].shape == (4, model.global_dim)
    assert any(k.endswith("centers") for k in criterion.state_dict())  # checkpoints carry the centres
    y = torch.tensor([0, 0, 1, 1])
    out = model(torch.randn(4, 3, 64, 32))
    total, terms = criterion(out, y)
    expected_center = ((out["features"]["global"] - criterion.center.centers[y]) ** 2).sum(1).mean()
    assert torch.allclose(terms["center"], expected_center.detach())
    total.backward()
    assert criterion.center.centers.grad is not None and model.backbone.conv1.weight.grad is not None


def test_bot_terms_need_the_bnneck_and_the_centres_size():
    plain = load_config(None, ["model.name=baseline", "model.test_feature=global", "loss.global_triplet=1.0"])
    with pytest.raises(ConfigError, match="model.bnneck"):
        build_criterion(plain.loss, plain.model)
    cfg = _cfg("model.name=baseline", "model.test_feature=global", "loss.center_weight=5e-4")
    with pytest.raises(ConfigError, match="num_classes"):
        build_criterion(cfg.loss, cfg.model)
    with pytest.raises(ConfigError, match="model.global_reduce"):
        build_model(_cfg("model.global_reduce=false").model, 4)
    with pytest.raises(ConfigError, match="loss.center_weight"):
        load_config(None, ["loss.center_weight=-1"])


@pytest.mark.parametrize("dataset", ["market1501", "dukemtmcreid"])
def test_bot_configs_are_the_bot_recipe(dataset):
    cfg = load_config(CONFIGS / "bot" / f"{dataset}.yaml")
    assert cfg.data.dataset == dataset and (cfg.data.height, cfg.data.width) == (256, 128)
    assert cfg.model.name == "baseline" and cfg.model.backbone.name == "resnet50" and cfg.model.backbone.last_stride == 1
    assert cfg.model.backbone.pretrained and cfg.model.bnneck and not cfg.model.global_reduce
    assert cfg.optim.name == "adam" and cfg.optim.lr == 3.5e-4 and cfg.train.epochs == 120
    assert (cfg.optim.warmup_epochs, cfg.optim.milestones) == (10, [40, 70])
    assert cfg.loss.label_smoothing == 0.1 and cfg.data.random_erasing == 0.5
    assert cfg.loss.center_weight == 5e-4 and cfg.loss.center_lr == 0.5 and cfg.loss.global_triplet == 1.0
    assert (cfg.data.batch_size, cfg.data.num_instances) == (64, 4)
    # BoT's README: 94.5 (85.9) / 86.4 (76.4) with center loss; 94.1 (85.7) / 86.2 (75.9) is the row before it
    published = {"market1501": ("94.5% (85.9%)", "94.1% (85.7%)"), "dukemtmcreid": ("86.4% (76.4%)", "86.2% (75.9%)")}
    text = (CONFIGS / "bot" / f"{dataset}.yaml").read_text()
    assert all(row in text for row in published[dataset])
    assert f"center loss (this file's recipe):  {published[dataset][0]}" in text


def test_bot_recipe_trains_end_to_end_on_the_synthetic_set(synthetic_root, tmp_path):
    import json

    import yaml

    from helpers import run_cli

    config = tmp_path / "bot_tiny.yaml"
    config.write_text(yaml.safe_dump({
        "_base_": str(CONFIGS / "bot" / "market1501.yaml"),
        "data": {"root": str(synthetic_root), "height": 64, "width": 32, "batch_size": 8, "num_instances": 2,
                 "test_batch_size": 32, "workers": 0},
        "model": {"backbone": {"name": "mobilenetv3_small", "pretrained": False}},
        "optim": {"warmup_epochs": 0, "milestones": []},
        "train": {"epochs": 1, "max_steps_per_epoch": 2, "eval_every": 0, "device": "cpu", "threads": 1},
    }))
    code, out, err = run_cli(["train", config, "--out", tmp_path / "run"])
    assert code == 0, err
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    train = [r for r in log if r.get("type") == "train"]
    assert train and {"ce_global", "tri_global", "center"} <= set(train[-1])
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["feature_dim"] == 576
