"""Small helpers shared by the command modules."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

from attnreid.errors import AttnReidError


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
    if kind == "file":
        from attnreid.safe_io import check_replaceable

        check_replaceable(path)  # /dev/null, a FIFO: an atomic write would replace it
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


__all__ = ["check_output_path", "device_option", "print_json"]
