"""The training loop of both papers, and the machinery a long run needs around it, as hooks.

Recipe (config values, docs/spec.md §1 and HA 4): PK batches (P identities x K images; an epoch
is a pass over the images or over the identities, ``data.epoch_mode``), the model's loss
terms summed by the criterion, Adam (or SGD) with linear warm-up and step decay stepped
per epoch. :class:`Trainer` is that loop and nothing else: epochs of steps, each step the
forward (under the precision's autocast: ``train.amp: auto`` is bf16 where the CUDA device
or the CPU runs bf16 natively, see attnreid/precision.py), the loss in float32, backward
and every optimiser slot (engine/optim.py: the model's, and the center loss's centres').
Everything around it is a hook (engine/hooks.py, fast-reid's HookBase/TrainerBase shape):
checkpoints (:class:`CheckpointHook`, through the :class:`Checkpointer` of
engine/checkpoint.py), evaluation and model selection on a validation split held out of
the training identities (:class:`EvalHook`), log.jsonl and the console
(:class:`LoggingHook`), the wall-clock budget (:class:`BudgetHook`), the NaN/inf guard
(:class:`NonFiniteLossGuard`), the bf16 guard (:class:`AmpGuard`) and MHSA-Net's
diagnostics (:class:`DiagnosticsHook`).

:func:`train` is a short sequence of builders, as fast-reid's ``DefaultTrainer``:
:func:`setup_process`, :func:`build_data`, :func:`build_model_and_criterion`,
:func:`~attnreid.engine.optim.build_optimizers`, :func:`build_precision`,
:func:`build_hooks`, the :class:`Checkpointer` (``resume``: the optimisers, schedule and
every RNG state), :func:`build_net` (DistributedDataParallel under ``torchrun``, the PK
sampler splitting identities by rank; ``train.compile``), then :func:`run_training`, whose
Ctrl-C saves ``last.pth`` before returning.

Run folder (docs/design.md): ``config.yaml``, ``log.jsonl``, ``checkpoints/last.pth`` (and
``best.pth`` with a validation split), ``eval.json``, ``eval_ranks.npz`` (and
``tensorboard/`` when TensorBoard is installed).
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

# The two builders are called through their modules, so that a test can replace them there.
from attnreid import losses, models
from attnreid.config import Config, load_config, save_config, to_dict
from attnreid.data.datasets import build_dataset_from_config
from attnreid.data.loader import build_train_loader
from attnreid.data.splits import hold_out_validation, limit_identities
from attnreid.distributed import (DistContext, broadcast_parameters, mark_loop_started, unused_classifiers,
                                  wrap_ddp)
from attnreid.engine.amp_guard import AmpGuard
from attnreid.engine.build import build_eval_dataset, resolve_device
from attnreid.engine.checkpoint import Checkpointer, load_checkpoint, seed_everything
from attnreid.engine.compiled import compile_for_training
from attnreid.engine.hooks import (RUN_DIRS, BudgetHook, CheckpointHook, DiagnosticsHook, EvalHook, Hook,
                                   LoggingHook, NonFiniteLossError, NonFiniteLossGuard, Progress, RunLogger,
                                   run_outputs)
from attnreid.engine.optim import OptimizerSlot, WarmupStepScheduler, build_optimizers
from attnreid.errors import AttnReidError, CheckpointError, DataError
from attnreid.losses.center import center_parameters
from attnreid.models.registry import get_spec
from attnreid.precision import Precision, resolve_precision
from attnreid.safe_io import FolderLock, Terminated, deferred_signals, remove_stale_temps, sigterm_as_interrupt

__all__ = ["DistContext", "Hook", "NonFiniteLossError", "TrainData", "TrainState", "Trainer", "build_data",
           "build_hooks", "build_model_and_criterion", "build_net", "build_precision", "check_run_folder",
           "prepare_run_dir", "run_config", "run_training", "setup_process", "train", "train_step"]


@dataclass
class TrainState:
    """What the loop and its hooks share; the part of it a checkpoint keeps is restored on resume."""

    epoch: int = 0  # 0-based epoch being run
    epochs_done: int = 0  # completed epochs
    step: int = 0  # optimiser steps done so far (global)
    epoch_start_step: int = 0  # ``step`` when the running epoch began
    epoch_steps: int = 0  # steps done in the running epoch
    epoch_loss: float = float("nan")  # mean loss of the running epoch's steps so far
    lr: float = 0.0
    loss: float = float("nan")  # the last step's
    terms: Dict[str, float] = field(default_factory=dict)
    outputs: Any = None  # the last step's model outputs (float32, detached)
    images: int = 0  # images in the last step, all ranks together
    step_time: float = 0.0  # seconds of the last step, data wait included
    data_time: float = 0.0  # seconds the last step waited for its batch
    metrics: Dict[str, Any] = field(default_factory=dict)  # the last test-split evaluation
    val_metrics: Dict[str, Any] = field(default_factory=dict)  # the last validation evaluation
    best: Dict[str, Any] = field(default_factory=lambda: {"mAP": -1.0, "epoch": 0})  # on validation
    stop: Optional[str] = None  # set by a hook to end the run ("budget", "early_stop", ...)
    run_dir: Optional[Path] = None


def check_run_folder(run_dir: Path) -> None:
    """One line when ``run_dir`` cannot be a run folder: it is a file, or lies under one."""
    if run_dir.exists() and not run_dir.is_dir():
        raise DataError(f"output folder {run_dir} is a file; expected a folder (or a new path)")
    parent = run_dir.parent
    while not parent.exists() and parent.parent != parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise DataError(f"output folder {run_dir} cannot be created: {parent} is a file, not a folder")


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder unless told to resume or overwrite it.

    ``overwrite`` deletes what a previous run wrote (engine.hooks.RUN_OUTPUTS: config, log,
    checkpoints, evaluation files, report, TensorBoard events) and nothing else; a user's
    own files, also inside ``checkpoints/``, stay.
    """
    if resume and overwrite:
        raise AttnReidError("--resume and --overwrite cannot be used together")
    check_run_folder(run_dir)
    if resume:
        last = run_dir / "checkpoints" / "last.pth"
        if not last.is_file():
            raise CheckpointError(f"nothing to resume in {run_dir}: {last} not found")
        return
    held = run_outputs(run_dir) if run_dir.is_dir() else []
    if held:
        if not overwrite:
            raise AttnReidError(
                f"output folder {run_dir} already holds a run ({held[0].relative_to(run_dir)}); pass --resume to "
                f"continue it or --overwrite to replace it")
        for p in held:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        for folder in [*sorted(run_dir.glob("datasets/*")), *(run_dir / d for d in RUN_DIRS)]:
            with contextlib.suppress(OSError):  # only folders left empty; a user's files keep theirs
                folder.rmdir()
    run_dir.mkdir(parents=True, exist_ok=True)


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper (train.compile)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _train_loader_sampler(loader):
    """The PK sampler inside a loader (as batch_sampler or sampler), for ``set_epoch``."""
    for attr in ("batch_sampler", "sampler"):
        s = getattr(loader, attr, None)
        if s is not None and hasattr(s, "set_epoch"):
            return s
    return None


