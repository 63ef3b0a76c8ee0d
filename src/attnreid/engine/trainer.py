"""The training loop of both papers, with the machinery a long run needs.

Recipe (config values, SPEC.md 1 and HA 4): PK batches (P identities x K images), the
model's loss terms summed by the criterion, Adam (or SGD) with linear warm-up and step
decay stepped per epoch. Around it: automatic precision (``train.amp: auto``: bf16
autocast where the CUDA device or the CPU runs bf16 natively, see attnreid/precision.py;
losses always in float32) and channels_last, DistributedDataParallel under ``torchrun`` (the PK sampler splits
identities by rank), gradient clipping, periodic evaluation (on a validation split held
out of the training identities when ``data.val_ids > 0``; never used to select on the test
split), atomic ``last``/``best`` checkpoints, ``resume`` with the optimiser, schedule and every RNG state, a wall-clock
budget, NaN/inf detection naming the loss term, and a Ctrl-C that saves before exiting.

Run folder (docs/design.md): ``config.yaml``, ``log.jsonl``, ``checkpoints/{last,best}.pth``,
``eval.json``, ``eval_ranks.npz`` (and ``tensorboard/`` when TensorBoard is installed).
"""

from __future__ import annotations

import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from attnreid.config import Config, save_config, to_dict
from attnreid.data.splits import hold_out_validation, limit_identities
from attnreid.engine.build import build_eval_dataset, load_weights, resolve_device
from attnreid.engine.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from attnreid.engine.evaluator import evaluate_model
from attnreid.engine.hooks import RUN_DIRS, RUN_FILES, DiagnosticsHook, Hook, Progress, RunLogger
from attnreid.engine.optim import WarmupStepScheduler, build_optimizer
from attnreid.errors import AttnReidError, CheckpointError, DataError
from attnreid.precision import resolve_precision


class NonFiniteLossError(AttnReidError):
    """The loss became NaN or infinite; the message names the step and the loss term."""


@dataclass
class TrainState:
    """What hooks see: the position in the schedule and the last step's losses."""

    epoch: int = 0  # 0-based epoch being run
    step: int = 0  # optimiser steps done so far (global)
    lr: float = 0.0
    loss: float = float("nan")
    terms: Dict[str, float] = field(default_factory=dict)
    outputs: Any = None  # the last step's model outputs (float32, still attached to the graph)
    run_dir: Optional[Path] = None


@dataclass
class DistContext:
    """Rank and world size; initialised from torchrun's environment when WORLD_SIZE > 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "DistContext":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local)

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder unless told to resume or overwrite it."""
    if resume and overwrite:
        raise AttnReidError("--resume and --overwrite cannot be used together")
    if resume:
        last = run_dir / "checkpoints" / "last.pth"
        if not last.is_file():
            raise CheckpointError(f"nothing to resume in {run_dir}: {last} not found")
        return
    held = [n for n in RUN_FILES + RUN_DIRS if (run_dir / n).exists()]
    if held:
        if not overwrite:
            raise AttnReidError(
                f"output folder {run_dir} already holds a run ({held[0]}); pass --resume to continue it "
                f"or --overwrite to replace it")
        for name in held:
            p = run_dir / name
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)


def first_non_finite(total: torch.Tensor, terms: Dict[str, Any]) -> Optional[str]:
    """Name of the first NaN/inf loss term ("total" when only the sum is), else None."""
    if bool(torch.isfinite(total.detach()).all()):
        return None
    for name, value in terms.items():
        if not math.isfinite(float(value)):
            return name
    return "total"


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _train_loader_sampler(loader):
    """The PK sampler inside a loader (as batch_sampler or sampler), for ``set_epoch``."""
    for attr in ("batch_sampler", "sampler"):
        s = getattr(loader, attr, None)
        if s is not None and hasattr(s, "set_epoch"):
            return s
    return None


def to_float32(outputs: Any) -> Any:
    """``outputs`` (tensors in nested dicts/lists) with every floating tensor as float32."""
    if isinstance(outputs, torch.Tensor):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, dict):
        return {k: to_float32(v) for k, v in outputs.items()}
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(to_float32(v) for v in outputs)
    return outputs


