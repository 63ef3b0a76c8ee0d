"""The training loop of both papers, and the machinery a long run needs around it, as hooks.

Recipe (config values, docs/spec.md §1 and HA 4): PK batches (P identities x K images; an epoch
is a pass over the images or over the identities, ``data.epoch_mode``), the model's loss
terms summed by the criterion, Adam (or SGD) with linear warm-up and step decay stepped
per epoch. :class:`Trainer` is that loop and nothing else: epochs of steps, each step the
forward (under the precision's autocast: ``train.amp: auto`` is bf16 where the CUDA device
or the CPU runs bf16 natively, see attnreid/precision.py), the loss in float32, backward
and the optimiser. Everything around it is a hook (engine/hooks.py, fast-reid's
HookBase/TrainerBase shape): checkpoints (:class:`CheckpointHook`), evaluation and model
selection on a validation split held out of the training identities (:class:`EvalHook`),
log.jsonl and the console (:class:`LoggingHook`), the wall-clock budget
(:class:`BudgetHook`), the NaN/inf guard (:class:`NonFiniteLossGuard`) and MHSA-Net's
diagnostics (:class:`DiagnosticsHook`). :func:`train` builds it all from a config and
adds DistributedDataParallel under ``torchrun`` (the PK sampler splits identities by
rank), ``resume`` with the optimiser, schedule and every RNG state, and a Ctrl-C that
saves ``last.pth`` before returning.

Run folder (docs/design.md): ``config.yaml``, ``log.jsonl``, ``checkpoints/last.pth`` (and
``best.pth`` with a validation split), ``eval.json``, ``eval_ranks.npz`` (and
``tensorboard/`` when TensorBoard is installed).
"""

from __future__ import annotations

import contextlib
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from attnreid.config import Config, load_config, save_config, to_dict
from attnreid.data.splits import hold_out_validation, limit_identities
from attnreid.distributed import (DistContext, broadcast_parameters, mark_loop_started, unused_classifiers,
                                  wrap_ddp)
from attnreid.engine.amp_guard import AmpGuard
from attnreid.engine.build import build_eval_dataset, load_weights, resolve_device
from attnreid.engine.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from attnreid.engine.hooks import (RUN_DIRS, BudgetHook, CheckpointHook, DiagnosticsHook, EvalHook, Hook,
                                   LoggingHook, NonFiniteLossError, NonFiniteLossGuard, Progress, RunLogger,
                                   run_outputs)
from attnreid.engine.optim import WarmupStepScheduler, build_optimizer, center_optimizer, step_centers
from attnreid.errors import AttnReidError, CheckpointError, DataError
from attnreid.losses.center import center_parameters
from attnreid.models.registry import get_spec
from attnreid.precision import Precision, resolve_precision
from attnreid.safe_io import FolderLock, Terminated, deferred_signals, remove_stale_temps, sigterm_as_interrupt

__all__ = ["DistContext", "Hook", "NonFiniteLossError", "TrainState", "Trainer", "check_run_folder", "prepare_run_dir",
           "run_config", "train", "train_step"]


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


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


def train_step(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
               pids: torch.Tensor, autocast_ctx, scaler, grad_clip: float, params: Sequence[torch.Tensor],
               state: TrainState, center_opt: Optional[torch.optim.Optimizer] = None, center_weight: float = 0.0,
               check=None):
    """One optimiser step; returns ``(total loss, terms)`` (the NaN/inf check is a hook).

    Only the model's forward runs under ``autocast_ctx``; its outputs are cast to float32
    and the criterion runs outside autocast, so every loss term is computed in float32
    whatever the training precision. The outputs are left in ``state.outputs`` for hooks.

    ``center_opt`` (BoT's center loss, weight ``center_weight``) is the centres' own SGD:
    zeroed with the main optimiser and stepped after it by
    :func:`~attnreid.engine.optim.step_centers` (on the unweighted loss's gradient, averaged
    over the ranks under DDP, through the same loss scaler). ``params`` (what
    ``grad_clip`` clips) are the main optimiser's, so the clip never sees the centres.

    ``check(total)`` (the bf16 step guard, engine/amp_guard.py) is asked after the backward
    pass; when it says False no optimiser steps and None is returned.
    """
    with autocast_ctx():
        outputs = model(images)
    outputs = to_float32(outputs)
    total, terms = criterion(outputs, pids)
    optimizer.zero_grad(set_to_none=True)
    if center_opt is not None:
        center_opt.zero_grad(set_to_none=True)
    (total if scaler is None else scaler.scale(total)).backward()
    if grad_clip > 0:
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    if check is not None and not check(total.detach()):
        return None
    if scaler is not None:
        scaler.step(optimizer)
    else:
        optimizer.step()
    step_centers(criterion, center_opt, center_weight, scaler)
    if scaler is not None:
        scaler.update()  # after every optimiser it stepped: update() resets their inf checks
    state.outputs = _map_tensors(outputs, torch.Tensor.detach)
    return total.detach(), terms


