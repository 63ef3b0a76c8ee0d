"""`attnreid data stats` and `attnreid data synth`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from attnreid.cli._app import app
from attnreid.cli._util import check_output_path, print_json

data_app = typer.Typer(help="Dataset statistics and the synthetic data set.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("stats")
def stats(
    name: str = typer.Argument(..., help="Dataset: market1501, dukemtmcreid, cuhk03_labeled, cuhk03_detected, "
                               "occluded_duke, p_dukemtmc, partial_reid, partial_ilids, occluded_reid, msmt17, synthetic."),
    root: Path = typer.Option(..., "--root", help="Data root (folder or .zip), as for torchreid."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: {split: {images, ids, cams}}."),
    skip_bad_images: bool = typer.Option(False, "--skip-bad-images",
                                         help="Skip (and list on stderr) bad files instead of failing."),
    check_images: bool = typer.Option(False, "--check-images",
                                      help="Also decode every image (slow) to find unreadable ones."),
) -> None:
    """Print the number of images, identities and cameras of each split."""
    from attnreid.data.datasets import build_dataset
    from attnreid.data.datasets.base import warn_bad

    generated = _synthetic_to_generate(root) if name == "synthetic" else None
    dataset = build_dataset(name, str(root), skip_bad_images=skip_bad_images)
    if generated is not None:  # stats reads a data set; this one did not exist and was written: say so
        print(f"note: the synthetic set was not under {root}; generated it with the default parameters in "
              f"{generated} ('attnreid data synth' writes one with chosen parameters)", file=sys.stderr)
    if check_images:
        from attnreid.data.loader import check_images as check

        dataset = check(dataset, skip_bad_images=skip_bad_images, progress=True)
    warn_bad(dataset.bad_images)
    result = dataset.stats()
    if as_json:
        print_json(result)
        return
    print(f"{name} ({dataset.root})")
    print(f"{'split':<8} {'images':>8} {'ids':>6} {'cams':>5}")
    for split, s in result.items():
        print(f"{split:<8} {s['images']:>8} {s['ids']:>6} {s['cams']:>5}")


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
    import time

    from attnreid.data.datasets import build_dataset
    from attnreid.data.datasets.synthetic import check_parameters, generate_synthetic

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


__all__ = ["data_app", "stats", "synth"]
