"""Everything around the training loop, as hooks: checkpoints, evaluation, logging and progress,
the time budget, the non-finite-loss guard and MHSA-Net's diagnostics.

The shape is fast-reid's ``HookBase``: a :class:`Hook` has five methods the
:class:`~attnreid.engine.trainer.Trainer` calls, in the order the hooks were registered,
each with the trainer's :class:`~attnreid.engine.trainer.TrainState`; ``hook.trainer`` is
the trainer (its model, optimisers, checkpointer, logger and progress display), held weakly
as fast-reid's hooks hold theirs. A hook gets its settings through its constructor; it
reads no config from the trainer. A new behaviour (EMA weights, early stopping, another
logger) is one new hook passed to ``train(..., hooks=[...])``; a hook ends the run by
setting ``state.stop`` to a reason. Only the main process (rank 0) writes or prints.
"""

from __future__ import annotations

import json
import math
import sys
import time
import weakref
from pathlib import Path
from typing import Any, Dict, Optional

from attnreid.engine import evaluator
from attnreid.engine.diagnostics import DiagnosticsMeter, batch_diagnostics
from attnreid.errors import AttnReidError
from attnreid.safe_io import is_temp_name
from attnreid.text import plural

# What attnreid writes in a run folder, and nothing else: --overwrite deletes exactly these
# (a user's own files, also inside these folders, stay). A pattern is a glob relative to the run folder.
EVAL_FILES = ("eval.json", "eval_ranks.npz", "eval_per_query.npz")
RUN_FILES = ("config.yaml", "log.jsonl") + EVAL_FILES
RUN_DIRS = ("checkpoints", "tensorboard", "report", "datasets", "robustness")
RUN_OUTPUTS = RUN_FILES + (
    "checkpoints/last.pth", "checkpoints/best.pth",
    "tensorboard/events.out.tfevents.*",
    "report/index.html", "report/report_files",  # viz.report: the page and its pictures folder
    *(f"datasets/*/{n}" for n in EVAL_FILES),  # eval.datasets: one folder per test set
    "robustness/robustness.json", "robustness/robustness.png",  # attnreid robustness's default --out
)


def run_outputs(run_dir: Path) -> list:
    """The files and folders of ``RUN_OUTPUTS`` present in ``run_dir``, plus attnreid's leftover
    temporary files in its folders (``safe_io.temp_path`` names)."""
    found = [p for pattern in RUN_OUTPUTS for p in sorted(run_dir.glob(pattern))]
    for folder in [run_dir, *(run_dir / d for d in RUN_DIRS), *sorted(run_dir.glob("datasets/*"))]:
        if folder.is_dir():
            found += [p for p in sorted(folder.iterdir()) if is_temp_name(p.name) and p.is_file()]
    return found


class NonFiniteLossError(AttnReidError):
    """The loss became NaN or infinite; the message names the step and the loss term."""


class Hook:
    """Called by the trainer at five points; override what you need.

    ``state`` is the trainer's TrainState: ``epoch`` (0-based, the one running),
    ``epochs_done``, ``step`` (optimiser steps so far), ``lr``, the last step's ``loss``,
    ``terms`` and ``outputs``, the epoch's running mean ``epoch_loss``, the last
    evaluations (``metrics`` on the test split, ``val_metrics``), ``best`` and ``stop``.
    """

    _trainer: Optional[weakref.ref] = None

    @property
    def trainer(self) -> Any:
        """The trainer that calls this hook, or None (before it is registered, or once the
        trainer is gone: the hook holds it weakly, so a hook kept after a run does not keep
        its model, data and optimisers alive)."""
        return self._trainer() if self._trainer is not None else None

    @trainer.setter
    def trainer(self, trainer: Any) -> None:
        self._trainer = weakref.ref(trainer) if trainer is not None else None

    def before_train(self, state: Any) -> None:
        """Once, before the first epoch (also when resuming)."""

    def before_epoch(self, state: Any) -> None:
        """At the start of each epoch, after its lr is set."""

    def after_step(self, state: Any) -> None:
        """After each optimiser step."""

    def after_epoch(self, state: Any) -> None:
        """After each completed epoch (not after one a hook stopped half-way)."""

    def after_train(self, state: Any) -> None:
        """Once, when the epochs are done or a hook stopped the run (not on Ctrl-C or an error)."""


