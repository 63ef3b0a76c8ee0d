"""Training engine: checkpoints, schedule, optimiser coverage, end-to-end training, resume, NaN."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from attnreid.config import load_config
from attnreid.engine.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from attnreid.engine.hooks import Hook
from attnreid.engine.optim import WarmupStepScheduler, build_optimizer, warmup_step_lr
from attnreid.errors import AttnReidError, CheckpointError


def tiny_cfg(root, *extra):
    """A fast configuration: MobileNetV3-small at 64x32, 2 epochs of 2 steps of 8 images, float32 (these
    tests are about the loop, not the precision: bf16's own tests are in test_training_modes.py and
    test_amp_guard.py; under bf16 the guard would re-run the NaN step below in float32)."""
    return load_config(None, [
        "data.dataset=market1501", f"data.root={root}", "data.height=64", "data.width=32",
        "data.batch_size=8", "data.num_instances=2", "data.test_batch_size=32", "data.workers=0",
        "data.flip=false", "model.name=baseline", "model.backbone.name=mobilenetv3_small", "train.threads=1",
        "train.epochs=2", "train.max_steps_per_epoch=2", "train.eval_every=0", "train.log_every=1",
        "train.device=cpu", "train.amp=off", "optim.warmup_epochs=1", "optim.lr=3e-4", "optim.warmup_start_lr=1e-4",
        "optim.milestones=[1]", *extra])


@pytest.fixture
def data_root(synthetic_root):
    return synthetic_root


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_roundtrip_and_atomic_failure(tmp_path, monkeypatch):
    path = tmp_path / "ck" / "last.pth"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}, "epoch": 3})
    assert load_checkpoint(path)["epoch"] == 3

    def broken_save(obj, fh):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        save_checkpoint(path, {"model": {"w": torch.zeros(2)}, "epoch": 4})
    monkeypatch.undo()
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pth"]  # no temp file left
    assert load_checkpoint(path)["epoch"] == 3  # previous checkpoint intact


def test_checkpoint_truncated_corrupt_missing(tmp_path):
    good = tmp_path / "good.pth"
    save_checkpoint(good, {"model": {"w": torch.randn(100)}})
    data = good.read_bytes()
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    for name in ("trunc.pth", "junk.pth", "missing.pth"):
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(tmp_path / name)
        assert name in str(info.value) and "\n" not in str(info.value)


def test_rng_state_roundtrip_through_checkpoint(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    save_checkpoint(tmp_path / "r.pth", {"model": {}, "rng": capture_rng_state()})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    restore_rng_state(load_checkpoint(tmp_path / "r.pth")["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


# ---------------------------------------------------------------- schedule and optimiser


def test_warmup_step_schedule_matches_paper():
    """MHSA-Net Sec. VII-B: 1e-5 -> 1e-3 linearly over 50 epochs, 1e-4 from 200, 1e-5 from 300."""
    lr = lambda e: warmup_step_lr(e, 1e-3, 50, 1e-5, [200, 300], 0.1)  # noqa: E731
    assert lr(0) == pytest.approx(1e-5)
    assert lr(25) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    assert lr(50) == pytest.approx(1e-3) and lr(199) == pytest.approx(1e-3)
    assert lr(200) == pytest.approx(1e-4) and lr(299) == pytest.approx(1e-4)
    assert lr(300) == pytest.approx(1e-5) and lr(399) == pytest.approx(1e-5)
    # HA-CNN: constant 5e-4
    assert warmup_step_lr(149, 5e-4, 0, 0.0, [], 0.1) == pytest.approx(5e-4)


def test_scheduler_state_restores_lr():
    cfg = load_config(None, [])
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    sched = WarmupStepScheduler(opt, cfg.optim)
    sched.set_epoch(210)
    other = WarmupStepScheduler(opt, cfg.optim)
    other.load_state_dict(sched.state_dict())
    assert other.epoch == 210 and other.set_epoch(other.epoch) == pytest.approx(1e-4)


def test_optimizer_holds_every_trainable_parameter():
    """The authors' code left its attention layers out of the optimiser; ours takes all."""
    from attnreid.models import build_model

    cfg = load_config(None, ["model.backbone.name=resnet18", "model.mhsanet.num_heads=2"])
    model = build_model(cfg.model, 5)
    opt = build_optimizer(cfg.optim, [model])
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("attention" in n or "mhsam" in n for n in trainable)
    assert [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in in_opt] == []
    sgd = build_optimizer(load_config(None, ["optim.name=sgd"]).optim, [model])
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.9


# ---------------------------------------------------------------- training


