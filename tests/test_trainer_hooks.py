"""The loop and its hooks: a custom hook changes the run without touching the loop; what the hooks
print and save (epoch mean loss, piped progress lines, the budget, weights-only best.pth); Ctrl-C
anywhere, and the resume hint it prints, end to end."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import threading
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from attnreid.engine.checkpoint import load_checkpoint
from attnreid.engine.hooks import Hook, LoggingHook
from helpers import run_cli
from test_engine import tiny_cfg


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


class EarlyStop(Hook):
    """Stops once the epoch's mean loss has not improved for ``patience`` epochs; records every call."""

    def __init__(self, patience=1, min_delta=1e9):
        self.patience, self.min_delta = patience, min_delta
        self.best, self.bad, self.calls = float("inf"), 0, []

    def before_train(self, state):
        self.calls.append("before_train")

    def before_epoch(self, state):
        self.calls.append("before_epoch")

    def after_step(self, state):
        self.calls.append("after_step")

    def after_epoch(self, state):
        self.calls.append("after_epoch")
        if state.epoch_loss < self.best - self.min_delta:  # min_delta 1e9: only the first epoch "improves"
            self.best, self.bad = state.epoch_loss, 0
        else:
            self.bad += 1
            if self.bad >= self.patience:
                state.stop = "early_stop"

    def after_train(self, state):
        self.calls.append("after_train")


def test_a_custom_hook_stops_the_run_without_touching_the_loop(synthetic_root, tmp_path):
    from attnreid.engine.trainer import train

    hook = EarlyStop(patience=1)
    result = train(tiny_cfg(synthetic_root, "train.epochs=5"), tmp_path / "r", hooks=[hook], quiet=True)
    assert result["status"] == "early_stop" and result["epoch"] == 2 and result["step"] == 4
    epoch = ["before_epoch", "after_step", "after_step", "after_epoch"]
    assert hook.calls == ["before_train", *epoch, *epoch, "after_train"]
    assert load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pth")["epoch"] == 2  # the stop was checkpointed
    assert json.loads((tmp_path / "r" / "eval.json").read_text())["epoch"] == 2  # and evaluated


def test_epoch_line_shows_the_epoch_mean_loss_and_piped_runs_print_progress_lines(synthetic_root, tmp_path, capsys,
                                                                                  monkeypatch):
    from attnreid.engine.trainer import train

    monkeypatch.setattr(LoggingHook, "PLAIN_EVERY_S", 1e9)
    train(tiny_cfg(synthetic_root, "train.max_steps_per_epoch=3", "train.print_every=2"), tmp_path / "r")
    out = capsys.readouterr().out.splitlines()
    steps = [r for r in _log(tmp_path / "r") if r["type"] == "train"]  # log_every=1: one record per step
    epoch_lines = [l for l in out if re.match(r"epoch \d/2  lr", l)]
    assert len(epoch_lines) == 2
    for e, line in enumerate(epoch_lines, start=1):
        mean = sum(r["loss"] for r in steps if r["epoch"] == e) / 3
        shown = float(re.search(r"loss (\S+) \(mean of 3 steps\)", line).group(1))
        assert shown == pytest.approx(mean, abs=1e-4)
        assert shown != pytest.approx([r for r in steps if r["epoch"] == e][-1]["loss"], abs=1e-4)
    plain = [l for l in out if re.match(r"epoch \d/2  step \d/3 ", l)]
    # the run's first step, then every 2nd global step (2, 4, 6)
    assert [l.split("  ")[1] for l in plain] == ["step 1/3", "step 2/3", "step 1/3", "step 3/3"]
    assert all("img/s" in l and "eta 0:" in l for l in plain)
    assert out.index(plain[0]) < out.index(epoch_lines[0])  # the first line comes within the first epoch


def test_piped_progress_also_prints_every_30_seconds(synthetic_root, tmp_path, capsys, monkeypatch):
    from attnreid.engine.trainer import train

    monkeypatch.setattr(LoggingHook, "PLAIN_EVERY_S", 0.0)
    train(tiny_cfg(synthetic_root, "train.print_every=1000"), tmp_path / "r")
    plain = [l for l in capsys.readouterr().out.splitlines() if re.match(r"epoch \d/2  step", l)]
    assert len(plain) == 4  # every step once the interval has passed


def test_budget_says_what_it_counts(synthetic_root, tmp_path, capsys):
    from attnreid.engine.trainer import train

    result = train(tiny_cfg(synthetic_root, "train.epochs=50", "train.max_minutes=0.0001"), tmp_path / "r")
    out = capsys.readouterr().out
    assert result["status"] == "budget"
    last = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pth")
    assert last["epoch"] == result["epoch"] and last["step"] == 2 * result["epoch"]  # a resume redoes the cut epoch
    assert "time budget: 0.0001 min for training and periodic evaluations (set-up and the final evaluation" in out
    assert re.search(r"time budget of 0.0001 min reached; the final evaluation and checkpoint took \d+ s beyond it",
                     out)


def test_only_last_pth_holds_the_resume_state(synthetic_root, tmp_path):
    from attnreid.engine.trainer import train

    run = tmp_path / "r"
    train(tiny_cfg(synthetic_root, "data.val_ids=2", "data.batch_size=4", "train.epochs=1"), run, quiet=True)
    last, best = (load_checkpoint(run / "checkpoints" / n) for n in ("last.pth", "best.pth"))
    resume_keys = {"optimizer", "scheduler", "rng"}
    assert resume_keys <= set(last) and not resume_keys & set(best)
    assert {"model", "config", "num_classes", "epoch", "metrics"} <= set(best) and "val" in best["metrics"]
    assert (run / "checkpoints" / "best.pth").stat().st_size < (run / "checkpoints" / "last.pth").stat().st_size


