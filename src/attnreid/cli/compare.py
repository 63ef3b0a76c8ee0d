"""``attnreid compare A B``: a paired comparison of two evaluated models (a thin shell over
:mod:`attnreid.apps.compare`)."""

from __future__ import annotations

from pathlib import Path

import typer

from attnreid.cli._app import app
from attnreid.evaluation.stats import DEFAULT_LEVEL, DEFAULT_RESAMPLES, DEFAULT_SEED


@app.command("compare")
def compare(
    a: Path = typer.Argument(..., help="Run folder (with eval_per_query.npz) or feature/metrics .npz of model A."),
    b: Path = typer.Argument(..., help="The same for model B, evaluated on the same queries."),
    protocol: str = typer.Option("market", "--protocol", help="For .npz inputs: market, cuhk03_classic or partial."),
    metric: str = typer.Option("euclidean_sq", "--metric", help="For .npz feature inputs: euclidean_sq or cosine."),
    resamples: int = typer.Option(DEFAULT_RESAMPLES, "--bootstrap", min=1, help="Paired bootstrap resamples."),
    level: float = typer.Option(DEFAULT_LEVEL, "--level", help="Confidence level; the test's alpha is 1 - level."),
    seed: int = typer.Option(DEFAULT_SEED, "--seed", help="Seed of the bootstrap draws."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """Is A better than B on the same queries? Paired bootstrap + exact sign test on per-query AP
    and rank-1 hits; verdict "<A's name> better", "<B's name> better" or "no significant difference"."""
    from attnreid.apps.compare import compare_paths, result_lines

    result = compare_paths(a, b, protocol, metric, resamples, level, seed)
    if as_json:
        from attnreid.cli._util import print_json

        print_json(result)
        return
    print("\n".join(result_lines(result)))
