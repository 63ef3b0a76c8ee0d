"""Helpers shared by the tests."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Iterable, List, Tuple


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


class FaultOnCall:
    """A forward hook that injects a bf16 kernel fault: from the ``at``-th call under autocast
    (1-based, counting only calls with gradients on, i.e. training steps and kernel checks),
    for ``times`` calls, the module's output becomes inf. ``any_precision``: count and fault
    float32 calls too (a divergence, not a kernel fault). It counts what it saw."""

    def __init__(self, at: int, times: int = 1, any_precision: bool = False):
        self.at, self.times, self.any_precision = at, times, any_precision
        self.calls = self.autocast_calls = self.float32_training_calls = self.fired = 0

    def __call__(self, module, args, output):
        import torch

        if not torch.is_grad_enabled():  # shape recording, evaluation
            return None
        autocast = torch.is_autocast_enabled(output.device.type)
        self.autocast_calls += autocast
        self.float32_training_calls += not autocast
        if not (autocast or self.any_precision):
            return None
        self.calls += 1
        if self.at <= self.calls < self.at + self.times:
            self.fired += 1
            return output + float("inf")  # still in the graph, as a faulty kernel's output is
        return None


def set_batchnorm_statistics(model, batches: Iterable) -> None:
    """Give a random network's BatchNorms the statistics of ``batches`` (a plain average over them).

    With its initial running statistics a random network maps every image to almost the same
    feature, so rankings and comparisons made with it would test nothing."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average over the batches
    model.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)


def read_log(run: Path) -> list:
    """The records of ``run/log.jsonl`` written so far (a line being written is skipped)."""
    path = Path(run) / "log.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written as we read
            pass
    return out
