"""Run-folder bookkeeping around the training loop: log.jsonl, TensorBoard, progress display.

Kept apart from the loop (fast-reid's separation of loop and hooks) so the loop reads
as the papers' recipe. Only the main process (rank 0) writes or prints.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

RUN_FILES = ("config.yaml", "log.jsonl", "eval.json", "eval_ranks.npz")
RUN_DIRS = ("checkpoints", "tensorboard", "report")


class Hook:
    """Called by the trainer at five points; override what you need.

    ``state`` is the trainer's :class:`~attnreid.engine.trainer.TrainState` (epoch, step,
    lr, the last step's loss, terms and model outputs, the epoch's mean loss, the run
    folder and logger).
    """

    def before_train(self, state: Any) -> None:
        pass

    def before_epoch(self, state: Any) -> None:
        pass

    def after_step(self, state: Any) -> None:
        pass

    def after_epoch(self, state: Any) -> None:
        pass

    def after_train(self, state: Any) -> None:
        pass


class DiagnosticsHook(Hook):
    """MHSA-Net's per-epoch diagnostics (engine/diagnostics.py) as one ``diagnostics`` line of log.jsonl."""

    def __init__(self, logger: "RunLogger", acm_gamma: float):
        from attnreid.engine.diagnostics import DiagnosticsMeter

        self.logger, self.acm_gamma = logger, acm_gamma
        self.meter = DiagnosticsMeter()
        self.last: Dict[str, Any] = {}

    def before_epoch(self, state: Any) -> None:
        self.meter.reset()

    def after_step(self, state: Any) -> None:
        from attnreid.engine.diagnostics import batch_diagnostics

        outputs = state.outputs
        if isinstance(outputs, dict) and "alpha" in outputs:
            self.meter.add(batch_diagnostics(outputs, self.acm_gamma), int(outputs["alpha"].shape[0]))

    def after_epoch(self, state: Any) -> None:
        means = self.meter.means()
        if means:
            self.last = {"epoch": state.epoch + 1, **means}
            self.logger.write({"type": "diagnostics", "epoch": state.epoch + 1, "step": state.step, **means})


class RunLogger:
    """Appends JSON lines to ``RUN/log.jsonl`` and mirrors scalars to TensorBoard if installed."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = run_dir / "log.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the optional tensorboard package
            except Exception:
                self.tb = None
            else:
                self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def write(self, record: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {k: _jsonable(v) for k, v in record.items()}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(clean) + "\n")
        if self.tb is not None:
            kind = record.get("type", "train")
            step = int(record.get("step", 0))
            for k, v in clean.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch", "step"):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


class Progress:
    """A rich progress bar on a terminal; one plain line per epoch otherwise (logs, CI, tests)."""

    def __init__(self, enabled: bool, total_epochs: int, steps_per_epoch: int, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.total_epochs = total_epochs
        self.steps_per_epoch = steps_per_epoch
        self.bar = None
        self.task = None
        self.t_start = time.perf_counter()
        if enabled and getattr(self.stream, "isatty", lambda: False)():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

            self.bar = RichProgress(TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(),
                                    MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
                                    console=Console(file=self.stream), transient=False)
            self.bar.start()

    def start_epoch(self, epoch: int, lr: float) -> None:
        if self.bar is not None:
            if self.task is not None:
                self.bar.remove_task(self.task)
            self.task = self.bar.add_task("train", total=self.steps_per_epoch,
                                          epoch=f"{epoch + 1}/{self.total_epochs}", info=f"lr {lr:.2e}")

    def update(self, info: str) -> None:
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, advance=1, info=info)

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.console.print(text, highlight=False, markup=False)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
