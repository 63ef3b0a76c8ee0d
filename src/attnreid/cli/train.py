"""`attnreid train`: a thin shell over :mod:`attnreid.engine.trainer` (eval, extract, demo: cli/evaluate.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from attnreid.cli._app import app
from attnreid.cli._util import print_json
from attnreid.errors import AttnReidError


def default_run_dir(config: Path) -> Path:
    """``runs/<family>_<row>`` for ``configs/<family>/<row>.yaml``, else ``runs/<row>``."""
    parent = config.resolve().parent.name
    stem = config.stem
    return Path("runs") / (f"{parent}_{stem}" if parent and parent != "configs" else stem)


@app.command("train")
def train_cmd(
    config: Path = typer.Argument(..., help="YAML config, e.g. configs/mhsanet/market1501.yaml."),
    overrides: Optional[List[str]] = typer.Argument(None, help="KEY=VALUE overrides, e.g. train.epochs=10."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default runs/<family>_<row>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from checkpoints/last.pth."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run already in --out."),
) -> None:
    """Train a model: writes config.yaml, log.jsonl, checkpoints/{last,best}.pth and eval.json."""
    from attnreid.config import load_config
    from attnreid.engine.trainer import train

    cfg = load_config(config, list(overrides or []))
    run_dir = out or default_run_dir(config)
    result = train(cfg, run_dir, resume=resume, overwrite=overwrite)
    if result["status"] == "interrupted":
        print(f"interrupted: saved {result['checkpoint']} after {result['epoch']} epochs ({result['step']} steps); "
              f"continue with: attnreid train {config} --out {run_dir} --resume", file=sys.stderr)
        raise typer.Exit(130)
    print(f"{result['status']}: {result['epoch']} epochs, {result['step']} steps in {result['train_seconds']:.0f} s "
          f"({result['img_per_s']:.1f} img/s, {100 * result['data_wait']:.0f}% waiting for data); "
          f"{_metrics_line(result)}; run folder {run_dir}")


def _metrics_line(m: dict) -> str:
    if m.get("protocol") == "partial":
        keys = [("rank1", "R1"), ("rank3", "R3")]
    else:
        keys = [("rank1", "R1"), ("rank5", "R5"), ("rank10", "R10"), ("mAP", "mAP")]
    return "  ".join(f"{label} {100 * m[k]:.1f}%" for k, label in keys if isinstance(m.get(k), (int, float)))