def _map_tensors(x: Any, fn) -> Any:
    """``fn`` applied to every tensor in nested dicts, lists and tuples."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, dict):
        return {k: _map_tensors(v, fn) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_map_tensors(v, fn) for v in x)
    return x


def to_float32(outputs: Any) -> Any:
    """``outputs`` (tensors in nested dicts/lists) with every floating tensor as float32."""
    return _map_tensors(outputs, lambda t: t.float() if t.is_floating_point() else t)


def train_step(model: nn.Module, criterion: nn.Module, optimizers: Sequence[OptimizerSlot], images: torch.Tensor,
               pids: torch.Tensor, autocast_ctx, scaler, grad_clip: float, state: TrainState, check=None):
    """One step of every optimiser slot; returns ``(total loss, terms)`` (the NaN/inf check is a hook).

    Only the model's forward runs under ``autocast_ctx``; its outputs are cast to float32
    and the criterion runs outside autocast, so every loss term is computed in float32
    whatever the training precision. The outputs are left in ``state.outputs`` for hooks.

    Every slot (engine/optim.py: the main optimiser, and the center loss's centres' SGD) is
    zeroed before the backward pass and stepped after it, in order, through the same loss
    scaler, whose ``update()`` comes after the last. ``grad_clip`` clips the parameters of
    the slots marked ``clip`` (the main one's, never the centres).

    ``check(total)`` (the bf16 step guard, engine/amp_guard.py) is asked after the backward
    pass; when it says False no optimiser steps and None is returned.
    """
    with autocast_ctx():
        outputs = model(images)
    outputs = to_float32(outputs)
    total, terms = criterion(outputs, pids)
    for slot in optimizers:
        slot.zero_grad()
    (total if scaler is None else scaler.scale(total)).backward()
    if grad_clip > 0:
        clipped = [slot for slot in optimizers if slot.clip]
        if scaler is not None:
            for slot in clipped:
                scaler.unscale_(slot.optimizer)
        torch.nn.utils.clip_grad_norm_([p for slot in clipped for p in slot.params()], grad_clip)
    if check is not None and not check(total.detach()):
        return None
    for slot in optimizers:
        slot.step(scaler)
    if scaler is not None:
        scaler.update()  # after every optimiser it stepped: update() resets their inf checks
    state.outputs = _map_tensors(outputs, torch.Tensor.detach)
    return total.detach(), terms


@dataclass
class TrainData:
    """What a run trains and evaluates on (:func:`build_data`)."""

    loader: Any  # PK batches of ``train_set``
    train_set: Any  # the training identities left after the validation split and ``data.max_ids``
    val_set: Any  # the held-out validation split (``data.val_ids``), or None
    test_set: Any  # what the run is tested on (the training set's query/gallery, or ``eval.dataset``)
    num_classes: int
    steps_per_epoch: int  # 0 when the loader has no length


class Trainer:
    """Runs the epochs of optimiser steps and calls its hooks; nothing else.

    ``net`` is what the steps call (the model, or its DDP / compiled wrapper); ``model`` the
    plain module that is evaluated and saved; ``optimizers`` the slots every step steps
    (:func:`train_step`); ``scheduler`` sets the first slot's lr each epoch;
    ``checkpointer`` saves what the hooks ask for. The loop reads its settings from ``cfg``
    here, once (``train.epochs``, ``optim.grad_clip``, ``train.channels_last``); ``cfg`` stays
    an attribute for hooks of one's own. Hooks run in the order given; each gets
    ``hook.trainer = self`` (held weakly). A hook setting ``state.stop`` ends the run:
    inside an epoch after the current step (that epoch does not count and a resume redoes
    it), in ``after_epoch`` after that epoch.
    """

    def __init__(self, cfg: Config, net: nn.Module, criterion: nn.Module, optimizers: Sequence[OptimizerSlot],
                 scheduler: WarmupStepScheduler, data: TrainData, device: torch.device, precision: Precision,
                 state: TrainState, hooks: Sequence[Hook], logger: RunLogger, progress: Progress,
                 checkpointer: Checkpointer, dist: Optional[DistContext] = None, scaler: Any = None):
        self.cfg, self.net, self.model = cfg, net, _unwrap(net)
        self.epochs, self.grad_clip, self.channels_last = cfg.train.epochs, cfg.optim.grad_clip, cfg.train.channels_last
        self.criterion, self.optimizers, self.scheduler, self.scaler = criterion, list(optimizers), scheduler, scaler
        self.data, self.loader, self.sampler = data, data.loader, _train_loader_sampler(data.loader)
        self.steps_per_epoch, self.num_classes = data.steps_per_epoch, data.num_classes
        self.device, self.precision, self.dist = device, precision, dist or DistContext()
        self.state, self.logger, self.progress, self.checkpointer = state, logger, progress, checkpointer
        self.hooks: List[Hook] = []
        for h in hooks:
            h.trainer = self
            self.hooks.append(h)
        # the bf16 kernel-fault guard, when one is among the hooks: it also wraps each step
        self.amp_guard: Optional[AmpGuard] = find_hook(self.hooks, AmpGuard)

    def call(self, event: str) -> None:
        for h in self.hooks:
            getattr(h, event)(self.state)

    def announce_resume(self, notes: Sequence[str] = ()) -> None:
        """The ``resume`` record of log.jsonl, and the line (and ``notes``) on the console."""
        s = self.state
        self.logger.write({"type": "resume", "epoch": s.epochs_done, "step": s.step})
        self.progress.line(f"resumed {s.run_dir} at epoch {s.epochs_done + 1}, step {s.step}")
        for note in notes:
            self.progress.line(note)

    def train(self) -> str:
        """From ``state.epochs_done`` to ``train.epochs``; returns ``completed`` or the stop reason."""
        s = self.state
        self.call("before_train")
        for epoch in range(s.epochs_done, self.epochs):
            s.epoch, s.epoch_start_step = epoch, s.step
            s.lr = self.scheduler.set_epoch(epoch)
            if self.sampler is not None:
                self.sampler.set_epoch(epoch)
            self.call("before_epoch")
            if not self.run_epoch():
                break
            s.epochs_done = epoch + 1
            self.call("after_epoch")
            if s.stop:
                break
        self.call("after_train")
        return s.stop or "completed"

    def run_epoch(self) -> bool:
        """One epoch's steps; False when a hook stopped the run before the epoch's end."""
        s = self.state
        self.net.train()
        self.criterion.train()
        s.epoch_steps, s.epoch_loss, loss_sum = 0, float("nan"), 0.0
        batches = iter(self.loader)
        while not self.steps_per_epoch or s.epoch_steps < self.steps_per_epoch:
            t0 = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                return True
            s.data_time = time.perf_counter() - t0
            self.step(batch)
            s.step_time = time.perf_counter() - t0
            loss_sum += s.loss
            s.epoch_loss = loss_sum / s.epoch_steps
            self.call("after_step")
            if s.stop:
                return bool(self.steps_per_epoch) and s.epoch_steps >= self.steps_per_epoch
        return True

    def step(self, batch: Any) -> None:
        """One optimiser step on ``batch`` (images, pids, ...); updates the state's counters and losses."""
        s = self.state
        images = batch[0].to(self.device, non_blocking=True)
        pids = torch.as_tensor(batch[1]).to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)

        def one_step(autocast, check):
            return train_step(self.net, self.criterion, self.optimizers, images, pids, autocast, self.scaler,
                              self.grad_clip, s, check=check)

        guard = self.amp_guard
        total, terms = guard.run_step(one_step) if guard is not None else one_step(self.precision.autocast, None)
        s.step += 1
        s.epoch_steps += 1
        # The whole step's loss, averaged over the ranks: what log.jsonl shows, and a NaN on
        # one rank stops every rank at the same step.
        means = self.dist.mean({"total": float(total), **{k: float(v) for k, v in terms.items()}})
        s.loss = means.pop("total")
        s.terms = means
        s.images = images.shape[0] * self.dist.world_size


