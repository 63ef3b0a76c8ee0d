"""Small helpers shared by the command modules."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

from attnreid.errors import AttnReidError

# One rule wherever a command names a model (attnreid.engine.model_source; not imported here: keeps --help fast).
MODEL_HELP = ("The model: a run folder (its config.yaml and checkpoints/last.pth), a checkpoint (.pth, its "
              "saved config) or a config (.yaml, with --checkpoint).")
CHECKPOINT_HELP = "The weights of a .yaml config, or another checkpoint of a run folder (e.g. RUN/checkpoints/best.pth)."
OVERRIDES_HELP = "KEY=VALUE overrides of the model's config, e.g. data.root=DATA train.device=cpu."


def print_json(obj: Any) -> None:
    """Write exactly one JSON object to stdout (nothing else may go to stdout with --json)."""
    sys.stdout.write(json.dumps(obj, indent=None, sort_keys=False) + "\n")
    sys.stdout.flush()


def check_output_path(path: Path, kind: str = "file", option: str = "--out", suffix: Optional[str] = None) -> Path:
    """Check, before any work starts, that a command will be able to write ``path``.

    ``kind`` is ``"file"`` (a file is written at ``path``) or ``"dir"`` (a folder is
    created or filled there). The path must not be the wrong kind of thing already, and
    the nearest existing folder above it must accept new entries: that is probed by
    creating and removing a temporary entry there, because permission bits alone do not
    tell (root may write anywhere by mode, yet not in ``/proc`` or on a read-only mount).
    Nothing is left behind. Returns ``path``; a problem is one line naming the option.
    """
    if kind not in ("file", "dir"):
        raise ValueError(f"kind must be 'file' or 'dir', not {kind!r}")
    path = Path(path)
    where = f"{option} {path}"
    if suffix is not None and path.suffix.lower() != suffix:
        raise AttnReidError(f"{where} must end in {suffix}")
    if kind == "file" and path.is_dir():
        raise AttnReidError(f"{where} is a folder; expected a file name")
    if kind == "dir" and path.exists() and not path.is_dir():
        raise AttnReidError(f"{where} is a file; expected a folder (or a new path)")
    if kind == "file" and path.exists() and not os.access(path, os.W_OK):
        raise AttnReidError(f"{where}: the file exists and cannot be overwritten (permission denied)")
    probe = path if kind == "dir" and path.is_dir() else path.parent
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise AttnReidError(f"{where} cannot be written: {probe} is a file, not a folder")
    try:
        entry = tempfile.mkdtemp(prefix=".attnreid-write-check-", dir=probe)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise AttnReidError(f"{where} cannot be written: cannot create anything in {probe} ({reason})") from None
    os.rmdir(entry)
    if kind == "file":
        from attnreid.safe_io import check_replaceable

        check_replaceable(path)  # /dev/null, a FIFO: an atomic write would replace it
    return path


def device_option(name: str, option: str = "--device"):
    """A ``--device`` value as a torch.device: ``auto`` (CUDA when present), cpu, cuda or cuda:N."""
    import re

    import torch

    name = name.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if re.fullmatch(r"cuda(:\d+)?", name):
        if not torch.cuda.is_available():
            raise AttnReidError(f"{option} is {name!r} but CUDA is not available on this machine; use auto or cpu")
        return torch.device(name)
    raise AttnReidError(f"{option} is {name!r}; expected auto, cpu, cuda or cuda:N")


def resolve_model(source, overrides=(), checkpoint=None, need_weights: bool = True):
    """:func:`attnreid.engine.model_source.resolve_model`, imported when a command runs."""
    from attnreid.engine.model_source import resolve_model as resolve

    return resolve(source, list(overrides or []), checkpoint, need_weights=need_weights)


class PipeSafeStream:
    """A text stream whose reader may go away (``attnreid train ... | head -2``).

    After the first broken pipe the rest of the output is dropped instead of raising
    ``BrokenPipeError`` in the middle of the work: training goes on and checkpoints. The
    file descriptor is pointed at the null device, so the interpreter's final flush of
    what is still buffered does not fail either.
    """

    def __init__(self, stream: Any):
        self._stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._drop()
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if not self.broken:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._drop()

    def _drop(self) -> None:
        self.broken = True
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self._stream.fileno())
            os.close(null)
        except (OSError, ValueError, AttributeError):  # not a real file (e.g. a test's StringIO)
            pass

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding ... of the stream itself
        return getattr(self._stream, name)


def interrupted(hint: str) -> None:
    """Ctrl-C: one line on stderr saying how to go on, exit status 130 (128 + SIGINT)."""
    import typer

    print(f"interrupted; {hint}", file=sys.stderr, flush=True)
    raise typer.Exit(130)


__all__ = ["CHECKPOINT_HELP", "MODEL_HELP", "OVERRIDES_HELP", "PipeSafeStream", "check_output_path", "device_option", "interrupted",
           "print_json", "resolve_model"]