class NonFiniteLossGuard(Hook):
    """after_step: a NaN/inf loss ends the run with one line naming the epoch, the step and the loss term.

    The failing step's weights are never checkpointed: the error leaves the run folder as
    the last completed epoch wrote it.
    """

    def after_step(self, state: Any) -> None:
        if math.isfinite(state.loss):
            return
        bad = next((k for k, v in state.terms.items() if not math.isfinite(v)), "total")
        value = state.terms.get(bad, state.loss)
        error = NonFiniteLossError(
            f"loss is {value} at epoch {state.epoch + 1} step {state.step} (term '{bad}'); "
            f"lower optim.lr, set optim.grad_clip, or check that term's weight")
        error.every_rank = True  # the loss is the ranks' mean: every rank stops here, rank 0 says so
        raise error


class CheckpointHook(Hook):
    """Writes ``checkpoints/last.pth`` (weights, optimisers, schedule, RNG, the center loss's
    centres: what resume reads) after every epoch and at the end, through the trainer's
    :class:`~attnreid.engine.checkpoint.Checkpointer` (whose ``save_last`` Ctrl-C also calls).

    A run stopped inside an epoch (the budget) keeps the current weights but the schedule
    position of the last completed epoch: resume redoes the stopped epoch, and its step
    counter then matches an uninterrupted run's.
    """

    def after_epoch(self, state: Any) -> None:
        self.trainer.checkpointer.save_last()

    def after_train(self, state: Any) -> None:
        self.trainer.checkpointer.save_last()


class EvalHook(Hook):
    """Evaluation; the only place that chooses ``best.pth``, and never on the test split.

    With a validation split (``data.val_ids > 0``): every ``train.eval_every`` epochs and at
    the end on the validation split, keeping ``best.pth`` (weights, config and metrics) at the
    best validation mAP. Without one: every ``train.eval_every`` epochs on the test split, for
    the log only. Always at the end: the last weights on the test split, which writes
    eval.json and gives the run's reported numbers.

    ``cfg`` is the run's config: ``train.eval_every``, ``train.epochs``, ``data.val_ids`` and
    what the evaluation reads (``eval.*``, the image size, the model's test feature).
    """

    def __init__(self, cfg: Any, test_set: Any, val_set: Any = None):
        self.cfg, self.test_set, self.val_set = cfg, test_set, val_set
        self.every, self.epochs = cfg.train.eval_every, cfg.train.epochs

    def after_epoch(self, state: Any) -> None:
        done = state.epochs_done
        if self.every and done % self.every == 0 and done < self.epochs:
            self.validate(state) if self.val_set is not None else self.test(state)

    def after_train(self, state: Any) -> None:
        if self.val_set is not None and state.best.get("last_val_epoch") != state.epochs_done:
            self.validate(state)
        if state.metrics.get("epoch") != state.epochs_done or not state.metrics:
            self.test(state)

    def _evaluate(self, dataset: Any, out_dir: Optional[Path]) -> Dict[str, Any]:
        t = self.trainer
        return evaluator.evaluate_model(t.model, dataset, self.cfg, out_dir=out_dir, device=t.device,
                                        extra={"epoch": t.state.epochs_done, "step": t.state.step})

    def _evaluate_test(self, out_dir: Optional[Path]) -> Dict[str, Any]:
        """The test split; with ``eval.datasets`` every set named there, in one table (first = primary)."""
        t = self.trainer
        if not self.cfg.eval.datasets:
            return self._evaluate(self.test_set, out_dir)
        return evaluator.evaluate_datasets(t.model, self.cfg, out_dir=out_dir, device=t.device,
                                           extra={"epoch": t.state.epochs_done, "step": t.state.step})

    def test(self, state: Any) -> None:
        t = self.trainer
        if t.dist.is_main:
            m = self._evaluate_test(state.run_dir)
            state.metrics = m
            t.logger.write({"type": "eval", **m})
            t.progress.line(f"eval epoch {state.epochs_done}: rank1 {100 * m.get('rank1', float('nan')):.1f}%  "
                            f"mAP {100 * m.get('mAP', float('nan')):.1f}%  ({m['dataset']}, {m['protocol']})")
            for row in m.get("datasets", [])[1:]:
                t.progress.line(f"  also {row['dataset']}: rank1 {100 * row.get('rank1', float('nan')):.1f}%  "
                                f"mAP {100 * row.get('mAP', float('nan')):.1f}%  ({row['protocol']})")
        t.dist.barrier()

    def validate(self, state: Any) -> None:
        t = self.trainer
        if t.dist.is_main:
            m = self._evaluate(self.val_set, None)
            state.val_metrics = m
            state.best["last_val_epoch"] = state.epochs_done
            t.logger.write({"type": "val", **m})
            t.progress.line(f"validation epoch {state.epochs_done}: rank1 {100 * m['rank1']:.1f}%  "
                            f"mAP {100 * m['mAP']:.1f}%  ({plural(len(self.val_set.query), 'query', 'queries')} of "
                            f"{plural(self.cfg.data.val_ids, 'held-out id')})")
            if m["mAP"] > state.best["mAP"]:
                state.best.update({"mAP": float(m["mAP"]), "epoch": state.epochs_done})
                t.checkpointer.save("best.pth", full=False, metrics={"val": m})
        t.dist.barrier()