def test_ctrl_c_during_the_final_evaluation_keeps_last_pth(synthetic_root, tmp_path, monkeypatch):
    import attnreid.engine.evaluator as evaluator

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluator, "evaluate_model", interrupted)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"dataset": "market1501", "root": str(synthetic_root), "height": 64,
                                               "width": 32, "batch_size": 8, "num_instances": 2, "workers": 0},
                                      "model": {"name": "baseline", "backbone": {"name": "mobilenetv3_small"}},
                                      "train": {"epochs": 1, "max_steps_per_epoch": 2, "eval_every": 0,
                                                "device": "cpu", "threads": 1}}))
    run = tmp_path / "r"
    code, _, err = run_cli(["train", config, "--out", run])
    lines = err.strip().splitlines()
    assert code == 130 and len(lines) == 1 and "Traceback" not in err, err
    assert f"continue with: attnreid train --resume --out {run}" in lines[0]
    assert load_checkpoint(run / "checkpoints" / "last.pth")["epoch"] == 1


def test_resume_reads_the_runs_own_config(synthetic_root, tmp_path):
    """The overrides the run started with (data.root here) are kept; a config file given anyway is noted."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"dataset": "market1501", "height": 64, "width": 32,
                                               "batch_size": 8, "num_instances": 2, "workers": 0},
                                      "model": {"name": "baseline", "backbone": {"name": "mobilenetv3_small"}},
                                      "train": {"epochs": 1, "max_steps_per_epoch": 1, "eval_every": 0,
                                                "device": "cpu", "threads": 1}}))
    run = tmp_path / "r"
    code, _, err = run_cli(["train", config, f"data.root={synthetic_root}", "--out", run])
    assert code == 0, err
    code, out, err = run_cli(["train", "--resume", "--out", run, "train.epochs=2"])
    assert code == 0 and "completed: 2 epochs, 2 steps" in out, err
    code, out, err = run_cli(["train", config, "--resume", "--out", run, "train.epochs=3"])
    assert code == 0 and "completed: 3 epochs" in out, err
    assert "note: resuming with" in err and "data.root" in err  # the file's data.root was not applied
    code, _, err = run_cli(["train", "--out", run])
    assert code == 2 and "needs a CONFIG file" in err


def test_loader_workers_leave_ctrl_c_to_the_main_process(synthetic_root):
    from attnreid.data.datasets import build_dataset
    from attnreid.data.loader import build_test_loader, build_train_loader, ignore_sigint

    cfg = tiny_cfg(synthetic_root, "data.workers=1")
    ds = build_dataset("market1501", str(synthetic_root))
    assert build_train_loader(cfg.data, ds, seed=0).worker_init_fn is ignore_sigint
    assert build_test_loader(cfg.data, ds.query).worker_init_fn is ignore_sigint
    previous, previous_hook = signal.getsignal(signal.SIGINT), threading.excepthook
    try:
        ignore_sigint(0)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        # a worker's resource-sharer thread whose reader (the main process) went away stays
        # quiet; any other error of a worker's thread is reported as before
        reported = []

        def run(exc):
            def target():
                raise exc
            threading.__excepthook__, saved = (lambda args: reported.append(args.exc_type)), threading.__excepthook__
            try:
                t = threading.Thread(target=target)
                t.start()
                t.join()
            finally:
                threading.__excepthook__ = saved

        run(ConnectionResetError(104, "Connection reset by peer"))
        run(BrokenPipeError(32, "Broken pipe"))
        assert reported == []
        run(ValueError("a real error"))
        assert reported == [ValueError]
    finally:
        signal.signal(signal.SIGINT, previous)
        threading.excepthook = previous_hook


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def test_sigint_then_the_printed_resume_hint_completes_the_run(synthetic_root, tmp_path):
    """A terminal's Ctrl-C (SIGINT to the whole process group, DataLoader workers included)."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"data": {"dataset": "market1501", "height": 64, "width": 32,
                                               "batch_size": 8, "num_instances": 2, "workers": 1},
                                      "model": {"name": "baseline", "backbone": {"name": "mobilenetv3_small"}},
                                      "train": {"epochs": 3, "max_steps_per_epoch": 40, "eval_every": 0,
                                                "log_every": 1, "device": "cpu", "threads": 1, "amp": "off"}}))
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "attnreid", "train", str(config), f"data.root={synthetic_root}", "--out", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=tmp_path,
                            start_new_session=True, text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if (run / "log.jsonl").is_file() and sum(r["type"] == "train" for r in _log(run)) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "training ended before it could be interrupted"
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    lines = err.strip().splitlines()
    assert proc.returncode == 130 and len(lines) == 1 and "Traceback" not in err, err
    assert (run / "checkpoints" / "last.pth").is_file()
    hint = lines[0].split("continue with: ", 1)[1]
    assert hint == f"attnreid train --resume --out {shlex.quote(str(run))}"
    args = shlex.split(hint)[1:] + ["train.max_steps_per_epoch=2"]  # finish quickly
    code, out, err = run_cli(args)
    assert code == 0 and "completed: 3 epochs" in out, err
