"""Checkpoints: atomic writes, safe loads, RNG state capture, and the training run's checkpointer.

A checkpoint is a plain dict (keys in docs/design.md: ``model``, ``config``,
``num_classes``, ``epoch``, ``step``, ``optimizer``, ``scheduler``, ``rng``, ``metrics``,
``version``). It is written to a temporary file in the same folder, fsynced and renamed
over the target, so a crash or Ctrl-C mid-write never leaves a half-written
``last.pth``. SIGINT and SIGTERM that arrive during the write are held until it is done
(:func:`attnreid.safe_io.deferred_signals`), so Ctrl-C, pressed once or twice, never
abandons a write half-way. It is read with ``torch.load(weights_only=True)``: a checkpoint
can hold tensors, numbers, strings, lists and dicts, never code. That is why the RNG states
are stored as tensors and lists rather than numpy objects. Before reading, the archive's
declared sizes are checked (no decompression bombs, nothing larger than the machine's memory).

:class:`Checkpointer` is what a training run saves and what its resume restores, from one
list of entries, so that the two cannot drift apart.
"""

from __future__ import annotations

import pickle
import random
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from attnreid.config import to_dict
from attnreid.errors import AttnReidError, CheckpointError
from attnreid.losses.center import center_parameters
from attnreid.models import load_state_dict_checked
from attnreid.safe_io import atomic_open, check_zip_members, deferred_signals

CHECKPOINT_VERSION = 1


