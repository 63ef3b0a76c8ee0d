"""BoT's center loss in the trainer: the centres' own SGD, outside the main optimiser, and resume."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from torch import nn

from attnreid.config import load_config
from attnreid.engine.checkpoint import load_checkpoint, save_checkpoint
from attnreid.engine.optim import WarmupStepScheduler, build_optimizer, build_optimizers, center_optimizer
from attnreid.engine.trainer import TrainState, train, train_step
from attnreid.losses import build_criterion
from attnreid.losses.center import center_parameters
from attnreid.models import build_model

from test_engine import StopAtEpoch, tiny_cfg

BOT = ["model.bnneck=true", "loss.center_weight=5e-4", "loss.center_lr=0.5", "loss.global_triplet=1.0",
       "optim.weight_decay=5e-4"]


class TinyNet(nn.Module):
    """What the criterion reads from a model: the global feature before the BNNeck and its logits."""

    def __init__(self, dim: int = 3, classes: int = 4):
        super().__init__()
        self.embed = nn.Linear(5, dim)
        self.classify = nn.Linear(dim, classes)

    def forward(self, x):
        f = self.embed(x)
        return {"features": {"global": f}, "logits": {"global": self.classify(f)}}


def _tiny_step_setup(*extra):
    cfg = load_config(None, ["model.name=baseline", *BOT, *extra])
    torch.manual_seed(0)
    model = TinyNet()
    criterion = build_criterion(cfg.loss, cfg.model, num_classes=4, global_dim=3)
    return cfg, model, criterion


def test_the_main_optimiser_leaves_the_centres_to_their_own_sgd():
    cfg = load_config(None, ["model.name=baseline", "model.backbone.name=mobilenetv3_small",
                             "model.backbone.pretrained=false", *BOT])
    model = build_model(cfg.model, 5)
    criterion = build_criterion(cfg.loss, cfg.model, num_classes=5, global_dim=model.global_dim)
    optimizer = build_optimizer(cfg.optim, [model, criterion])
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    centres = center_parameters(criterion)
    assert len(centres) == 1 and id(centres[0]) not in held
    assert held == {id(p) for p in model.parameters() if p.requires_grad}  # everything else is still there
    center_opt = center_optimizer(criterion, cfg.loss.center_lr)
    group = center_opt.param_groups[0]
    assert group["params"] == centres and (group["lr"], group["momentum"], group["weight_decay"]) == (0.5, 0, 0)
    # The warm-up/decay schedule sets the main optimiser's lr only.
    WarmupStepScheduler(optimizer, cfg.optim).set_epoch(0)
    assert optimizer.param_groups[0]["lr"] == cfg.optim.warmup_start_lr and group["lr"] == 0.5


@pytest.mark.parametrize("scaled", [False, True])
def test_one_train_step_moves_the_centres_by_minus_lr_times_the_unweighted_gradient(scaled):
    """c_k <- c_k - lr * dL_C/dc_k, dL_C/dc_k = -(2/B) sum_{i: y_i = k} (f_i - c_k), f from the
    weights before the step; Adam with weight decay (the main optimiser) must not touch them,
    and a loss scaler (fp16) must leave the step the same."""
    cfg, model, criterion = _tiny_step_setup()
    optimizers = build_optimizers(cfg.optim, cfg.loss, model, criterion)
    assert [s.name for s in optimizers] == ["optimizer", "center_optimizer"]
    x, y = torch.randn(6, 5), torch.tensor([0, 0, 1, 1, 3, 3])
    c = criterion.center.centers.detach().clone()
    f = model(x)["features"]["global"].detach()
    w = model.embed.weight.detach().clone()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) if scaled else None
    train_step(model, criterion, optimizers, x, y, contextlib.nullcontext, scaler, 0.0, TrainState())
    grad = torch.zeros_like(c)
    for k in range(4):
        rows = f[y == k]
        grad[k] = -2.0 * (rows - c[k]).sum(0) / len(y)
    expected = c - cfg.loss.center_lr * grad
    got = criterion.center.centers.detach()
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6 * float(c.abs().max()))
    assert torch.equal(got[2], c[2])  # no image of identity 2: its centre stays
    assert not torch.equal(model.embed.weight.detach(), w)  # and the main step did happen


def test_the_centres_grads_are_zeroed_every_step():
    """Two steps on the same batch: the second moves the centres by its own gradient, not the sum."""
    cfg, model, criterion = _tiny_step_setup()
    optimizers = build_optimizers(cfg.optim, cfg.loss, model, criterion)
    optimizers[0].optimizer.param_groups[0]["lr"] = 0.0  # the model stays put: f is the same both steps
    x, y = torch.randn(4, 5), torch.tensor([0, 0, 1, 1])
    f = model(x)["features"]["global"].detach()
    c = criterion.center.centers.detach().clone()
    for _ in range(2):
        train_step(model, criterion, optimizers, x, y, contextlib.nullcontext, None, 0.0, TrainState())
        for k in (0, 1):  # c <- c + lr * (2/B) * sum(f_i - c) = c + 0.5 * (mean of the two f - c)
            c[k] = c[k] + 0.5 * (f[y == k] - c[k]).sum(0) / 2
    assert torch.allclose(criterion.center.centers.detach(), c, atol=1e-5)


def test_without_center_loss_the_step_is_the_plain_optimiser_step():
    cfg = load_config(None, ["model.name=baseline", "model.bnneck=true", "optim.grad_clip=0.5"])
    criterion = build_criterion(cfg.loss, cfg.model)
    assert center_parameters(criterion) == [] and center_optimizer(criterion, 0.5) is None
    x, y = torch.randn(4, 5), torch.tensor([0, 0, 1, 1])
    runs = []
    for via_train_step in (True, False):
        torch.manual_seed(0)
        model = TinyNet()
        params = list(model.parameters())
        if via_train_step:
            slots = build_optimizers(cfg.optim, cfg.loss, model, criterion)
            assert len(slots) == 1 and slots[0].clip and set(map(id, slots[0].params())) == set(map(id, params))
            train_step(model, criterion, slots, x, y, contextlib.nullcontext, None, 0.5, TrainState())
        else:
            optimizer = build_optimizer(cfg.optim, [model, criterion])
            total, _ = criterion(model(x), y)
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, 0.5)
            optimizer.step()
        runs.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(*runs))


def _centre_cfg(root, *extra):
    return tiny_cfg(root, *BOT, "model.test_feature=global", *extra)


def test_resume_restores_the_centres_and_their_optimiser(synthetic_root, tmp_path):
    cfg = _centre_cfg(synthetic_root)
    train(cfg, tmp_path / "a", quiet=True)
    stopped = train(cfg, tmp_path / "b", hooks=[StopAtEpoch(1)], quiet=True)
    assert stopped["status"] == "interrupted"
    half = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pth")
    assert "center.centers" in half["criterion"] and "center_optimizer" in half
    train(cfg, tmp_path / "b", resume=True, quiet=True)
    a = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pth")
    b = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pth")
    ca, cb = a["criterion"]["center.centers"], b["criterion"]["center.centers"]
    assert not torch.allclose(ca, half["criterion"]["center.centers"])  # the second epoch moved them
    assert torch.allclose(ca, cb, atol=1e-5 * float(ca.abs().max()))
    assert a["center_optimizer"]["param_groups"] == b["center_optimizer"]["param_groups"]
    assert a["center_optimizer"]["state"].keys() == b["center_optimizer"]["state"].keys()
    assert all(torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-5) for k in a["model"])
    # The main optimiser's state holds the model's parameters only.
    n_model = sum(p.requires_grad for p in build_model(cfg.model, a["num_classes"]).parameters())
    assert len(a["optimizer"]["param_groups"][0]["params"]) == n_model


def test_an_old_checkpoint_without_saved_centres_still_resumes(synthetic_root, tmp_path, capsys):
    """Before the centres had their own SGD they were the main optimiser's last parameters and
    were not saved: such a last.pth resumes, with a note, and fresh centres."""
    cfg = _centre_cfg(synthetic_root)
    train(cfg, tmp_path / "old", hooks=[StopAtEpoch(1)], quiet=True)
    path = tmp_path / "old" / "checkpoints" / "last.pth"
    ckpt = load_checkpoint(path)
    saved_centres = ckpt.pop("criterion")["center.centers"]
    ckpt.pop("center_optimizer")
    group = ckpt["optimizer"]["param_groups"][0]
    extra = max(group["params"]) + 1
    group["params"].append(extra)
    ckpt["optimizer"]["state"][extra] = {"step": torch.tensor(2.0), "exp_avg": torch.zeros_like(saved_centres),
                                         "exp_avg_sq": torch.zeros_like(saved_centres)}
    save_checkpoint(path, {k: v for k, v in ckpt.items() if k != "version"})
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = train(cfg, tmp_path / "old", resume=True)
    assert result["status"] == "completed" and result["epoch"] == 2
    assert "center loss's centres: they start afresh" in printed.getvalue()
    resumed = load_checkpoint(path)
    assert len(resumed["optimizer"]["param_groups"][0]["params"]) == len(group["params"]) - 1


def test_a_saved_center_optimizer_entry_resumes_into_the_centres_slot(synthetic_root, tmp_path):
    """``center_optimizer`` (the key since the centres had their own SGD) is the centres' slot's
    entry: a last.pth holding one resumes into that slot. Its lr is set to a value no config gives
    here (0.25; loss.center_lr is 0.5 and the schedule never sets it): the resumed run keeps it."""
    cfg = _centre_cfg(synthetic_root)
    train(cfg, tmp_path / "r", hooks=[StopAtEpoch(1)], quiet=True)
    path = tmp_path / "r" / "checkpoints" / "last.pth"
    ckpt = load_checkpoint(path)
    assert ckpt["center_optimizer"]["param_groups"][0]["lr"] == 0.5
    ckpt["center_optimizer"]["param_groups"][0]["lr"] = 0.25
    save_checkpoint(path, {k: v for k, v in ckpt.items() if k != "version"})
    before = ckpt["criterion"]["center.centers"]
    assert train(cfg, tmp_path / "r", resume=True, quiet=True)["status"] == "completed"
    resumed = load_checkpoint(path)
    assert resumed["epoch"] == 2 and resumed["center_optimizer"]["param_groups"][0]["lr"] == 0.25
    assert not torch.equal(resumed["criterion"]["center.centers"], before)  # and the slot stepped them
