"""`attnreid robustness`: how a trained model degrades when its queries are occluded."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from attnreid.cli._app import app
from attnreid.cli._util import check_output_path, interrupted, print_json, resolve_model
from attnreid.config import load_config
from attnreid.errors import AttnReidError


def _default_out(checkpoint: str) -> Path:
    ckpt = Path(checkpoint)
    run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return run / "robustness"


@app.command("robustness")
def robustness(
    models: Optional[List[str]] = typer.Argument(
        None, help="The models to compare: run folders or checkpoints, then KEY=VALUE overrides. A .yaml config "
        "among them names the evaluation set (default: the first model's config).", show_default=False),
    checkpoint: List[str] = typer.Option(
        [], "--checkpoint", "-c",
        help="more models (run folders or checkpoints): --checkpoint A.pth B.pth (or the option repeated).",
    ),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="registered dataset name (default: the config's)."),
    root: Optional[str] = typer.Option(None, "--root", help="data root of --dataset (default: the config's)."),
    levels: str = typer.Option("0,0.1,0.2,0.3,0.4,0.5", "--levels",
                               help="occluded share of each query image: fractions (0.1) or per cent with a % sign "
                               "(10%)."),
    kinds: str = typer.Option("block,person,erasing", "--kinds", help="occluder kinds: block, person, erasing."),
    positions: str = typer.Option("top,bottom,side", "--positions", help="occluder positions: top, bottom, side."),
    seed: int = typer.Option(0, "--seed", help="seed of the occluders (per image: seed + query index)."),
    out: Optional[Path] = typer.Option(None, "--out", help="output folder (default: RUN/robustness of the first model)."),
    as_json: bool = typer.Option(False, "--json", help="print the report as one JSON object."),
) -> None:
    """Re-evaluate model(s) with synthetically occluded queries at controlled levels.

    The image size and normalisation come from each checkpoint (what the model was
    trained with); the evaluation set, loader and eval settings from the config (a .yaml
    given, else the first model's) and the KEY=VALUE overrides. Writes robustness.json
    and robustness.png to --out.
    """
    from dataclasses import replace

    from attnreid.engine.model_source import CONFIG_SUFFIXES, split_models_and_overrides
    from attnreid.robustness.occlusion import OCCLUDER_KINDS, POSITIONS  # torch: imported when the command runs, not for --help
    from attnreid.robustness.report import parse_levels, parse_names, report_tables, run_robustness, write_report

    # Click gives an option one value: the further paths of `--checkpoint A B` land among the positionals.
    named, overrides = split_models_and_overrides(models or [])
    configs = [m for m in named if Path(m).suffix.lower() in CONFIG_SUFFIXES]
    if len(configs) > 1:
        raise AttnReidError(f"robustness takes one config for the evaluation set, got {len(configs)}: "
                            f"{', '.join(configs)}")
    model_args = list(checkpoint) + [m for m in named if m not in configs]
    if not model_args:
        raise AttnReidError("robustness: give at least one model, a run folder or a checkpoint (or --checkpoint PATH)")
    level_list = parse_levels(levels)
    kind_list = parse_names(kinds, OCCLUDER_KINDS, "--kinds")
    position_list = parse_names(positions, POSITIONS, "--positions")
    # the first model's config is the evaluation set's unless a config was given
    sources = [resolve_model(m, [] if configs or i else overrides) for i, m in enumerate(model_args)]
    checkpoints = [str(s.checkpoint) for s in sources]
    out_dir = check_output_path(out or _default_out(checkpoints[0]), "dir")
    cfg = load_config(configs[0], overrides) if configs else sources[0].cfg
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
    try:
        report = run_robustness(cfg, checkpoints, level_list, kind_list, position_list, seed=seed, log=log)
    except KeyboardInterrupt:
        interrupted(f"nothing was written to {out_dir}; run the same command again (the occluders depend only "
                    "on --seed, so the numbers will be the same)")
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
