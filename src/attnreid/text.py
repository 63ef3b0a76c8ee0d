"""Wording of messages shared by every layer (imports nothing from attnreid)."""

from __future__ import annotations

from typing import Optional


def plural(n: int, word: str, many: Optional[str] = None) -> str:
    """``1 epoch``, ``2 epochs``, ``0 queries`` (``many`` where adding an s is wrong)."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


def the_first(n: int, word: str) -> str:
    """``the first image``, ``the first 6 images``."""
    return f"the first {word}" if n == 1 else f"the first {n} {word}s"


__all__ = ["plural", "the_first"]