def find_hook(hooks: Sequence[Hook], kind: type) -> Any:
    """The first hook of class ``kind`` in ``hooks``, or None."""
    return next((h for h in hooks if isinstance(h, kind)), None)


def run_config(run_dir: str | Path, overrides: Sequence[str] = (),
               config: Optional[str | Path] = None) -> tuple:
    """The config a resumed run continues with: ``RUN/config.yaml`` plus ``overrides``.

    The run's own config.yaml holds every override the run was started with (data.root,
    ...), so a resume never loses one. Returns ``(cfg, ignored)``: when a ``config`` file
    is given too, ``ignored`` lists the keys it sets differently (they are not applied:
    pass them as KEY=VALUE overrides to change them, e.g. ``train.epochs=600`` to extend).
    """
    last, saved = Path(run_dir) / "checkpoints" / "last.pth", Path(run_dir) / "config.yaml"
    for needed in (last, saved):
        if not needed.is_file():
            raise CheckpointError(f"nothing to resume in {run_dir}: {needed} not found")
    cfg = load_config(saved, list(overrides))
    ignored: List[str] = []
    if config is not None:
        ignored = _differences(to_dict(cfg), to_dict(load_config(config, list(overrides))))
    return cfg, ignored


def _differences(a: Dict[str, Any], b: Dict[str, Any], prefix: str = "") -> List[str]:
    out: List[str] = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out


