"""Interrupts: Ctrl-C (once or twice) during a checkpoint write, and SIGTERM, leave a resumable run and a hint.

Each interrupted run is a subprocess: a signal that escaped into pytest would end the session.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import run_cli
from rel_helpers import subprocess_env, write_config

pytestmark = pytest.mark.usefixtures("one_thread_module")

# torch.save as the checkpoint writer calls it, with Ctrl-C pressed twice as it starts writing
_CTRL_C_DURING_SAVE = """
import os, signal, sys, torch
real = torch.save
def save(obj, f, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)
    os.kill(os.getpid(), signal.SIGINT)
    return real(obj, f, *args, **kwargs)
torch.save = save
from attnreid.cli import main
main(sys.argv[1:])
"""


def _stderr_lines(text: str) -> list:
    return [line for line in text.strip().splitlines() if line.strip()]


def test_ctrl_c_twice_while_last_pth_is_written_finishes_the_write_and_prints_the_hint(tiny, tmp_path):
    from attnreid.engine.checkpoint import load_checkpoint

    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny["root"], train={"epochs": 2})
    proc = subprocess.run([sys.executable, "-c", _CTRL_C_DURING_SAVE, "train", str(cfg), "--out", str(run)],
                          capture_output=True, text=True, env=subprocess_env(), timeout=300)
    lines = _stderr_lines(proc.stderr)
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"interrupted: saved {run / 'checkpoints' / 'last.pth'} after 1 epoch (")
    assert lines[0].endswith(f"continue with: attnreid train --resume --out {run}")
    state = load_checkpoint(run / "checkpoints" / "last.pth")  # the write that Ctrl-C hit completed
    assert state["epoch"] == 1 and "optimizer" in state
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pth"], "a temporary file was left"
    code, _, err = run_cli(["train", "--resume", "--out", run])
    assert code == 0, err
    assert load_checkpoint(run / "checkpoints" / "last.pth")["epoch"] == 2


def _log(run: Path) -> list:
    path = run / "log.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written as we read
            pass
    return out


def test_sigterm_acts_like_ctrl_c(tiny, tmp_path):
    from attnreid.engine.checkpoint import load_checkpoint

    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny["root"], train={"epochs": 200, "max_steps_per_epoch": 3})
    proc = subprocess.Popen([sys.executable, "-m", "attnreid", "train", str(cfg), "--out", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if any(r.get("type") == "train" and r.get("epoch", 0) >= 2 for r in _log(run)):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "training ended before it could be stopped: " + proc.stderr.read()
        proc.send_signal(signal.SIGTERM)  # what kill, a scheduler or a container sends
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    lines = _stderr_lines(err)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("terminated (SIGTERM): saved") and "continue with: attnreid train --resume" in lines[0]
    saved = load_checkpoint(run / "checkpoints" / "last.pth")
    assert [r for r in _log(run) if r.get("type") == "interrupted"][-1]["signal"] == "SIGTERM"
    code, _, err = run_cli(["train", "--resume", "--out", run, f"train.epochs={saved['epoch'] + 1}"])
    assert code == 0, err
    assert load_checkpoint(run / "checkpoints" / "last.pth")["epoch"] == saved["epoch"] + 1
