"""`attnreid robustness`: how a trained model degrades when its queries are occluded."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from attnreid.cli._app import app
from attnreid.cli._util import check_output_path, print_json
from attnreid.config import load_config
from attnreid.errors import AttnReidError


def _default_out(checkpoint: str) -> Path:
    ckpt = Path(checkpoint)
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return run / "robustness"


@app.command("robustness")
def robustness(
    config: Path = typer.Argument(..., help="YAML config: evaluation set, loader and eval settings."),
    overrides: Optional[List[str]] = typer.Argument(None, help="KEY=VALUE overrides, e.g. train.device=cpu."),
    checkpoint: List[str] = typer.Option(
        [], "--checkpoint", "-c",
        help="checkpoint(s) to compare: --checkpoint A.pth B.pth (or the option repeated).",
    ),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="registered dataset name (default: the config's)."),
    root: Optional[str] = typer.Option(None, "--root", help="data root of --dataset (default: the config's)."),
    levels: str = typer.Option("0,10,20,30,40,50", "--levels", help="occluded share of each query image, per cent."),
    kinds: str = typer.Option("block,person,erasing", "--kinds", help="occluder kinds: block, person, erasing."),
    positions: str = typer.Option("top,bottom,side", "--positions", help="occluder positions: top, bottom, side."),
    seed: int = typer.Option(0, "--seed", help="seed of the occluders (per image: seed + query index)."),
    out: Optional[Path] = typer.Option(None, "--out", help="output folder (default: RUN/robustness of the first checkpoint)."),
    as_json: bool = typer.Option(False, "--json", help="print the report as one JSON object."),
) -> None:
    """Re-evaluate model(s) with synthetically occluded queries at controlled levels.

    The image size and normalisation come from each checkpoint (what the model was
    trained with); the evaluation set, loader and eval settings from CONFIG and the
    KEY=VALUE overrides. Writes robustness.json and robustness.png to --out.
    """
    from dataclasses import replace

    from attnreid.robustness.occlusion import OCCLUDER_KINDS, POSITIONS  # torch: imported when the command runs, not for --help
    from attnreid.robustness.report import parse_levels, parse_names, report_tables, run_robustness, write_report

    # Click gives an option one value: the further paths of `--checkpoint A B` land among the overrides.
    extra = list(overrides or [])
    checkpoints = list(checkpoint) + [a for a in extra if "=" not in a]
    overrides = [a for a in extra if "=" in a]
    if not checkpoints:
        raise AttnReidError("robustness: give at least one checkpoint with --checkpoint PATH")
    for ckpt in checkpoints:
        if not Path(ckpt).is_file():
            raise AttnReidError(f"checkpoint not found: {ckpt}")
    out_dir = check_output_path(out or _default_out(checkpoints[0]), "dir")
    level_list = parse_levels(levels)
    kind_list = parse_names(kinds, OCCLUDER_KINDS, "--kinds")
    position_list = parse_names(positions, POSITIONS, "--positions")

    cfg = load_config(config, overrides)
    if dataset or root:
        from attnreid.engine.build import eval_data_config  # torch: imported when the command runs, not for --help

        # The evaluation set was data.* or eval.*; the command line replaces whichever was in force.
        current = eval_data_config(cfg)
        cfg = replace(
            cfg,
            data=replace(current, dataset=dataset or current.dataset, root=str(root or current.root)),
            eval=replace(cfg.eval, dataset="", root=""),
        )

    log = None if as_json else (lambda line: print(line, file=sys.stderr, flush=True))
    report = run_robustness(cfg, checkpoints, level_list, kind_list, position_list, seed=seed, log=log)
    json_path, png_path = write_report(report, out_dir)
    report["files"] = {"json": str(json_path), "plot": str(png_path)}
    if as_json:
        print_json(report)
        return
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        # Piped or redirected: rich would fold the tables into 80 columns.
        console = Console(width=200)
    for table in report_tables(report):
        console.print(table)
    console.print(f"wrote {json_path} and {png_path}")