def save_checkpoint(path: str | Path, state: Dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (temp file, fsync, rename); return the path.

    A signal (Ctrl-C, SIGTERM) during the write is delivered once the write is done; any
    other failure (disk full) removes the temporary file and leaves the previous ``path``.
    """
    path = Path(path)
    with deferred_signals():
        with atomic_open(path, "wb") as fh:
            torch.save({"version": CHECKPOINT_VERSION, **state}, fh)
    return path


def load_checkpoint(path: str | Path) -> Dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``.

    Raises :class:`CheckpointError` naming the file when it is missing, truncated, not
    a checkpoint, or holds something other than a dict with a ``model`` entry.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    # torch.save writes a zip archive; anything else (text, a cut-off file) is not one.
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt (not a torch.save archive)")
    try:
        with zipfile.ZipFile(path) as zf:
            check_zip_members(path, zf)
    except AttnReidError as exc:
        raise CheckpointError(f"checkpoint {exc}") from None
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(exc).__name__})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower():
            raise CheckpointError(
                f"checkpoint {path} cannot be read safely: it holds objects other than tensors "
                "and plain values, which weights_only=True refuses to unpickle"
            ) from None
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt (unreadable pickle)") from None
    except Exception as exc:  # torch reports a damaged archive with several exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({first[:120]})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint {path} is not an attnreid checkpoint (no 'model' entry)")
    weights = state["model"]
    if not isinstance(weights, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in weights.items()):
        raise CheckpointError(f"checkpoint {path}: its 'model' entry is not a state dict (names to tensors), "
                              f"but {type(weights).__name__}")
    return state


def capture_rng_state() -> Dict[str, Any]:
    """The torch (CPU and CUDA), numpy and python RNG states as checkpoint-safe values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: Dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# The entries a resume cannot do without; the others of a full checkpoint load when present.
RESUME_REQUIRED = ("optimizer", "scheduler", "rng")
# What a state entry is, for the one line that says it does not fit.
_WHAT = {"criterion": "criterion state (the center loss's centres, loss.center_weight)",
         "optimizer": "optimizer state", "center_optimizer": "center-loss optimizer state",
         "scheduler": "schedule state", "scaler": "loss scaler state", "amp_guard": "bf16 guard state"}


class Checkpointer:
    """Saves a training run's checkpoints and restores ``last.pth`` on resume, entry by entry.

    Every checkpoint holds ``model``, ``config``, ``num_classes``, ``epoch``, ``step`` and
    ``metrics`` (with ``best``). A full one (``last.pth``, what resume reads) adds the objects
    of :meth:`stateful`, each under its key (``criterion``: the center loss's centres; one
    entry per optimiser slot: ``optimizer``, ``center_optimizer``; ``scheduler``; ``scaler``
    with fp16 loss scaling; ``amp_guard`` with the bf16 guard), and ``rng`` (and under DDP
    ``rng_ranks``: every rank's, in rank order; ``rng`` is rank 0's). :meth:`state_dict`
    and :meth:`restore` walk the same list.

    ``state`` is the trainer's TrainState (epoch, step, metrics, best, run folder).
    """

    def __init__(self, cfg: Any, model: nn.Module, criterion: nn.Module, optimizers: Sequence[Any],
                 scheduler: Any, state: Any, dist: Any, num_classes: int = 0, scaler: Any = None,
                 amp_guard: Any = None):
        self.cfg, self.model, self.criterion, self.optimizers = cfg, model, criterion, list(optimizers)
        self.scheduler, self.state, self.dist, self.num_classes = scheduler, state, dist, num_classes
        self.scaler, self.amp_guard = scaler, amp_guard

    def stateful(self) -> Dict[str, Any]:
        """A full checkpoint's objects with ``state_dict``/``load_state_dict``, by key, in restore order."""
        parts: Dict[str, Any] = {"criterion": self.criterion, **{s.name: s for s in self.optimizers},
                                 "scheduler": self.scheduler}
        if self.scaler is not None:
            parts["scaler"] = self.scaler
        if self.amp_guard is not None:
            parts["amp_guard"] = self.amp_guard
        return parts

    # ---- save
    def state_dict(self, full: bool, metrics: Optional[Dict[str, Any]] = None, step: Optional[int] = None,
                   rank_rngs: Optional[List[Any]] = None) -> Dict[str, Any]:
        """The checkpoint as a dict; ``metrics`` and ``step`` replace the state's."""
        s = self.state
        m = dict(s.metrics if metrics is None else metrics)
        m["best"] = dict(s.best)
        out: Dict[str, Any] = {"model": self.model.state_dict(), "config": to_dict(self.cfg),
                               "num_classes": self.num_classes, "epoch": s.epochs_done,
                               "step": s.step if step is None else step, "metrics": m}
        if full:
            out.update({key: part.state_dict() for key, part in self.stateful().items()})
            out["rng"] = capture_rng_state()
            if rank_rngs is not None:
                out["rng_ranks"] = rank_rngs
        return out

    def save(self, name: str, full: bool, gather_rng: bool = True, **kwargs: Any) -> Optional[Path]:
        """``RUN/checkpoints/<name>`` from the main process (atomic); see :meth:`state_dict`.

        Under DDP a full checkpoint gathers every rank's RNG state first, so call it on
        every rank; ``gather_rng=False`` (Ctrl-C, when the other ranks may be anywhere)
        saves rank 0's alone and a resume restarts the other ranks' streams.
        """
        rank_rngs = self.dist.gather_object(capture_rng_state()) if full and gather_rng and self.dist.enabled else None
        if not self.dist.is_main or self.state.run_dir is None:
            return None
        return save_checkpoint(self.state.run_dir / "checkpoints" / name,
                               self.state_dict(full, rank_rngs=rank_rngs, **kwargs))

    def save_last(self, gather_rng: bool = True) -> Optional[Path]:
        """``last.pth``: a run stopped inside an epoch (Ctrl-C, the budget) keeps the current
        weights but the step count of the last completed epoch, which a resume redoes."""
        s = self.state
        mid_epoch = s.epoch >= s.epochs_done
        return self.save("last.pth", full=True, gather_rng=gather_rng,
                         step=s.epoch_start_step if mid_epoch else s.step)

    # ---- restore
    def restore(self, path: Path) -> List[str]:
        """Load ``path`` (a ``last.pth``) into the model, the objects of :meth:`stateful`, the
        RNGs and ``state``; return the notes to print (an old checkpoint's fresh centres).

        Every rank reads the file. Each gets back its own RNG state when the checkpoint holds
        one per rank of this world size; otherwise (another number of processes, or saved on
        Ctrl-C) rank 0 takes ``rng`` and the others restart from ``(train.seed, rank, epoch)``.
        A checkpoint from before the centres were saved (no ``criterion`` entry) still resumes:
        its main optimiser state then also holds the centres' (they were its last parameters),
        which is dropped, and the centres start afresh.
        """
        ckpt = load_checkpoint(path)
        self._restore_config(ckpt, path)
        load_state_dict_checked(self.model, ckpt["model"], str(path))
        parts = self.stateful()
        missing = [k for k in RESUME_REQUIRED if k not in ckpt]
        if missing:
            raise CheckpointError(f"checkpoint {path} holds no {missing[0]} state, so it cannot be resumed")
        for key in [*parts, "rng"]:
            if key in ckpt and not isinstance(ckpt[key], dict):
                raise CheckpointError(f"checkpoint {path}: its '{key}' entry is a {type(ckpt[key]).__name__}, "
                                      f"not the state (a dict) a resume needs")
        epoch, step = self._position(ckpt, path)
        states, notes = {k: ckpt[k] for k in parts if k in ckpt}, []
        centres = center_parameters(self.criterion)
        if "criterion" not in ckpt and centres:
            main = self.optimizers[0]
            states[main.name] = _without_trailing_params(states[main.name], len(centres), len(main.params()))
            notes.append(f"note: {path} predates saving the center loss's centres: they start afresh")
        for key, part in parts.items():
            if key in states:
                self._load(key, part, states[key], path)
        s = self.state
        s.epochs_done = s.epoch = epoch
        s.step = s.epoch_start_step = step
        metrics = dict(ckpt.get("metrics") if isinstance(ckpt.get("metrics"), dict) else {})
        best = metrics.pop("best", s.best)
        s.best = dict(best) if isinstance(best, dict) else s.best
        s.metrics = metrics
        self._restore_rng(ckpt, path)
        return notes

    def _restore_config(self, ckpt: Dict[str, Any], path: Path) -> None:
        """The saved config names the same model as the run's."""
        saved = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else {}
        saved_name = saved["model"].get("name") if isinstance(saved.get("model"), dict) else None
        if saved_name and saved_name != self.cfg.model.name:
            raise CheckpointError(f"checkpoint {path} holds a '{saved_name}' model but the config asks for "
                                  f"'{self.cfg.model.name}'")

    def _position(self, ckpt: Dict[str, Any], path: Path) -> tuple:
        """``(epoch, step)``: whole numbers >= 0, the epoch not past ``train.epochs``."""
        for key in ("epoch", "step"):
            value = ckpt.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise CheckpointError(f"checkpoint {path}: '{key}' is {value!r}; expected a whole number >= 0")
        epochs = self.cfg.train.epochs
        if ckpt["epoch"] > epochs:
            raise CheckpointError(f"checkpoint {path} is at epoch {ckpt['epoch']}, past train.epochs = "
                                  f"{epochs}; to extend the run pass train.epochs=N with N >= {ckpt['epoch']}")
        return ckpt["epoch"], ckpt["step"]

    @staticmethod
    def _load(key: str, part: Any, state: Dict[str, Any], path: Path) -> None:
        try:
            part.load_state_dict(state)
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            text = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
            why = f"{type(exc).__name__}: {text}" if isinstance(exc, KeyError) else (text or type(exc).__name__)
            raise CheckpointError(f"checkpoint {path}: its {_WHAT.get(key, key)} ('{key}') does not fit "
                                  f"({why})") from None

    def _restore_rng(self, ckpt: Dict[str, Any], path: Path) -> None:
        dist = self.dist
        per_rank = ckpt.get("rng_ranks")
        if isinstance(per_rank, list) and len(per_rank) == dist.world_size:
            rng = per_rank[dist.rank]
        elif dist.is_main:
            rng = ckpt["rng"]
        else:
            seed = np.random.SeedSequence([self.cfg.train.seed, dist.rank, self.state.epochs_done]).generate_state(1)[0]
            seed_everything(int(seed))
            return
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
