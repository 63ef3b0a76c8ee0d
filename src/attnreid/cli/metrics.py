"""``attnreid metrics FILE.npz``: re-ID metrics from saved arrays (a thin shell over
:mod:`attnreid.evaluation`)."""

from __future__ import annotations

from pathlib import Path

import typer

from attnreid.cli._app import app
from attnreid.evaluation.stats import DEFAULT_LEVEL, DEFAULT_RESAMPLES, DEFAULT_SEED


@app.command("metrics")
def metrics(
    file: Path = typer.Argument(..., help="npz with query_pids, gallery_pids, query_camids, gallery_camids and distmat (Q x G) or query_features + gallery_features."),
    rerank: bool = typer.Option(False, "--rerank/--no-rerank", help="k-reciprocal re-ranking (needs the features)."),
    k1: int = typer.Option(20, "--k1", help="Re-ranking k1."),
    k2: int = typer.Option(6, "--k2", help="Re-ranking k2 (query expansion)."),
    lambda_value: float = typer.Option(0.3, "--lambda", help="Re-ranking weight of the original distance."),
    rerank_input: str = typer.Option("zhong", "--rerank-input",
                                     help="zhong (Zhong et al., the paper's) or torchreid (squares squared distances, as torchreid's engine)."),
    metric: str = typer.Option("euclidean_sq", "--metric", help="Distance of the features: euclidean_sq or cosine."),
    protocol: str = typer.Option("market", "--protocol", help="market, cuhk03_classic or partial (no camera filtering)."),
    max_rank: int = typer.Option(50, "--max-rank", help="Length of the CMC curve."),
    resamples: int = typer.Option(DEFAULT_RESAMPLES, "--bootstrap", min=0,
                                  help="Bootstrap resamples over queries for the intervals (0: none)."),
    level: float = typer.Option(DEFAULT_LEVEL, "--level", help="Confidence level of the intervals."),
    seed: int = typer.Option(DEFAULT_SEED, "--seed", help="Seed of the bootstrap draws."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """CMC, mAP and mINP (Market single-query protocol) from saved distances or features, with
    bootstrap intervals over queries (rank1_ci, mAP_ci, mINP_ci, cmc_ci in the JSON)."""
    from attnreid.cli._util import print_json
    from attnreid.evaluation.npz import evaluate_npz
    from attnreid.evaluation.stats import level_text, metric_text, with_intervals

    _refuse_run_files(file)
    res = evaluate_npz(file, protocol, metric, rerank, k1, k2, lambda_value, max_rank, per_query=True,
                       rerank_input=rerank_input)
    res.pop("arrays")
    with_intervals(res, resamples, level, seed)
    res.pop("per_query")
    if as_json:
        print_json(res)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{file.name}  ({protocol}{', re-ranked' if rerank else ''})", caption=level_text(res))
    table.add_column("metric")
    table.add_column("value (%)", justify="right")
    for key, name in [("mAP", "mAP"), ("mINP", "mINP")] + [(f"rank{k}", f"Rank-{k}") for k in (1, 3, 5, 10)]:
        table.add_row(name, metric_text(res, key, digits=2))
    table.add_row("valid queries", str(res["num_valid_queries"]))
    table.add_row("skipped queries", str(res["num_skipped_queries"]))
    Console().print(table)


RUN_RECORDS = ("eval_per_query.npz", "eval_ranks.npz", "eval.json")


def _refuse_run_files(file: Path) -> None:
    """A run folder or one of its records holds no features or distances: say where its metrics
    are and how to write a file this command reads."""
    from attnreid.errors import DataError

    run = file if file.is_dir() else file.parent if file.name in RUN_RECORDS else None
    if run is None:
        return
    what = f"{file} is a run folder" if file.is_dir() else f"{file} is a run's record, without features or distances"
    raise DataError(f"{what}: its metrics are in {run / 'eval.json'} ('attnreid report' and 'attnreid compare' "
                    f"read the run); for this command write features with: attnreid extract {run} --split query "
                    f"--split gallery --out feats.npz")