class Trainer:
    """Runs the epochs of optimiser steps and calls its hooks; nothing else.

    ``net`` is what the steps call (the model, or its DDP wrapper); ``model`` the plain
    module that is evaluated and saved; ``center_opt`` the center loss's own SGD (BoT,
    stepped after ``optimizer`` in every step, see :func:`train_step`). Hooks run in the
    order given; each gets ``hook.trainer = self``. A hook setting ``state.stop`` ends the run: inside an epoch
    after the current step (that epoch does not count and a resume redoes it), in
    ``after_epoch`` after that epoch.
    """

    def __init__(self, cfg: Config, net: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: WarmupStepScheduler, loader: Any, device: torch.device, precision: Precision,
                 state: TrainState, hooks: Sequence[Hook], logger: RunLogger, progress: Progress,
                 dist: Optional["DistContext"] = None, scaler: Any = None, steps_per_epoch: int = 0,
                 num_classes: int = 0, center_opt: Optional[torch.optim.Optimizer] = None):
        self.cfg, self.net, self.model = cfg, net, _unwrap(net)
        self.criterion, self.optimizer, self.scheduler, self.scaler = criterion, optimizer, scheduler, scaler
        self.center_opt = center_opt  # the center loss's own SGD (losses/center.py), None without one
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.loader, self.sampler = loader, _train_loader_sampler(loader)
        self.device, self.precision, self.dist = device, precision, dist or DistContext()
        self.state, self.logger, self.progress = state, logger, progress
        self.steps_per_epoch, self.num_classes = steps_per_epoch, num_classes
        self.hooks: List[Hook] = []
        for h in hooks:
            h.trainer = self
            self.hooks.append(h)
        # the bf16 kernel-fault guard, when one is among the hooks: it also wraps each step
        self.amp_guard: Optional[AmpGuard] = next((h for h in self.hooks if isinstance(h, AmpGuard)), None)

    def call(self, event: str) -> None:
        for h in self.hooks:
            getattr(h, event)(self.state)

    def train(self) -> str:
        """From ``state.epochs_done`` to ``train.epochs``; returns ``completed`` or the stop reason."""
        s = self.state
        self.call("before_train")
        for epoch in range(s.epochs_done, self.cfg.train.epochs):
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
        s, tc = self.state, self.cfg.train
        images = batch[0].to(self.device, non_blocking=True)
        pids = torch.as_tensor(batch[1]).to(self.device, non_blocking=True)
        if tc.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)

        def one_step(autocast, check):
            return train_step(self.net, self.criterion, self.optimizer, images, pids, autocast, self.scaler,
                              self.cfg.optim.grad_clip, self.params, s, center_opt=self.center_opt,
                              center_weight=self.cfg.loss.center_weight, check=check)

        guard = self.amp_guard
        total, terms = guard.run_step(one_step) if guard is not None else one_step(self.precision.autocast, None)
        s.step += 1
        s.epoch_steps += 1
        # The whole step's loss, averaged over the ranks: what log.jsonl shows, and a NaN on
        # one rank stops every rank at the same step.
        losses = self.dist.mean({"total": float(total), **{k: float(v) for k, v in terms.items()}})
        s.loss = losses.pop("total")
        s.terms = losses
        s.images = images.shape[0] * self.dist.world_size

    def checkpoint(self, full: bool, metrics: Optional[Dict[str, Any]] = None,
                   step: Optional[int] = None, rank_rngs: Optional[List[Any]] = None) -> Dict[str, Any]:
        """Weights, config, class count, position and metrics; ``full`` adds what resume needs
        (optimiser, schedule, RNG and scaler states, the criterion's own parameters, i.e. the
        center loss's centres, and their optimiser's state), which only last.pth keeps. Under
        DDP, ``rank_rngs`` holds every rank's RNG state (``rng`` is rank 0's)."""
        s = self.state
        m = dict(s.metrics if metrics is None else metrics)
        m["best"] = dict(s.best)
        out: Dict[str, Any] = {"model": self.model.state_dict(), "config": to_dict(self.cfg),
                               "num_classes": self.num_classes, "epoch": s.epochs_done,
                               "step": s.step if step is None else step, "metrics": m}
        if full:
            out.update({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "rng": capture_rng_state(), "criterion": self.criterion.state_dict()})
            if self.center_opt is not None:
                out["center_optimizer"] = self.center_opt.state_dict()
            if rank_rngs is not None:
                out["rng_ranks"] = rank_rngs
            if self.scaler is not None:
                out["scaler"] = self.scaler.state_dict()
            if self.amp_guard is not None:
                out["amp_guard"] = self.amp_guard.state_dict()
        return out

    def save(self, name: str, full: bool, gather_rng: bool = True, **kwargs: Any) -> Optional[Path]:
        """``checkpoints/<name>`` from the main process (atomic); see :meth:`checkpoint`.

        Under DDP a full checkpoint gathers every rank's RNG state first, so call it on
        every rank; ``gather_rng=False`` (Ctrl-C, when the other ranks may be anywhere)
        saves rank 0's alone and a resume restarts the other ranks' streams.
        """
        rank_rngs = self.dist.gather_object(capture_rng_state()) if full and gather_rng and self.dist.enabled else None
        if not self.dist.is_main or self.state.run_dir is None:
            return None
        return save_checkpoint(self.state.run_dir / "checkpoints" / name,
                               self.checkpoint(full, rank_rngs=rank_rngs, **kwargs))


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
    """Train ``cfg`` into the run folder ``out_dir``; return the final metrics.

    The returned dict holds the metrics of the last weights on the test split (``mAP``,
    ``rank1``, ...; the same as eval.json) plus ``status`` (``completed`` | ``budget`` |
    ``interrupted`` | a hook's stop reason), ``epoch`` (epochs completed), ``step``,
    ``best_val_mAP`` and ``best_epoch`` (validation split, ``data.val_ids > 0`` only, else
    None), ``precision``, ``train_seconds``, ``img_per_s``, ``data_wait`` (share of step
    time spent waiting for data) and ``run_dir``.

    Model selection never looks at the test split: with ``data.val_ids: N > 0`` the
    periodic evaluations (``train.eval_every``) run on the N held-out training identities
    (data/splits.py) and ``best.pth`` keeps the weights with the best validation mAP; with
    N = 0 the periodic evaluations run on the test split for the log only and there is no
    ``best.pth``.

    ``train.max_minutes`` bounds the training loop (periodic evaluations included); when
    it runs out the run stops after the current step, then still checkpoints and
    evaluates. A KeyboardInterrupt anywhere in the loop or the final evaluation saves
    ``last.pth`` (the epoch in progress is redone on resume) and returns with ``status:
    interrupted``. ``hooks`` run after the evaluation hook and before the checkpoint hook
    (so an early-stopping hook sees ``state.val_metrics`` and its stop is checkpointed).

    ``dataset`` / ``eval_dataset`` (ReIDDataset-like objects) replace the sets the config
    names, e.g. a subset of a benchmark for a smoke test.

    The run folder is locked for the whole run (:class:`attnreid.safe_io.FolderLock`): a
    second run into it is refused in one line, and the lock dies with its process. SIGTERM
    acts like Ctrl-C (``status: interrupted``, ``signal: SIGTERM``). Temporary files that
    killed writes left in the folder are removed at the start.
    """
    run_dir = Path(out_dir)
    dist = DistContext.from_env()
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
            return _train(cfg, run_dir, dist, resume, hooks, quiet, dataset, eval_dataset)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: Config, run_dir: Path, dist: DistContext, resume: bool, hooks: Sequence[Hook], quiet: bool,
           dataset: Any, eval_dataset: Any) -> Dict[str, Any]:
    """:func:`train` once its run folder is locked and prepared."""
    from attnreid.data.datasets import build_dataset_from_config
    from attnreid.data.loader import build_train_loader
    from attnreid.losses import build_criterion
    from attnreid.models import build_model

    tc = cfg.train
    if tc.threads > 0:
        torch.set_num_threads(tc.threads)
    device = resolve_device(tc.device)
    if dist.world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    seed_everything(tc.seed + dist.rank)

    if dataset is None:
        dataset = build_dataset_from_config(cfg.data)
    if not dataset.train or dataset.num_train_pids < 2:
        raise DataError(f"dataset '{cfg.data.dataset}' under {cfg.data.root} has no training identities to learn from")
    if eval_dataset is None:
        eval_dataset = build_eval_dataset(cfg) if (cfg.eval.dataset or cfg.eval.root) else dataset
    dataset, val_dataset = hold_out_validation(dataset, cfg.data.val_ids)
    dataset = limit_identities(dataset, cfg.data.max_ids)
    loader = build_train_loader(cfg.data, dataset, seed=tc.seed, rank=dist.rank, world_size=dist.world_size)
    num_classes = dataset.num_train_pids

    model = build_model(cfg.model, num_classes).to(device)
    # the center loss's centres are sized by the identities and the model's global feature
    sizes = {"num_classes": num_classes, "global_dim": model.global_dim} if cfg.loss.center_weight else {}
    criterion = build_criterion(cfg.loss, cfg.model, **sizes).to(device)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg.optim, [model, criterion])  # all but the centres, which have their own SGD
    center_opt = center_optimizer(criterion, cfg.loss.center_lr)
    scheduler = WarmupStepScheduler(optimizer, cfg.optim)
    precision = resolve_precision(tc.amp, device)
    # fp16's narrow range needs loss scaling; bf16 has float32's range and does not.
    scaler = torch.amp.GradScaler("cuda") if precision.dtype == torch.float16 and device.type == "cuda" else None

    amp_guard = AmpGuard(precision, tc.amp_fallback_after)  # bf16 kernel faults (engine/amp_guard.py)

    state = TrainState(run_dir=run_dir)
    notes: List[str] = []
    if resume:
        notes = _restore(run_dir / "checkpoints" / "last.pth", cfg, model, criterion, optimizer, center_opt,
                         scheduler, scaler, state, dist, amp_guard)
    # DDP makes the ranks' model weights rank 0's, but the criterion is not wrapped: its centres
    # were drawn from each rank's own seed (or come fresh from an old checkpoint).
    broadcast_parameters(center_parameters(criterion))
    if dist.is_main:
        save_config(cfg, run_dir / "config.yaml")

    # The one place the stepped network is built: DDP, then torch.compile (train.compile);
    # evaluation and checkpoints use `model`.
    net: nn.Module = model
    if dist.enabled:
        # find_unused_parameters costs a graph traversal a step: only when a classifier's CE weight is 0.
        net = wrap_ddp(model, device, find_unused=bool(unused_classifiers(model, criterion.classifier_heads())))
    from attnreid.engine.compiled import compile_for_training

    net = compile_for_training(net, tc.compile, device, quiet=quiet or not dist.is_main)

    logger = RunLogger(run_dir, enabled=dist.is_main)
    steps_per_epoch = len(loader) if hasattr(loader, "__len__") else 0
    if tc.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, tc.max_steps_per_epoch) if steps_per_epoch else tc.max_steps_per_epoch
    progress = Progress(enabled=dist.is_main and not quiet, total_epochs=tc.epochs, steps_per_epoch=steps_per_epoch)
    if resume:
        logger.write({"type": "resume", "epoch": state.epochs_done, "step": state.step})
        progress.line(f"resumed {run_dir} at epoch {state.epochs_done + 1}, step {state.step}")
        for note in notes:
            progress.line(note)

    logging = LoggingHook({"train_ids": num_classes, "train_images": len(dataset.train),
                           "val_ids": cfg.data.val_ids, "epoch_mode": cfg.data.epoch_mode})
    checkpoints = CheckpointHook()
    loop_hooks: List[Hook] = [NonFiniteLossGuard(), logging, amp_guard]
    if get_spec(cfg.model.name).head_diagnostics:
        loop_hooks.append(DiagnosticsHook(cfg.loss.acm_gamma, cfg.loss.fdrt_form))
    loop_hooks.append(EvalHook(eval_dataset, val_dataset, tc.eval_every))
    if tc.max_minutes:
        loop_hooks.append(BudgetHook(tc.max_minutes))
    loop_hooks += [*hooks, checkpoints]
    trainer = Trainer(cfg, net, criterion, optimizer, scheduler, loader, device, precision, state, loop_hooks,
                      logger, progress, dist=dist, scaler=scaler, steps_per_epoch=steps_per_epoch,
                      num_classes=num_classes, center_opt=center_opt)
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
            path = checkpoints.save_last(gather_rng=False)
            saved = load_checkpoint(path) if path is not None else {"epoch": state.epochs_done, "step": state.step}
            logger.write({"type": "interrupted", "signal": how, "epoch": saved["epoch"], "step": saved["step"]})
        return {"status": "interrupted", "signal": how, "epoch": int(saved["epoch"]), "step": int(saved["step"]),
                "run_dir": str(run_dir), "checkpoint": str(run_dir / "checkpoints" / "last.pth")}
    finally:
        progress.close()
        logger.close()
        dist.close()
    result = dict(state.metrics)
    result.update({
        "status": status, "epoch": state.epochs_done, "step": state.step, "run_dir": str(run_dir),
        "best_val_mAP": state.best["mAP"] if val_dataset is not None else None,
        "best_epoch": state.best["epoch"] if val_dataset is not None else None,
        "precision": precision.name, "amp_guard": amp_guard.state_dict(),
        "train_seconds": round(time.perf_counter() - t_run, 2),
        "img_per_s": round(logging.img_per_s(), 2),
        "data_wait": round(logging.data_wait(), 4),
    })
    return result


