"""`attnreid train`: a thin shell over :mod:`attnreid.engine.trainer` (eval, extract, demo: cli/evaluate.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from attnreid.cli._app import app
from attnreid.cli._util import print_json
from attnreid.config import load_config
from attnreid.errors import AttnReidError
from attnreid.text import plural


def default_run_dir(config: Path) -> Path:
    """``runs/<family>_<row>`` for ``configs/<family>/<row>.yaml``, else ``runs/<row>``."""
    parent = config.resolve().parent.name
    stem = config.stem
    return Path("runs") / (f"{parent}_{stem}" if parent and parent != "configs" else stem)


@app.command("train")
def train_cmd(
    config: Optional[Path] = typer.Argument(
        None, help="YAML config, e.g. configs/mhsanet/market1501.yaml; optional with --resume."),
    overrides: Optional[List[str]] = typer.Argument(None, help="KEY=VALUE overrides, e.g. train.epochs=10."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default runs/<family>_<row>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from checkpoints/last.pth, "
                                                          "with the run's own config.yaml (+ any KEY=VALUE)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run already in --out."),
) -> None:
    """Train a model: writes config.yaml, log.jsonl, checkpoints/last.pth (+ best.pth with data.val_ids) and eval.json."""
    from attnreid.distributed import is_main_process  # torch: imported when the command runs, not for --help
    from attnreid.engine.trainer import run_config, train

    args = list(overrides or [])
    if config is not None and "=" in str(config) and not config.exists():
        args.insert(0, str(config))  # `attnreid train --resume --out RUN train.epochs=600`: no config file
        config = None
    if resume and config is not None and config.is_dir() and out in (None, config):
        out, config = config, None  # `attnreid train --resume RUN`: the run folder where --out was expected
    if config is None and not (resume and out is not None):
        raise AttnReidError("attnreid train needs a CONFIG file, or --resume --out RUN to continue a run")
    _check_train_config(config, resume)
    run_dir = out or default_run_dir(config)
    speak = is_main_process()  # under torchrun only rank 0 prints; every rank exits with the status
    created = [] if resume else _missing_folders(run_dir)
    try:
        if resume:
            cfg, ignored = run_config(run_dir, args, config)
            if ignored and speak:
                print(f"note: resuming with {run_dir / 'config.yaml'}; {config} sets {', '.join(ignored[:4])}"
                      f"{' ...' if len(ignored) > 4 else ''} differently and is not applied "
                      f"(pass KEY=VALUE to change a key)", file=sys.stderr)
        else:
            cfg = load_config(config, args)
        result = train(cfg, run_dir, resume=resume, overwrite=overwrite)
    except KeyboardInterrupt as exc:  # while reading the data or building the model: nothing new to save
        from attnreid.safe_io import Terminated

        _remove_empty(created)
        last = run_dir / "checkpoints" / "last.pth"
        hint = f"continue with: {resume_command(run_dir)}" if last.is_file() else "nothing was saved"
        sigterm = isinstance(exc, Terminated)
        if speak:
            print(f"{'terminated (SIGTERM)' if sigterm else 'interrupted'}; {hint}", file=sys.stderr)
        raise typer.Exit(143 if sigterm else 130)
    except BaseException:
        _remove_empty(created)  # a run that failed before writing anything leaves no folder behind
        raise
    if result["status"] == "interrupted":
        sigterm = result.get("signal") == "SIGTERM"
        if speak:
            print(f"{'terminated (SIGTERM)' if sigterm else 'interrupted'}: saved {result['checkpoint']} after "
                  f"{plural(result['epoch'], 'epoch')} ({plural(result['step'], 'step')}); continue with: "
                  f"{resume_command(run_dir)}", file=sys.stderr)
        raise typer.Exit(143 if sigterm else 130)
    if speak:
        print(f"{result['status']}: {plural(result['epoch'], 'epoch')}, {plural(result['step'], 'step')} in "
              f"{result['train_seconds']:.0f} s "
              f"({result['img_per_s']:.1f} img/s, {100 * result['data_wait']:.0f}% waiting for data); "
              f"{_metrics_line(result)} (last weights, {result.get('dataset', 'test')} test split); "
              f"run folder {run_dir}")


def _missing_folders(path: Path) -> List[Path]:
    """``path`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    for p in [path, *path.parents]:
        if p.exists():
            break
        missing.append(p)
    return missing


def _remove_empty(folders: List[Path]) -> None:
    """Remove the folders this command created if they are still empty (never anything with a file in it)."""
    from attnreid.safe_io import remove_empty_folder

    for p in folders:
        if not remove_empty_folder(p):
            return


def _check_train_config(config: Optional[Path], resume: bool) -> None:
    """A run folder or checkpoint where train wants a config: say what to do instead."""
    if config is None or resume:
        return
    if config.is_dir():
        raise AttnReidError(f"{config} is a folder; train starts from a .yaml config (to continue the run in it: "
                            f"{resume_command(config)})")
    if config.is_file() and config.suffix.lower() not in (".yaml", ".yml"):
        raise AttnReidError(f"{config} is not a .yaml config; train starts from a config (a checkpoint's run "
                            "continues with: attnreid train --resume --out RUN)")


def resume_command(run_dir: Path) -> str:
    """The command that continues the run in ``run_dir`` (its config.yaml keeps every override)."""
    import shlex

    return f"attnreid train --resume --out {shlex.quote(str(run_dir))}"


def _metrics_line(m: dict) -> str:
    from attnreid.evaluation.stats import level_text, metric_text  # torch: imported when the command runs, not for --help

    if m.get("protocol") == "partial":
        keys = [("rank1", "R1"), ("rank3", "R3")]
    else:
        keys = [("rank1", "R1"), ("rank5", "R5"), ("rank10", "R10"), ("mAP", "mAP"), ("mINP", "mINP")]
    line = "  ".join(f"{label} {metric_text(m, k)}%" for k, label in keys if isinstance(m.get(k), (int, float)))
    return f"{line} ({level_text(m)})" if level_text(m) else line