class BudgetHook(Hook):
    """``train.max_minutes``: stops the run after the step that spends the budget.

    The budget counts the training loop from its first step, periodic evaluations
    included; the set-up before it (reading the data set, building the model) and the
    final evaluation after it are not counted. It says so when the run starts, and says
    how long that final evaluation took when the run ends.
    """

    def __init__(self, minutes: float):
        self.seconds = minutes * 60.0
        self.t0 = 0.0

    def before_train(self, state: Any) -> None:
        self.t0 = time.perf_counter()
        self.trainer.progress.line(
            f"time budget: {self.seconds / 60:g} min for training and periodic evaluations "
            f"(set-up and the final evaluation come on top)")

    def after_step(self, state: Any) -> None:
        # Under DDP the ranks stop together (one rank's clock decides), or the others would
        # wait in the next step's gradient all-reduce.
        if self.trainer.dist.any(time.perf_counter() - self.t0 > self.seconds):
            state.stop = "budget"

    def after_train(self, state: Any) -> None:
        over = time.perf_counter() - self.t0 - self.seconds
        if state.stop == "budget":
            self.trainer.progress.line(f"time budget of {self.seconds / 60:g} min reached; the final evaluation "
                                       f"and checkpoint took {max(over, 0.0):.0f} s beyond it")