def _restore(path: Path, cfg: Config, model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
             center_opt: Optional[torch.optim.Optimizer], scheduler: WarmupStepScheduler, scaler: Any,
             state: TrainState, dist: DistContext, amp_guard: Optional[AmpGuard] = None) -> List[str]:
    """Load ``last.pth`` into the model, criterion (centres), optimisers, schedule, scaler, RNGs
    and ``state``; return the notes to print (an old checkpoint's fresh centres).

    Every rank reads the file. Each gets back its own RNG state when the checkpoint holds
    one per rank of this world size; otherwise (another number of processes, or saved on
    Ctrl-C) rank 0 takes ``rng`` and the others restart from ``(train.seed, rank, epoch)``.
    A checkpoint from before the centres were saved (no ``criterion`` entry) still resumes:
    its main optimiser state then also holds the centres' (they were its last parameters),
    which is dropped, and the centres start afresh.
    """
    ckpt = load_checkpoint(path)
    saved = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
    saved_name = saved["model"].get("name") if isinstance(saved.get("model"), dict) else None
    if saved_name and saved_name != cfg.model.name:
        raise CheckpointError(f"checkpoint {path} holds a '{saved_name}' model but the config asks for '{cfg.model.name}'")
    load_weights(model, ckpt["model"], str(path))
    missing = [k for k in ("optimizer", "scheduler", "rng") if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} holds no {missing[0]} state, so it cannot be resumed")
    for key in ("optimizer", "scheduler", "rng", "criterion", "center_optimizer", "scaler"):
        if key in ckpt and not isinstance(ckpt[key], dict):
            raise CheckpointError(f"checkpoint {path}: its '{key}' entry is a {type(ckpt[key]).__name__}, "
                                  f"not the state (a dict) a resume needs")
    notes: List[str] = []
    optimizer_state = ckpt["optimizer"]
    centers = center_parameters(criterion)
    if "criterion" in ckpt:
        try:
            criterion.load_state_dict(ckpt["criterion"])
        except (RuntimeError, TypeError, AttributeError) as exc:
            first = str(exc).strip().splitlines()[0]
            raise CheckpointError(f"checkpoint {path}: criterion state (the center loss's centres, "
                                  f"loss.center_weight) does not fit ({first[:160]})") from None
    elif centers:
        optimizer_state = _without_trailing_params(optimizer_state, len(centers),
                                                   sum(len(g["params"]) for g in optimizer.param_groups))
        notes.append(f"note: {path} predates saving the center loss's centres: they start afresh")
    try:
        optimizer.load_state_dict(optimizer_state)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint {path}: optimizer state does not fit ({exc})") from None
    if center_opt is not None and "center_optimizer" in ckpt:
        try:
            center_opt.load_state_dict(ckpt["center_optimizer"])
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise CheckpointError(f"checkpoint {path}: center-loss optimizer state does not fit ({exc})") from None
    for key in ("epoch", "step"):
        value = ckpt.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise CheckpointError(f"checkpoint {path}: '{key}' is {value!r}; expected a whole number >= 0")
    if ckpt["epoch"] > cfg.train.epochs:
        raise CheckpointError(f"checkpoint {path} is at epoch {ckpt['epoch']}, past train.epochs = "
                              f"{cfg.train.epochs}; to extend the run pass train.epochs=N with N >= {ckpt['epoch']}")
    try:
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint {path}: its schedule state does not fit ({type(exc).__name__}: {exc})") from None
    if amp_guard is not None:
        amp_guard.load_state_dict(ckpt.get("amp_guard") or {})
    state.epochs_done = state.epoch = ckpt["epoch"]
    state.step = state.epoch_start_step = ckpt["step"]
    metrics = ckpt.get("metrics") if isinstance(ckpt.get("metrics"), dict) else {}
    metrics = dict(metrics)
    best = metrics.pop("best", state.best)
    state.best = dict(best) if isinstance(best, dict) else state.best
    state.metrics = metrics
    per_rank = ckpt.get("rng_ranks")
    if isinstance(per_rank, list) and len(per_rank) == dist.world_size:
        _restore_rng(per_rank[dist.rank], path)
    elif dist.is_main:
        _restore_rng(ckpt["rng"], path)
    else:
        seed = np.random.SeedSequence([cfg.train.seed, dist.rank, state.epochs_done]).generate_state(1)[0]
        seed_everything(int(seed))
    return notes


def _restore_rng(rng: Any, path: Path) -> None:
    """:func:`restore_rng_state`, with a malformed state as one line naming the checkpoint."""
    try:
        restore_rng_state(rng)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path}: its RNG state ('rng') is not valid ({first})") from None


def _without_trailing_params(optimizer_state: Dict[str, Any], n: int, fits: int) -> Dict[str, Any]:
    """``optimizer_state`` less the last ``n`` parameters of its last group (their ids and state),
    when that leaves the ``fits`` parameters today's optimiser holds; otherwise unchanged (the
    load then says why it does not fit)."""
    groups = optimizer_state.get("param_groups") or []
    if not groups or sum(len(g["params"]) for g in groups) != fits + n or len(groups[-1]["params"]) < n:
        return optimizer_state
    dropped = set(groups[-1]["params"][-n:])
    kept_groups = groups[:-1] + [dict(groups[-1], params=groups[-1]["params"][:-n])]
    kept_state = {k: v for k, v in optimizer_state.get("state", {}).items() if k not in dropped}
    return dict(optimizer_state, param_groups=kept_groups, state=kept_state)
