"""`attnreid report` and `attnreid explain`: HTML report of runs, attention overlays."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from attnreid.cli._app import app
from attnreid.cli._util import (CHECKPOINT_HELP, MODEL_HELP, check_output_path, device_option, print_json,
                                resolve_model)
from attnreid.errors import AttnReidError


def _parse_queries(text: Optional[str]) -> Optional[List[int]]:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise AttnReidError(f"--queries must be comma-separated query indices like 0,5,12, got {text!r}") from None


@app.command("report")
def report(
    run_dirs: List[Path] = typer.Argument(..., help="One or more run folders (RUN_DIR ...)."),
    out: Path = typer.Option(..., "--out", help="Folder for index.html and its pictures."),
    title: Optional[str] = typer.Option(None, "--title", help="Page title."),
    top_k: int = typer.Option(10, "--top-k", "-k", min=1, help="Gallery images per ranked list."),
    worst: int = typer.Option(3, "--worst", min=0, help="Ranked lists of the N worst queries per run."),
    by: str = typer.Option("ap", "--by", help="Worst by 'ap' (AP within top-k) or 'first_hit'."),
    queries: Optional[str] = typer.Option(None, "--queries", help="Comma-separated query indices instead of the worst."),
    overlays: int = typer.Option(3, "--overlays", min=0, help="Attention overlays of that many of those queries."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object with the page's path."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into --out even if it holds files that are "
                                                              "not an attnreid page."),
) -> None:
    """Write an HTML report (metrics table, CMC and training curves, ranked lists, attention)."""
    from attnreid.viz.report import write_report  # torch: imported when the command runs, not for --help

    if by not in ("ap", "first_hit"):
        raise AttnReidError(f"--by must be 'ap' or 'first_hit', got {by!r}")
    check_output_path(out, "dir")
    page = write_report(run_dirs, out, title=title, topk=top_k, num_queries=worst,
                        queries=_parse_queries(queries), worst_by=by, overlays=overlays, overwrite=overwrite)
    if json_out:
        print_json({"report": str(page)})
    else:
        print(f"report written to {page}")


@app.command("explain")
def explain(
    model: Path = typer.Argument(..., help=MODEL_HELP + " An mhsanet or hacnn model."),
    images: List[str] = typer.Argument(..., help="Images to explain (files or zip::member paths), then any KEY=VALUE "
                                       "overrides of the model's config."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help=CHECKPOINT_HELP),
    out: Path = typer.Option(..., "--out", help="Folder for one PNG per image and an index.html."),
    scale: str = typer.Option("map", "--scale", help="'map': each head's map to its own range; 'shared': one range."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA if present), cpu, cuda or cuda:N."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object (pages, beta per image)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into --out even if it holds files that are "
                                                              "not an attnreid page."),
) -> None:
    """Draw the model's own attention over each image (MHSA-Net heads + beta; HA-CNN soft maps + regions)."""
    from attnreid.engine.build import load_model  # torch: imported when the command runs, not for --help
    from attnreid.viz.attention import explain, read_images
    from attnreid.viz.page import check_page_folder
    from attnreid.engine.model_source import split_models_and_overrides

    if scale not in ("map", "shared"):
        raise AttnReidError(f"--scale must be 'map' or 'shared', got {scale!r}")
    check_output_path(out, "dir")
    dev = device_option(device)
    paths, overrides = split_models_and_overrides(images)
    source = resolve_model(model, overrides, checkpoint)
    check_page_folder(out, overwrite)  # before the model and images: refused at once
    pictures = read_images(paths)  # before the model: a bad image fails fast
    net, cfg = load_model(source.checkpoint, source.cfg, device=dev)
    result = explain(net, pictures, out, cfg.data, scale=scale, device=dev, overwrite=overwrite)
    if json_out:
        print_json(result)
    else:
        print(f"{len(result['images'])} attention picture(s) of model '{result['model']}' written; open {result['index']}")
