"""`attnreid data stats` and `attnreid data synth`."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

import typer

from attnreid.cli._app import app
from attnreid.cli._util import check_output_path, print_json
from attnreid.data.datasets import build_dataset
from attnreid.data.datasets.base import warn_bad
from attnreid.data.datasets.synthetic import check_parameters, generate_synthetic

data_app = typer.Typer(help="Dataset statistics, checks and the synthetic data set.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("stats")
def stats(
    name: str = typer.Argument(..., help="Dataset: market1501, dukemtmcreid, cuhk03_labeled, cuhk03_detected, "
                               "occluded_duke, p_dukemtmc, partial_reid, partial_ilids, occluded_reid, msmt17, synthetic, "
                               "folder (your own crops), list (a .csv/.tsv list)."),
    root: Path = typer.Option(..., "--root", help="Data root (folder or .zip), as for torchreid."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: {split: {images, ids, cams}}."),
    skip_bad_images: bool = typer.Option(False, "--skip-bad-images",
                                         help="Skip (and list on stderr) bad files instead of failing."),
    check_images: bool = typer.Option(False, "--check-images",
                                      help="Also decode every image (slow) to find unreadable ones."),
) -> None:
    """Print the number of images, identities and cameras of each split."""
    generated = _synthetic_to_generate(root) if name == "synthetic" else None
    dataset = build_dataset(name, str(root), skip_bad_images=skip_bad_images)
    if generated is not None:  # stats reads a data set; this one did not exist and was written: say so
        print(f"note: the synthetic set was not under {root}; generated it with the default parameters in "
              f"{generated} ('attnreid data synth' writes one with chosen parameters)", file=sys.stderr)
    if check_images:
        from attnreid.data.loader import check_images as check  # torch: only when images are decoded

        dataset = check(dataset, skip_bad_images=skip_bad_images, progress=True)
    warn_bad(dataset.bad_images)
    result = dataset.stats()
    if as_json:
        print_json(result)
        return
    print(f"{name} ({dataset.root})")
    print(f"{'split':<8} {'images':>8} {'ids':>6} {'cams':>5}")
    for split, s in result.items():
        print(f"{split:<8} {s['images']:>8} {s['ids']:>6} {'-' if s['cams'] is None else s['cams']:>5}")
    if not dataset.cameras_known:
        print("no camera ids: each file is its own camera (a query's own file is left out, same-camera matches count)")


@data_app.command("check")
def check(
    root: Path = typer.Argument(..., help="Data root: a folder (train/, query/, gallery/), a .csv/.tsv list, "
                                "or a benchmark's root with --dataset."),
    dataset_name: Optional[str] = typer.Option(
        None, "--dataset", help="Dataset kind (default: list for a .csv/.tsv file, folder otherwise), "
        "e.g. market1501."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: the checks with counts and examples."),
    min_height: int = typer.Option(32, "--min-height", help="Images lower than this (pixels) are tiny."),
    min_width: int = typer.Option(16, "--min-width", help="Images narrower than this (pixels) are tiny."),
    skip_bad_images: bool = typer.Option(True, "--skip-bad-images/--no-skip-bad-images",
                                         help="Count bad files and unparsable names instead of stopping at the first."),
) -> None:
    """Find unreadable, tiny and duplicate images and identity problems in a data set (one table)."""
    from attnreid.data.check import check_dataset
    from attnreid.data.datasets import build_dataset

    name = dataset_name or ("list" if root.suffix.lower() in (".csv", ".tsv") else "folder")
    dataset = build_dataset(name, str(root), skip_bad_images=skip_bad_images)
    report = check_dataset(dataset, min_height=min_height, min_width=min_width, progress=not as_json)
    if as_json:
        print_json(report)
        return
    images = report["images"] + len(dataset.bad_images)
    print(f"{name} ({dataset.root}): {images} images, cameras {'known' if report['cameras_known'] else 'unknown'}")
    print(f"{'check':<20} {'count':>7}  {'status':<6} example")
    for key, c in report["checks"].items():
        example = c["examples"][0] if c["examples"] else ""
        if isinstance(example, dict):
            example = " ".join(str(v) for v in example.values())
        elif isinstance(example, list):
            example = " = ".join(example)
        count = "-" if c["count"] is None else c["count"]
        print(f"{key:<20} {count:>7}  {c['status']:<6} {example}")
    print(f"overall: {report['status']}" + (" (--json lists up to 5 examples of each)" if report["status"] != "ok" else ""))


def _synthetic_to_generate(root: Path) -> Optional[Path]:
    """The folder ``data stats synthetic`` will generate under ``root``, or None if it exists."""
    import inspect

    from attnreid.data.datasets.synthetic import MARKET_FOLDER, SyntheticDataset, synthetic_folder_name

    defaults = {k: v.default for k, v in inspect.signature(SyntheticDataset).parameters.items()
                if k not in ("root", "skip_bad_images")}
    folder = root / synthetic_folder_name(**defaults)
    return None if (folder / MARKET_FOLDER / "synthetic.json").is_file() else folder


# What `data synth` calls generate_synthetic's parameters, for its error messages.
SYNTH_OPTIONS = {"num_ids": "--ids", "images_per_id": "--images-per-id", "num_cameras": "--cameras",
                 "height": "--height x --width", "occluded_query_share": "--occluded-query-share"}


@data_app.command("synth")
def synth(
    out: Path = typer.Option(..., "--out", help="Output folder; the set goes to OUT/market1501/."),
    ids: int = typer.Option(60, "--ids", help="Number of identities (half train, half test)."),
    images_per_id: int = typer.Option(12, "--images-per-id", help="Images of each identity."),
    cameras: int = typer.Option(4, "--cameras", help="Number of cameras (2..9)."),
    height: int = typer.Option(128, "--height", help="Image height in pixels."),
    width: int = typer.Option(64, "--width", help="Image width in pixels."),
    occluded_query_share: float = typer.Option(
        1.0, "--occluded-query-share", help="Share of occluded queries: 1.0 Occluded-Duke-like, 0.0 clean."),
    seed: int = typer.Option(0, "--seed", help="Random seed (the set is deterministic for a seed)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT/market1501."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: folder, seconds, stats."),
) -> None:
    """Generate the synthetic occluded re-ID data set in the Market-1501 layout."""
    check_parameters(ids, images_per_id, cameras, height, width, occluded_query_share, names=SYNTH_OPTIONS)
    check_output_path(out, "dir")
    start = time.perf_counter()
    folder = generate_synthetic(out, ids, images_per_id, cameras, height, width, occluded_query_share, seed,
                                overwrite=overwrite)
    seconds = time.perf_counter() - start
    result = build_dataset("market1501", str(out)).stats()
    images = sum(s["images"] for s in result.values())
    if as_json:
        print_json({"folder": str(folder), "seconds": round(seconds, 3), "images": images, **result})
        return
    print(f"wrote {images} images to {folder} in {seconds:.1f} s ({images / max(seconds, 1e-9):.0f} images/s)")
    for split, s in result.items():
        print(f"{split:<8} {s['images']:>6} images {s['ids']:>5} ids {s['cams']:>3} cams")
    print(f"read it with: attnreid data stats market1501 --root {out}")


__all__ = ["check", "data_app", "stats", "synth"]