class LoggingHook(Hook):
    """log.jsonl and the console.

    - ``before_train``: the ``precision:`` line and a ``run`` record (precision, device,
      data sizes, steps per epoch);
    - ``after_step``: a ``train`` record every ``train.log_every`` steps (means over those
      steps); in a terminal, the progress bar; otherwise (piped, CI) a plain line at the
      run's first step, then every ``train.print_every`` steps or 30 s, whichever comes
      first, with img/s and an ETA (torchreid's ``print_freq``);
    - ``after_epoch``: the epoch line, with the epoch's mean loss;
    - ``after_train``: the record of a half-done epoch's last steps.

    ``epochs`` is ``train.epochs`` (for the epoch counter and the ETA).
    """

    PLAIN_EVERY_S = 30.0

    def __init__(self, run_info: Dict[str, Any], epochs: int, log_every: int = 20, print_every: int = 50):
        self.run_info, self.epochs, self.log_every, self.print_every = run_info, epochs, log_every, print_every
        self.window = self._empty()
        self.total = {"images": 0, "step_s": 0.0, "data_s": 0.0}
        self.last_plain = 0.0
        self.steps_this_run = 0

    @staticmethod
    def _empty() -> Dict[str, Any]:
        return {"n": 0, "images": 0, "step_s": 0.0, "data_s": 0.0, "loss": 0.0, "terms": {}}

    def img_per_s(self) -> float:
        return self.total["images"] / max(self.total["step_s"], 1e-9)

    def data_wait(self) -> float:
        return self.total["data_s"] / max(self.total["step_s"], 1e-9)

    def before_train(self, state: Any) -> None:
        t = self.trainer
        t.progress.line(f"precision: {t.precision.describe()}")
        t.logger.write({"type": "run", "epoch": state.epochs_done, "step": state.step,
                        "precision": t.precision.name, "precision_reason": t.precision.reason,
                        "device": str(t.device), "steps_per_epoch": t.steps_per_epoch, **self.run_info})
        self.last_plain = time.perf_counter()

    def before_epoch(self, state: Any) -> None:
        self.trainer.progress.start_epoch(state.epoch, state.lr)

    def after_step(self, state: Any) -> None:
        w = self.window
        w["n"] += 1
        w["images"] += state.images
        w["step_s"] += state.step_time
        w["data_s"] += state.data_time
        w["loss"] += state.loss
        for k, v in state.terms.items():
            w["terms"][k] = w["terms"].get(k, 0.0) + v
        self.total["images"] += state.images
        self.total["step_s"] += state.step_time
        self.total["data_s"] += state.data_time
        self.steps_this_run += 1
        progress = self.trainer.progress
        progress.update(f"loss {state.loss:.3f}  {state.images / max(state.step_time, 1e-9):.1f} img/s")
        if state.step % self.log_every == 0:
            self._write_window(state)
        now = time.perf_counter()
        if progress.plain and (self.steps_this_run == 1 or state.step % self.print_every == 0
                               or now - self.last_plain >= self.PLAIN_EVERY_S):
            self.last_plain = now
            progress.line(self._plain_line(state))

    def _plain_line(self, state: Any) -> str:
        t = self.trainer
        spe = t.steps_per_epoch
        left = (self.epochs - state.epoch - 1) * spe + max(spe - state.epoch_steps, 0) if spe else 0
        s_per_step = self.total["step_s"] / max(self.steps_this_run, 1)
        of = f"/{spe}" if spe else ""
        eta = f"  eta {_clock(left * s_per_step)}" if spe else ""
        return (f"epoch {state.epoch + 1}/{self.epochs}  step {state.epoch_steps}{of}  "
                f"loss {state.loss:.4f} (epoch mean {state.epoch_loss:.4f})  lr {state.lr:.2e}  "
                f"{self.img_per_s():.1f} img/s{eta}")

    def after_epoch(self, state: Any) -> None:
        self._write_window(state)
        self.trainer.progress.line(
            f"epoch {state.epochs_done}/{self.epochs}  lr {state.lr:.2e}  "
            f"loss {state.epoch_loss:.4f} (mean of {plural(state.epoch_steps, 'step')})  {self.img_per_s():.1f} img/s")

    def after_train(self, state: Any) -> None:
        self._write_window(state)

    def _write_window(self, state: Any) -> None:
        """One ``train`` record, the means over the steps since the last one."""
        w = self.window
        n = w["n"]
        if not n:
            return
        record = {"type": "train", "epoch": state.epoch + 1, "step": state.step, "lr": state.lr,
                  "loss": w["loss"] / n}
        record.update({k: v / n for k, v in w["terms"].items()})
        record["img_per_s"] = w["images"] / max(w["step_s"], 1e-9)
        record["data_wait"] = w["data_s"] / max(w["step_s"], 1e-9)
        self.trainer.logger.write(record)
        self.window = self._empty()


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class DiagnosticsHook(Hook):
    """MHSA-Net's per-epoch diagnostics (engine/diagnostics.py) as one ``diagnostics`` record of log.jsonl."""

    def __init__(self, acm_gamma: float, fdrt_form: str = "paper"):
        self.acm_gamma, self.fdrt_form = acm_gamma, fdrt_form
        self.meter = DiagnosticsMeter()
        self.last: Dict[str, Any] = {}

    def before_epoch(self, state: Any) -> None:
        self.meter.reset()

    def after_step(self, state: Any) -> None:
        if not self.trainer.dist.is_main:
            return  # only rank 0 logs them
        outputs = state.outputs
        if isinstance(outputs, dict) and "alpha" in outputs:
            self.meter.add(batch_diagnostics(outputs, self.acm_gamma, self.fdrt_form), int(outputs["alpha"].shape[0]))

    def after_epoch(self, state: Any) -> None:
        means = self.meter.means()
        if means:
            self.last = {"epoch": state.epochs_done, **means}
            self.trainer.logger.write({"type": "diagnostics", "epoch": state.epochs_done, "step": state.step,
                                       **means})


class RunLogger:
    """Appends JSON lines to ``RUN/log.jsonl`` and mirrors scalars to TensorBoard if installed."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = run_dir / "log.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:  # deferred: the optional tensorboard package
                from torch.utils.tensorboard import SummaryWriter
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
    """A rich progress bar on a terminal; plain lines otherwise (logs, CI, tests): ``plain`` is True then."""

    def __init__(self, enabled: bool, total_epochs: int, steps_per_epoch: int, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.total_epochs = total_epochs
        self.steps_per_epoch = steps_per_epoch
        self.bar = None
        self.task = None
        if enabled and getattr(self.stream, "isatty", lambda: False)():  # rich's bar: only on a terminal
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

            self.bar = RichProgress(TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(),
                                    MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
                                    console=Console(file=self.stream), transient=False)
            self.bar.start()

    @property
    def plain(self) -> bool:
        return self.enabled and self.bar is None

    def start_epoch(self, epoch: int, lr: float) -> None:
        if self.bar is not None:
            if self.task is not None:
                self.bar.remove_task(self.task)
            self.task = self.bar.add_task("train", total=self.steps_per_epoch or None,
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
