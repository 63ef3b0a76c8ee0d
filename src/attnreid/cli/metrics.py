"""``attnreid metrics FILE.npz``: re-ID metrics from saved arrays (a thin shell over
:mod:`attnreid.evaluation`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

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
    max_rank: int = typer.Option(50, "--max-rank", help="Length of the CMC curve (1 to 100000)."),
    resamples: int = typer.Option(DEFAULT_RESAMPLES, "--bootstrap", min=0,
                                  help="Bootstrap resamples over queries for the intervals (0: none)."),
    level: float = typer.Option(DEFAULT_LEVEL, "--level", help="Confidence level of the intervals."),
    seed: int = typer.Option(DEFAULT_SEED, "--seed", help="Seed of the bootstrap draws."),
    save_distmat: Optional[Path] = typer.Option(
        None, "--save-distmat", help="Also write the Q x G (re-ranked) distances to this .npy file (atomically); "
                                     "otherwise the matrix is never held whole."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object on stdout."),
) -> None:
    """CMC, mAP and mINP (Market single-query protocol) from saved distances or features, with
    bootstrap intervals over queries (rank1_ci, mAP_ci, mINP_ci, cmc_ci in the JSON)."""
    from attnreid.cli._util import check_output_path, print_json
    from attnreid.evaluation.npz import evaluate_npz
    from attnreid.evaluation.stats import level_text, metric_text, with_intervals

    _refuse_run_files(file)
    if not 1 <= max_rank <= 100_000:  # the CMC arrays grow with it
        from attnreid.errors import AttnReidError

        raise AttnReidError(f"--max-rank is {max_rank}; it must be in 1..100000")
    ranking = ranking_options(metric, rerank, k1, k2, lambda_value, rerank_input)
    if save_distmat is not None:
        check_output_path(save_distmat, "file", option="--save-distmat", suffix=".npy")
    res = evaluate_npz(file, protocol, ranking, max_rank, per_query=True, save_distmat=save_distmat)
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


def ranking_options(metric: str, rerank: bool, k1: int, k2: int, lambda_value: float, rerank_input: str):
    """The command's ranking options, a bad value named by its option."""
    from attnreid.errors import AttnReidError
    from attnreid.evaluation.options import METRICS, RERANK_INPUTS, RankingOptions

    if rerank_input not in RERANK_INPUTS:
        raise AttnReidError(f"unknown --rerank-input {rerank_input!r}; expected one of {', '.join(RERANK_INPUTS)}")
    if metric not in METRICS:
        raise AttnReidError(f"unknown --metric {metric!r}; expected one of {', '.join(METRICS)}")
    return RankingOptions(metric=metric, rerank=rerank, k1=k1, k2=k2, lambda_value=lambda_value,
                          rerank_input=rerank_input)


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
