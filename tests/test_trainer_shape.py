"""The engine's shape (issue 27, item 2): ``train()`` is a short sequence of builder calls, the
optimisers are slots the step treats alike, one checkpointer saves and restores the same list of
entries, hooks take their settings through their constructors and hold the trainer weakly."""

from __future__ import annotations

import ast
import contextlib
import gc
import inspect
from pathlib import Path

import pytest
import torch

from attnreid.config import load_config
from attnreid.distributed import DistContext
from attnreid.engine import trainer as trainer_mod
from attnreid.engine.amp_guard import AmpGuard
from attnreid.engine.checkpoint import Checkpointer, load_checkpoint, save_checkpoint
from attnreid.engine.hooks import Hook
from attnreid.engine.optim import WarmupStepScheduler, build_optimizers
from attnreid.engine.trainer import TrainState, train, train_step
from attnreid.errors import CheckpointError
from attnreid.losses import build_criterion
from attnreid.precision import resolve_precision
from test_center_training import BOT, TinyNet
from test_engine import tiny_cfg

ENGINE = Path(trainer_mod.__file__).parent


def test_train_is_a_short_sequence_of_builder_calls():
    source = inspect.getsource(train)
    assert len(source.splitlines()) <= 60, f"train() is {len(source.splitlines())} lines"
    called = {node.func.id for node in ast.walk(ast.parse(source))
              if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    assert {"setup_process", "build_data", "build_model_and_criterion", "build_optimizers", "build_precision",
            "build_hooks", "build_net", "Checkpointer", "Trainer", "run_training"} <= called


def test_the_engine_loop_imports_attnreid_at_module_level():
    """The loop's modules show their real arrows: no function-local import of attnreid."""
    for name in ("trainer.py", "hooks.py", "checkpoint.py", "optim.py", "amp_guard.py"):
        tree = ast.parse((ENGINE / name).read_text())
        local = [(name, node.lineno) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for node in ast.walk(fn) if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("attnreid")
                 or isinstance(node, ast.Import) and any(a.name.startswith("attnreid") for a in node.names)]
        assert not local, local


# ---------------------------------------------------------------- the checkpointer

def _run_parts(seed: int, run_dir: Path, *extra: str):
    """A tiny model with center loss, its optimiser slots, schedule, bf16 guard and checkpointer."""
    cfg = load_config(None, ["model.name=baseline", *BOT, "train.epochs=3", *extra])
    torch.manual_seed(seed)
    model = TinyNet()
    criterion = build_criterion(cfg.loss, cfg.model, num_classes=4, global_dim=3)
    optimizers = build_optimizers(cfg.optim, cfg.loss, model, criterion)
    scheduler = WarmupStepScheduler(optimizers[0].optimizer, cfg.optim)
    state = TrainState(run_dir=run_dir)
    guard = AmpGuard(resolve_precision("off", "cpu"))
    ck = Checkpointer(cfg, model, criterion, optimizers, scheduler, state, DistContext(), num_classes=4,
                      amp_guard=guard)
    return ck


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture
def saved(tmp_path):
    """A checkpointer after two steps of epoch 1 (Adam and the centres' SGD have state), its last.pth,
    and three random numbers drawn right after saving (a restore must draw the same)."""
    ck = _run_parts(0, tmp_path)
    x, y = torch.randn(6, 5), torch.tensor([0, 0, 1, 1, 3, 3])
    for _ in range(2):
        train_step(ck.model, ck.criterion, ck.optimizers, x, y, contextlib.nullcontext, None, 0.0, TrainState())
    ck.scheduler.set_epoch(1)
    ck.amp_guard.load_state_dict({"faults": 2, "float32": False, "pinned": ["embed"]})
    s = ck.state
    s.epoch, s.epochs_done, s.step = 1, 2, 4
    s.metrics, s.best = {"mAP": 0.5, "epoch": 2}, {"mAP": 0.4, "epoch": 1}
    path = ck.save_last()
    return ck, path, torch.rand(3)


def test_restore_gives_back_every_entry_it_saved(saved, tmp_path):
    ck, path, drawn = saved
    other = _run_parts(1, tmp_path / "b")  # other weights and centres, fresh optimisers
    assert not _same(other.model.state_dict(), ck.model.state_dict())
    assert other.restore(path) == []
    assert torch.equal(torch.rand(3), drawn)  # the RNG is where it was when the checkpoint was taken
    assert _same(other.model.state_dict(), ck.model.state_dict())
    assert list(other.stateful()) == list(ck.stateful()) == ["criterion", "optimizer", "center_optimizer",
                                                             "scheduler", "amp_guard"]
    for key, part in ck.stateful().items():
        assert _same(other.stateful()[key].state_dict(), part.state_dict()), key
    s = other.state
    assert (s.epoch, s.epochs_done, s.step, s.epoch_start_step) == (2, 2, 4, 4)
    assert s.metrics == {"mAP": 0.5, "epoch": 2} and s.best == {"mAP": 0.4, "epoch": 1}
    # and what it saves again holds the same entries as what it read
    assert set(other.state_dict(full=True)) | {"version"} == set(load_checkpoint(path))
    assert set(other.state_dict(full=False)) == {"model", "config", "num_classes", "epoch", "step", "metrics"}


@pytest.mark.parametrize("change, needle", [
    (lambda c: c.update(epoch=-3), "'epoch' is -3; expected a whole number >= 0"),
    (lambda c: c.update(step=1.5), "'step' is 1.5; expected a whole number >= 0"),
    (lambda c: c.update(epoch=4), "is at epoch 4, past train.epochs = 3"),
    (lambda c: c.pop("scheduler"), "holds no scheduler state, so it cannot be resumed"),
    (lambda c: c.update(center_optimizer=5), "its 'center_optimizer' entry is a int"),
    (lambda c: c["center_optimizer"]["param_groups"][0]["params"].append(7),
     "center-loss optimizer state ('center_optimizer') does not fit"),
    (lambda c: c.update(amp_guard={"faults": "many"}), "bf16 guard state ('amp_guard') does not fit"),
    (lambda c: c.update(rng={}), "its RNG state ('rng') is not valid ('torch')"),
])
def test_a_bad_entry_is_one_line_naming_it(saved, tmp_path, change, needle):
    ck, path, _ = saved
    ckpt = load_checkpoint(path)
    change(ckpt)
    save_checkpoint(path, {k: v for k, v in ckpt.items() if k != "version"})
    with pytest.raises(CheckpointError) as info:
        _run_parts(1, tmp_path / "b").restore(path)
    assert needle in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_mid_epoch_last_pth_keeps_the_step_of_the_last_completed_epoch(saved):
    ck, _, _ = saved
    s = ck.state
    s.epoch, s.epochs_done, s.epoch_start_step, s.step = 2, 2, 4, 5  # one step into epoch 3
    assert load_checkpoint(ck.save_last())["step"] == 4


# ---------------------------------------------------------------- hooks and the trainer


class Unreadable:
    def __getattr__(self, name):
        raise AssertionError(f"read trainer.cfg.{name} after the trainer was built")


class Probe(Hook):
    def __init__(self):
        self.seen = []

    def after_epoch(self, state):
        self.seen.append(self.trainer is not None and self.trainer.state is state)


def test_hooks_hold_the_trainer_weakly(synthetic_root, tmp_path):
    probe = Probe()
    assert train(tiny_cfg(synthetic_root), tmp_path / "r", hooks=[probe], quiet=True)["status"] == "completed"
    gc.collect()
    assert probe.seen == [True, True] and probe.trainer is None  # the run's trainer is gone with its run


def test_the_loop_and_its_hooks_take_their_settings_at_construction(synthetic_root, tmp_path, monkeypatch):
    """Once built, nothing reads the trainer's config: each hook has its own settings. The run
    uses every built-in hook but the bf16 guard's check (float32 here) and the centres' slot."""
    real_init = trainer_mod.Trainer.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.cfg = Unreadable()

    monkeypatch.setattr(trainer_mod.Trainer, "__init__", init)
    cfg = tiny_cfg(synthetic_root, *BOT, "model.test_feature=global", "data.val_ids=2", "data.batch_size=4",
                   "train.eval_every=1", "train.max_minutes=100", "train.print_every=1")
    result = train(cfg, tmp_path / "r")
    assert result["status"] == "completed" and result["epoch"] == 2 and result["best_epoch"] in (1, 2)
    last = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pth")
    assert {"optimizer", "center_optimizer", "criterion", "amp_guard"} <= set(last)
    assert (tmp_path / "r" / "checkpoints" / "best.pth").is_file()