def train(cfg: Config, out_dir: str | Path, resume: bool = False, overwrite: bool = False,
          hooks: Sequence[Hook] = (), quiet: bool = False, dataset: Any = None,
          eval_dataset: Any = None) -> Dict[str, Any]:
    """Train ``cfg`` into the run folder ``out_dir``; return the final metrics (:func:`run_training`).

    Model selection never looks at the test split: with ``data.val_ids: N > 0`` the periodic
    evaluations (``train.eval_every``) run on N held-out training identities and ``best.pth``
    keeps the best validation mAP; with N = 0 they run on the test split for the log only.
    ``train.max_minutes`` bounds the loop (the run then still checkpoints and evaluates).
    ``hooks`` run after the evaluation hook and before the checkpoint hook (so an early stop
    sees ``state.val_metrics`` and is checkpointed). ``dataset`` / ``eval_dataset``
    (ReIDDataset-like) replace the sets the config names, e.g. a subset for a smoke test.
    The run folder is locked for the whole run (:func:`locked_run_folder`).
    """
    run_dir, dist = Path(out_dir), DistContext.from_env()
    with locked_run_folder(run_dir, dist, resume, overwrite):
        device = setup_process(cfg.train, dist)
        data = build_data(cfg, dist, dataset, eval_dataset)
        model, criterion = build_model_and_criterion(cfg, data.num_classes, device)
        optimizers = build_optimizers(cfg.optim, cfg.loss, model, criterion)
        scheduler = WarmupStepScheduler(optimizers[0].optimizer, cfg.optim)  # the main slot's lr
        precision, scaler = build_precision(cfg.train.amp, device)
        state, loop_hooks = TrainState(run_dir=run_dir), build_hooks(cfg, data, precision, hooks)
        checkpointer = Checkpointer(cfg, model, criterion, optimizers, scheduler, state, dist, data.num_classes,
                                    scaler, amp_guard=find_hook(loop_hooks, AmpGuard))
        notes = checkpointer.restore(run_dir / "checkpoints" / "last.pth") if resume else []
        # DDP makes the ranks' model weights rank 0's, but the criterion is not wrapped: its centres
        # were drawn from each rank's own seed (or come fresh from an old checkpoint).
        broadcast_parameters(center_parameters(criterion))
        if dist.is_main:
            save_config(cfg, run_dir / "config.yaml")
        trainer = Trainer(cfg, build_net(model, criterion, cfg.train, device, dist, quiet), criterion, optimizers,
                          scheduler, data, device, precision, state, loop_hooks, RunLogger(run_dir, dist.is_main),
                          Progress(dist.is_main and not quiet, cfg.train.epochs, data.steps_per_epoch),
                          checkpointer, dist, scaler)
        if resume:
            trainer.announce_resume(notes)
        return run_training(trainer)