def test_train_end_to_end_writes_the_run_folder(data_root, tmp_path):
    from attnreid.engine.trainer import train

    run = tmp_path / "run"
    result = train(tiny_cfg(data_root), run, quiet=True)
    assert result["status"] == "completed" and result["epoch"] == 2 and result["step"] == 4
    for name in ("config.yaml", "log.jsonl", "checkpoints/last.pth", "eval.json", "eval_ranks.npz"):
        assert (run / name).is_file(), name
    assert not (run / "checkpoints" / "best.pth").exists()  # no validation split: nothing to select on
    assert result["best_val_mAP"] is None and result["best_epoch"] is None
    records = [json.loads(l) for l in (run / "log.jsonl").read_text().splitlines()]
    train_recs = [r for r in records if r["type"] == "train"]
    assert [r["step"] for r in train_recs] == [1, 2, 3, 4]
    assert [r["lr"] for r in train_recs] == pytest.approx([1e-4, 1e-4, 3e-5, 3e-5])  # warm-up then x0.1
    assert all(0.0 <= r["data_wait"] <= 1.0 and r["img_per_s"] > 0 for r in train_recs)
    assert any(k.startswith("ce_") for k in train_recs[0])
    ev = json.loads((run / "eval.json").read_text())
    assert {"mAP", "rank1", "dataset", "protocol", "model"} <= set(ev) and 0.0 <= ev["mAP"] <= 1.0
    ranks = np.load(run / "eval_ranks.npz")
    assert ranks["topk_index"].shape[0] == len(ranks["query_paths"]) == len(ranks["query_pids"])
    assert np.all(np.diff(ranks["topk_dist"], axis=1) >= -1e-6)
    ck = load_checkpoint(run / "checkpoints" / "last.pth")
    assert {"model", "config", "num_classes", "epoch", "step", "optimizer", "scheduler", "rng", "metrics",
            "version"} <= set(ck)
    assert ck["epoch"] == 2 and ck["step"] == 4 and ck["metrics"]["mAP"] == pytest.approx(result["mAP"])


class StopAtEpoch(Hook):
    def __init__(self, epoch):
        self.epoch = epoch

    def before_epoch(self, state):
        if state.epoch == self.epoch:
            raise KeyboardInterrupt


def test_interrupt_then_resume_reproduces_the_uninterrupted_run(data_root, tmp_path):
    from attnreid.engine.trainer import train

    cfg = tiny_cfg(data_root)
    straight = train(cfg, tmp_path / "a", quiet=True)
    stopped = train(cfg, tmp_path / "b", hooks=[StopAtEpoch(1)], quiet=True)
    assert stopped["status"] == "interrupted" and stopped["epoch"] == 1
    assert load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pth")["epoch"] == 1
    resumed = train(cfg, tmp_path / "b", resume=True, quiet=True)
    assert resumed["epoch"] == 2 and resumed["step"] == straight["step"]
    assert resumed["mAP"] == pytest.approx(straight["mAP"], abs=1e-6)
    wa = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pth")["model"]
    wb = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pth")["model"]
    assert all(torch.allclose(wa[k].float(), wb[k].float(), atol=1e-5) for k in wa)
    lrs = lambda d: [r["lr"] for r in map(json.loads, (d / "log.jsonl").read_text().splitlines()) if r["type"] == "train"]  # noqa: E731
    assert lrs(tmp_path / "b") == pytest.approx(lrs(tmp_path / "a"))


def test_nan_loss_names_step_and_term(data_root, tmp_path, monkeypatch):
    import attnreid.losses as losses
    from attnreid.engine.trainer import NonFiniteLossError, train

    real = losses.build_criterion

    class NanAtSecondStep(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.calls = inner, 0

        def forward(self, outputs, targets):
            total, terms = self.inner(outputs, targets)
            self.calls += 1
            if self.calls == 2:
                terms = dict(terms, ce_global=torch.tensor(float("nan")))
                total = total * float("nan")
            return total, terms

    monkeypatch.setattr(losses, "build_criterion", lambda lc, mc: NanAtSecondStep(real(lc, mc)))
    with pytest.raises(NonFiniteLossError) as info:
        train(tiny_cfg(data_root), tmp_path / "nan", quiet=True)
    msg = str(info.value)
    assert "step 2" in msg and "'ce_global'" in msg and "nan" in msg


def test_budget_stops_cleanly_and_still_evaluates(data_root, tmp_path):
    from attnreid.engine.trainer import train

    result = train(tiny_cfg(data_root, "train.epochs=50", "train.max_minutes=0.0001"), tmp_path / "r", quiet=True)
    assert result["status"] == "budget" and result["epoch"] < 50 and math.isfinite(result["mAP"])
    assert (tmp_path / "r" / "checkpoints" / "last.pth").is_file()


def test_run_folder_refusal_and_overwrite(data_root, tmp_path):
    from attnreid.engine.trainer import prepare_run_dir

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("x: 1\n")
    with pytest.raises(AttnReidError, match="already holds a run"):
        prepare_run_dir(run, resume=False, overwrite=False)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        prepare_run_dir(run, resume=True, overwrite=False)
    (run / "notes.txt").write_text("mine")
    prepare_run_dir(run, resume=False, overwrite=True)
    assert not (run / "config.yaml").exists() and (run / "notes.txt").exists()
