"""Helpers shared by the tests."""

from __future__ import annotations

import contextlib
import io
from typing import List, Tuple


def run_cli(args: List[str]) -> Tuple[int, str, str]:
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    from attnreid.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return code, out.getvalue(), err.getvalue()


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    """A user error: exit 2, one line on stderr, no traceback, naming what is wrong."""
    assert code == 2, f"exit code {code}, stderr: {err}"
    assert "Traceback" not in err, err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