@contextlib.contextmanager
def locked_run_folder(run_dir: Path, dist: DistContext, resume: bool, overwrite: bool) -> Iterator[None]:
    """The run folder, checked, prepared (:func:`prepare_run_dir`) and locked for the run.

    The lock (:class:`attnreid.safe_io.FolderLock`) refuses a second run into the folder in
    one line and dies with its process. SIGTERM acts like Ctrl-C inside (``status:
    interrupted``, ``signal: SIGTERM``). Temporary files that killed writes left in the
    folder are removed first.
    """
    lock = None
    if dist.is_main:
        prepare_run_dir(run_dir, resume, overwrite=False) if resume else check_run_folder(run_dir)
        lock = FolderLock(run_dir, "run folder").acquire()
    try:
        with sigterm_as_interrupt():
            if dist.is_main:
                remove_stale_temps([run_dir, *(run_dir / d for d in RUN_DIRS), *run_dir.glob("datasets/*")])
                prepare_run_dir(run_dir, resume, overwrite)  # under the lock: no other run can slip in
            dist.barrier()
            yield
    finally:
        if lock is not None:
            lock.release()


def setup_process(tc: Any, dist: DistContext) -> torch.device:
    """``train.threads``, the device (this rank's GPU under DDP) and the seeds (``train.seed`` + rank)."""
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    device = resolve_device(tc.device)
    if dist.world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    seed_everything(tc.seed + dist.rank)
    return device