def train_step(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
               pids: torch.Tensor, autocast_ctx, scaler, grad_clip: float, params: Sequence[torch.Tensor],
               state: TrainState):
    """One optimiser step; returns ``(total loss, terms)``. Raises on a NaN/inf loss before stepping.

    Only the model's forward runs under ``autocast_ctx``; its outputs are cast to float32
    and the criterion runs outside autocast, so every loss term is computed in float32
    whatever the training precision. The outputs are left in ``state.outputs`` for hooks.
    """
    with autocast_ctx():
        outputs = model(images)
    outputs = to_float32(outputs)
    total, terms = criterion(outputs, pids)
    state.outputs = outputs
    bad = first_non_finite(total, terms)
    if bad is not None:
        value = float(terms[bad]) if bad in terms else float(total.detach())
        raise NonFiniteLossError(
            f"loss is {value} at epoch {state.epoch + 1} step {state.step + 1} (term '{bad}'); "
            f"lower optim.lr, set optim.grad_clip, or check that term's weight")
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(total).backward()
        if grad_clip > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        total.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
    return total.detach(), terms


def train(cfg: Config, out_dir: str | Path, resume: bool = False, overwrite: bool = False,
          hooks: Sequence[Hook] = (), quiet: bool = False, dataset: Any = None,
          eval_dataset: Any = None) -> Dict[str, Any]:
    """Train ``cfg`` into the run folder ``out_dir``; return the final metrics.

    The returned dict holds the metrics of the last weights on the test split (``mAP``,
    ``rank1``, ...; the same as eval.json) plus ``status`` (``completed`` | ``budget`` |
    ``interrupted``), ``epoch`` (epochs completed), ``step``, ``best_val_mAP`` and
    ``best_epoch`` (validation split, ``data.val_ids > 0`` only, else None), ``precision``,
    ``img_per_s``, ``data_wait`` (share of step time spent waiting for data) and ``run_dir``.

    Model selection never looks at the test split: with ``data.val_ids: N > 0`` the
    periodic evaluations (``train.eval_every``) run on the N held-out training identities
    (data/splits.py) and ``best.pth`` keeps the weights with the best validation mAP; with
    N = 0 the periodic evaluations run on the test split for the log only and there is no
    ``best.pth``.

    ``train.max_minutes`` bounds the training loop's wall-clock time; when it runs out
    the run stops after the current step, then still checkpoints and evaluates. A
    KeyboardInterrupt saves ``last.pth`` (the epoch in progress is redone on resume) and
    returns with ``status: interrupted``.

    ``dataset`` / ``eval_dataset`` (ReIDDataset-like objects) replace the sets the config
    names, e.g. a subset of a benchmark for a smoke test.
    """
    from attnreid.data.datasets import build_dataset_from_config
    from attnreid.data.loader import build_train_loader
    from attnreid.losses import build_criterion
    from attnreid.models import build_model

    run_dir = Path(out_dir)
    dist = DistContext.from_env()
    if dist.is_main:
        prepare_run_dir(run_dir, resume, overwrite)
    dist.barrier()
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
    sampler = _train_loader_sampler(loader)
    num_classes = dataset.num_train_pids

    model = build_model(cfg.model, num_classes).to(device)
    criterion = build_criterion(cfg.loss, cfg.model).to(device)
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg.optim, [model, criterion])
    params = [p for g in optimizer.param_groups for p in g["params"]]
    scheduler = WarmupStepScheduler(optimizer, cfg.optim)
    precision = resolve_precision(tc.amp, device)
    # fp16's narrow range needs loss scaling; bf16 has float32's range and does not.
    scaler = torch.amp.GradScaler("cuda") if precision.dtype == torch.float16 and device.type == "cuda" else None

    start_epoch, step = 0, 0
    best: Dict[str, Any] = {"mAP": -1.0, "epoch": 0}
    last_metrics: Dict[str, Any] = {}
    if resume:
        ckpt_path = run_dir / "checkpoints" / "last.pth"
        ckpt = load_checkpoint(ckpt_path)
        saved_name = (ckpt.get("config") or {}).get("model", {}).get("name")
        if saved_name and saved_name != cfg.model.name:
            raise CheckpointError(f"checkpoint {ckpt_path} holds a '{saved_name}' model but the config asks for '{cfg.model.name}'")
        load_weights(model, ckpt["model"], str(ckpt_path))
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint {ckpt_path}: optimizer state does not fit ({exc})") from None
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, step = int(ckpt["epoch"]), int(ckpt["step"])
        last_metrics = dict(ckpt.get("metrics") or {})
        best = dict(last_metrics.pop("best", best))
        restore_rng_state(ckpt["rng"])
    if dist.is_main:
        save_config(cfg, run_dir / "config.yaml")

    net: nn.Module = model
    if dist.world_size > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=True)  # heads whose loss weight is 0 get no gradient

    logger = RunLogger(run_dir, enabled=dist.is_main)
    steps_per_epoch = len(loader) if hasattr(loader, "__len__") else 0
    if tc.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, tc.max_steps_per_epoch) if steps_per_epoch else tc.max_steps_per_epoch
    progress = Progress(enabled=dist.is_main and not quiet, total_epochs=tc.epochs, steps_per_epoch=steps_per_epoch)
    if resume:
        logger.write({"type": "resume", "epoch": start_epoch, "step": step})
        progress.line(f"resumed {run_dir} at epoch {start_epoch + 1}, step {step}")
    progress.line(f"precision: {precision.describe()}")
    logger.write({"type": "run", "epoch": start_epoch, "step": step, "precision": precision.name,
                  "precision_reason": precision.reason, "device": str(device),
                  "train_ids": dataset.num_train_pids, "train_images": len(dataset.train),
                  "val_ids": cfg.data.val_ids, "steps_per_epoch": steps_per_epoch,
                  "epoch_mode": cfg.data.epoch_mode})
    hooks = list(hooks)
    if cfg.model.name == "mhsanet":
        hooks.append(DiagnosticsHook(logger, cfg.loss.acm_gamma))

    state = TrainState(epoch=start_epoch, step=step, run_dir=run_dir)
    budget_s = tc.max_minutes * 60.0
    t_run = time.perf_counter()
    status = "completed"
    completed = start_epoch
    last_eval_epoch = int(last_metrics.get("epoch", 0)) if last_metrics else 0
    last_val_epoch = int(best.get("last_val_epoch", 0))
    totals = {"images": 0, "step_s": 0.0, "data_s": 0.0}

    def checkpoint_state(epochs_done: int) -> Dict[str, Any]:
        metrics = dict(last_metrics)
        metrics["best"] = dict(best)
        s = {"model": _unwrap(net).state_dict(), "config": to_dict(cfg), "num_classes": num_classes,
             "epoch": epochs_done, "step": state.step, "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "rng": capture_rng_state(), "metrics": metrics}
        if scaler is not None:
            s["scaler"] = scaler.state_dict()
        return s

    def run_eval(epochs_done: int) -> None:
        """The test split with the current weights: eval.json, and the run's reported numbers."""
        nonlocal last_metrics, last_eval_epoch
        if dist.is_main:
            m = evaluate_model(_unwrap(net), eval_dataset, cfg, out_dir=run_dir, device=device,
                               extra={"epoch": epochs_done, "step": state.step})
            last_metrics = m
            last_eval_epoch = epochs_done
            logger.write({"type": "eval", **{k: v for k, v in m.items()}})
            progress.line(f"eval epoch {epochs_done}: rank1 {100 * m.get('rank1', float('nan')):.1f}%  "
                          f"mAP {100 * m.get('mAP', float('nan')):.1f}%  ({m['dataset']}, {m['protocol']})")
        dist.barrier()

    def run_val(epochs_done: int) -> None:
        """The held-out validation split: the only place best.pth is chosen."""
        nonlocal last_val_epoch
        if dist.is_main:
            m = evaluate_model(_unwrap(net), val_dataset, cfg, out_dir=None, device=device,
                               extra={"epoch": epochs_done, "step": state.step})
            last_val_epoch = epochs_done
            best["last_val_epoch"] = epochs_done
            logger.write({"type": "val", **m})
            progress.line(f"validation epoch {epochs_done}: rank1 {100 * m['rank1']:.1f}%  mAP {100 * m['mAP']:.1f}%  "
                          f"({len(val_dataset.query)} queries of {cfg.data.val_ids} held-out ids)")
            if m["mAP"] > best["mAP"]:
                best.update({"mAP": float(m["mAP"]), "epoch": epochs_done})
                save_checkpoint(run_dir / "checkpoints" / "best.pth", checkpoint_state(epochs_done))
        dist.barrier()

    try:
        for epoch in range(start_epoch, tc.epochs):
            state.epoch = epoch
            for h in hooks:
                h.before_epoch(state)
            state.lr = scheduler.set_epoch(epoch)
            if sampler is not None:
                sampler.set_epoch(epoch)
            net.train()
            criterion.train()
            progress.start_epoch(epoch, state.lr)
            window = {"n": 0, "images": 0, "step_s": 0.0, "data_s": 0.0, "loss": 0.0, "terms": {}}
            out_of_time = False
            batches = iter(loader)
            t_prev = time.perf_counter()
            i = 0
            for i in range(steps_per_epoch or 1_000_000_000):
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                t_data = time.perf_counter()
                images = batch[0].to(device, non_blocking=True)
                pids = torch.as_tensor(batch[1]).to(device, non_blocking=True)
                if tc.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                total, terms = train_step(net, criterion, optimizer, images, pids, precision.autocast, scaler,
                                          cfg.optim.grad_clip, params, state)
                state.step += 1
                state.loss = float(total)
                state.terms = {k: float(v) for k, v in terms.items()}
                t_end = time.perf_counter()
                n_img = images.shape[0] * dist.world_size
                window["n"] += 1
                window["images"] += n_img
                window["step_s"] += t_end - t_prev
                window["data_s"] += t_data - t_prev
                window["loss"] += state.loss
                for k, v in state.terms.items():
                    window["terms"][k] = window["terms"].get(k, 0.0) + v
                t_prev = t_end
                ips = window["images"] / max(window["step_s"], 1e-9)
                progress.update(f"loss {state.loss:.3f}  {ips:.1f} img/s")
                if state.step % tc.log_every == 0:
                    _log_window(logger, window, state, totals)
                for h in hooks:
                    h.after_step(state)
                if budget_s and time.perf_counter() - t_run > budget_s:
                    out_of_time = True
                    break
            if window["n"]:
                _log_window(logger, window, state, totals)
            if out_of_time and not (steps_per_epoch and i + 1 >= steps_per_epoch):
                status = "budget"  # stopped inside the epoch: it does not count, resume redoes it
                break
            completed = epoch + 1
            for h in hooks:
                h.after_epoch(state)
            progress.line(f"epoch {completed}/{tc.epochs}  lr {state.lr:.2e}  loss {state.loss:.4f}  "
                          f"{totals['images'] / max(totals['step_s'], 1e-9):.1f} img/s")
            if tc.eval_every and completed % tc.eval_every == 0 and completed < tc.epochs:
                run_val(completed) if val_dataset is not None else run_eval(completed)
            if dist.is_main:
                save_checkpoint(run_dir / "checkpoints" / "last.pth", checkpoint_state(completed))
            if out_of_time:
                status = "budget"
                break
    except KeyboardInterrupt:
        if dist.is_main:
            save_checkpoint(run_dir / "checkpoints" / "last.pth", checkpoint_state(completed))
        progress.close()
        logger.write({"type": "interrupted", "epoch": completed, "step": state.step})
        logger.close()
        return {"status": "interrupted", "epoch": completed, "step": state.step, "run_dir": str(run_dir),
                "checkpoint": str(run_dir / "checkpoints" / "last.pth")}
    except BaseException:
        progress.close()
        logger.close()
        raise

    if status == "budget":
        progress.line(f"time budget of {tc.max_minutes:g} min reached after {completed} epochs "
                      f"({state.step} steps); evaluating")
    if val_dataset is not None and last_val_epoch != completed:
        run_val(completed)
    if last_eval_epoch != completed or not last_metrics:
        run_eval(completed)
    if dist.is_main:
        save_checkpoint(run_dir / "checkpoints" / "last.pth", checkpoint_state(completed))
    progress.close()
    logger.close()
    result = dict(last_metrics)
    result.update({
        "status": status, "epoch": completed, "step": state.step, "run_dir": str(run_dir),
        "best_val_mAP": best["mAP"] if val_dataset is not None else None,
        "best_epoch": best["epoch"] if val_dataset is not None else None,
        "precision": precision.name,
        "train_seconds": round(time.perf_counter() - t_run, 2),
        "img_per_s": round(totals["images"] / max(totals["step_s"], 1e-9), 2),
        "data_wait": round(totals["data_s"] / max(totals["step_s"], 1e-9), 4),
    })
    return result


def _log_window(logger: RunLogger, window: Dict[str, Any], state: TrainState, totals: Dict[str, float]) -> None:
    """One ``train`` line of log.jsonl averaged over the steps since the last one; resets the window."""
    n = window["n"]
    if not n:
        return
    totals["images"] += window["images"]
    totals["step_s"] += window["step_s"]
    totals["data_s"] += window["data_s"]
    record = {"type": "train", "epoch": state.epoch + 1, "step": state.step, "lr": state.lr,
              "loss": window["loss"] / n}
    record.update({k: v / n for k, v in window["terms"].items()})
    record["img_per_s"] = window["images"] / max(window["step_s"], 1e-9)
    record["data_wait"] = window["data_s"] / max(window["step_s"], 1e-9)
    logger.write(record)
    window.update({"n": 0, "images": 0, "step_s": 0.0, "data_s": 0.0, "loss": 0.0, "terms": {}})
