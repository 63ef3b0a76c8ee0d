"""`attnreid calibrate`: a distance threshold for "same person or unknown?"."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from attnreid.cli._app import app
from attnreid.cli._util import check_output_path, print_json


@app.command("calibrate")
def calibrate_cmd(
    config: Path = typer.Argument(..., help="YAML config of the model and its data (data.val_ids as in training)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="KEY=VALUE overrides."),
    checkpoint: Path = typer.Option(..., "--checkpoint", help="A .pth written by attnreid train."),
    dataset: Optional[str] = typer.Option(
        None, "--dataset", help="Calibrate on this set's query and gallery instead of the validation split "
        "(e.g. folder, list, market1501)."),
    root: Optional[Path] = typer.Option(None, "--root", help="Root of --dataset (default: data.root)."),
    fpr: Optional[List[float]] = typer.Option(
        None, "--fpr", help="Target false-positive rate(s) to add to 1e-2, 1e-3 and 1e-4; repeat for several."),
    metric: Optional[str] = typer.Option(
        None, "--metric", help="euclidean_sq or cosine (default: the model's, as the index uses; cosine for a "
        "tracker that compares cosine distances)."),
    resamples: int = typer.Option(1000, "--resamples", help="Bootstrap resamples of the identities."),
    level: float = typer.Option(0.95, "--level", help="Interval level."),
    out: Optional[Path] = typer.Option(
        None, "--out", help="Calibration file (default: calibration.json beside the checkpoint); a PNG of the "
        "ROC and DET curves goes beside it."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a calibration of other weights at --out."),
    as_json: bool = typer.Option(False, "--json", help="Print the calibration as one JSON object."),
) -> None:
    """Measure positive pairs (same identity, other camera) against negative pairs on identities the
    model was not trained on: ROC, TPR at FPR 1e-2/1e-3/1e-4, EER and a threshold per target FPR, with
    intervals from a bootstrap over identities. Writes calibration.json (and a ROC/DET plot) beside the
    checkpoint; 'index build' carries it into an index for 'search --fpr'."""
    from attnreid.config import load_config
    from attnreid.deploy.calibration import calibrate_checkpoint, default_path, summary_lines
    from attnreid.engine.build import resolve_device
    from attnreid.errors import AttnReidError
    from attnreid.viz.plots import plot_calibration

    if resamples < 1:
        raise AttnReidError(f"--resamples is {resamples}; it must be >= 1")
    if not 0 < level < 1:
        raise AttnReidError(f"--level is {level}; it must be between 0 and 1")
    for a in fpr or []:
        if not 0 < a < 1:
            raise AttnReidError(f"--fpr {a} must be between 0 and 1")
    target = out or default_path(checkpoint)
    check_output_path(target, "file", suffix=".json")
    cfg = load_config(config, list(overrides or []))
    result = calibrate_checkpoint(checkpoint, cfg, dataset=dataset, root=None if root is None else str(root),
                                  targets=list(fpr or []), resamples=resamples, level=level,
                                  metric=metric, device=resolve_device(cfg.train.device), progress=not as_json,
                                  out=target, overwrite=overwrite)
    png = plot_calibration(result, target.with_suffix(".png"))
    if as_json:
        print_json({**result, "file": str(target), "plot": str(png)})
        return
    print("\n".join(summary_lines(result)))
    print(f"wrote {target} and {png}")


__all__ = ["calibrate_cmd"]