def build_data(cfg: Config, dist: DistContext, dataset: Any = None, eval_dataset: Any = None) -> TrainData:
    """The training set (less the ``data.val_ids`` validation identities, at most ``data.max_ids``),
    its PK loader (this rank's share under DDP), the validation split and the test set."""
    if dataset is None:
        dataset = build_dataset_from_config(cfg.data)
    if not dataset.train or dataset.num_train_pids < 2:
        raise DataError(f"dataset '{cfg.data.dataset}' under {cfg.data.root} has no training identities to learn from")
    if eval_dataset is None:
        eval_dataset = build_eval_dataset(cfg) if (cfg.eval.dataset or cfg.eval.root) else dataset
    dataset, val_dataset = hold_out_validation(dataset, cfg.data.val_ids)
    dataset = limit_identities(dataset, cfg.data.max_ids)
    loader = build_train_loader(cfg.data, dataset, seed=cfg.train.seed, rank=dist.rank, world_size=dist.world_size)
    steps = len(loader) if hasattr(loader, "__len__") else 0
    if cfg.train.max_steps_per_epoch:
        steps = min(steps, cfg.train.max_steps_per_epoch) if steps else cfg.train.max_steps_per_epoch
    return TrainData(loader, dataset, val_dataset, eval_dataset, dataset.num_train_pids, steps)


def build_model_and_criterion(cfg: Config, num_classes: int, device: torch.device) -> Tuple[nn.Module, nn.Module]:
    """The network and the criterion of its loss terms, on ``device`` (the center loss's centres,
    with ``loss.center_weight``, sized by the identities and the model's global feature)."""
    model = models.build_model(cfg.model, num_classes).to(device)
    sizes = {"num_classes": num_classes, "global_dim": model.global_dim} if cfg.loss.center_weight else {}
    criterion = losses.build_criterion(cfg.loss, cfg.model, **sizes).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, criterion


def build_precision(amp: str, device: torch.device) -> Tuple[Precision, Any]:
    """``train.amp``'s precision, and the loss scaler fp16 needs: its narrow range needs loss
    scaling; bf16 has float32's range and does not."""
    precision = resolve_precision(amp, device)
    scaler = torch.amp.GradScaler("cuda") if precision.dtype == torch.float16 and device.type == "cuda" else None
    return precision, scaler


def build_net(model: nn.Module, criterion: nn.Module, tc: Any, device: torch.device, dist: DistContext,
              quiet: bool) -> nn.Module:
    """The one place the stepped network is built: ``model`` in DDP under torchrun, then
    ``torch.compile`` (``train.compile``); evaluation and checkpoints use ``model``."""
    net: nn.Module = model
    if dist.enabled:
        # find_unused_parameters costs a graph traversal a step: only when a classifier's CE weight is 0.
        net = wrap_ddp(model, device, find_unused=bool(unused_classifiers(model, criterion.classifier_heads())))
    return compile_for_training(net, tc.compile, device, quiet=quiet or not dist.is_main)


