"""Checkpoints: atomic writes, safe loads, RNG state capture.

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
"""

from __future__ import annotations

import pickle
import random
import zipfile
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch

from attnreid.errors import AttnReidError, CheckpointError
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