def build_hooks(cfg: Config, data: TrainData, precision: Precision, extra: Sequence[Hook] = ()) -> List[Hook]:
    """The run's hooks in calling order, each given its settings: the NaN guard, logging, the
    bf16 guard, MHSA-Net's diagnostics (models with head diagnostics), evaluation, the budget
    (``train.max_minutes``), ``extra``, and the checkpoint last (so it keeps a hook's stop)."""
    tc, d = cfg.train, cfg.data
    run_info = {"train_ids": data.num_classes, "train_images": len(data.train_set.train), "val_ids": d.val_ids,
                "epoch_mode": d.epoch_mode}
    hooks: List[Hook] = [NonFiniteLossGuard(), LoggingHook(run_info, tc.epochs, tc.log_every, tc.print_every),
                         AmpGuard(precision, tc.amp_fallback_after, input_shape=(d.batch_size, 3, d.height, d.width),
                                  channels_last=tc.channels_last)]
    if get_spec(cfg.model.name).head_diagnostics:
        hooks.append(DiagnosticsHook(cfg.loss.acm_gamma, cfg.loss.fdrt_form))
    hooks.append(EvalHook(cfg, data.test_set, data.val_set))
    if tc.max_minutes:
        hooks.append(BudgetHook(tc.max_minutes))
    return [*hooks, *extra, CheckpointHook()]


def run_training(trainer: Trainer) -> Dict[str, Any]:
    """Run ``trainer``; return the metrics of the last weights on the test split (``mAP``,
    ``rank1``, ...; the same as eval.json) plus ``status`` (``completed`` | ``budget`` |
    ``interrupted`` | a hook's stop reason), ``epoch`` (epochs completed), ``step``,
    ``best_val_mAP`` and ``best_epoch`` (with a validation split, else None), ``precision``,
    ``amp_guard``, ``train_seconds``, ``img_per_s``, ``data_wait`` (share of step time spent
    waiting for data) and ``run_dir``.

    A KeyboardInterrupt (Ctrl-C, or SIGTERM) anywhere in the loop or the final evaluation
    saves ``last.pth`` (the epoch in progress is redone on resume) and returns ``status:
    interrupted`` with ``signal``, ``epoch``, ``step`` and ``checkpoint``.
    """
    state, dist, logger = trainer.state, trainer.dist, trainer.logger
    t_run = time.perf_counter()
    mark_loop_started()
    try:
        status = trainer.train()
        # the ranks leave together: one that tears its process group down while rank 0 still
        # writes the last checkpoint aborted the job at the end of a good run
        dist.barrier()
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (safe_io.Terminated)
        how = "SIGTERM" if isinstance(exc, Terminated) else "SIGINT"
        with deferred_signals(deliver=False):  # more presses while the resumable checkpoint is written are moot
            path = trainer.checkpointer.save_last(gather_rng=False)
            saved = load_checkpoint(path) if path is not None else {"epoch": state.epochs_done, "step": state.step}
            logger.write({"type": "interrupted", "signal": how, "epoch": saved["epoch"], "step": saved["step"]})
        return {"status": "interrupted", "signal": how, "epoch": int(saved["epoch"]), "step": int(saved["step"]),
                "run_dir": str(state.run_dir), "checkpoint": str(state.run_dir / "checkpoints" / "last.pth")}
    finally:
        trainer.progress.close()
        logger.close()
        dist.close()
    has_val, logging = trainer.data.val_set is not None, find_hook(trainer.hooks, LoggingHook)
    result = dict(state.metrics)
    result.update({
        "status": status, "epoch": state.epochs_done, "step": state.step, "run_dir": str(state.run_dir),
        "best_val_mAP": state.best["mAP"] if has_val else None, "best_epoch": state.best["epoch"] if has_val else None,
        "precision": trainer.precision.name,
        "amp_guard": trainer.amp_guard.state_dict() if trainer.amp_guard is not None else {},
        "train_seconds": round(time.perf_counter() - t_run, 2),
        "img_per_s": round(logging.img_per_s(), 2) if logging is not None else 0.0,
        "data_wait": round(logging.data_wait(), 4) if logging is not None else 0.0,
    })
    return result
