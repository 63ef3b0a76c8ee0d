"""Evaluation: distances, CMC / mAP / mINP under the re-ID protocols, k-reciprocal re-ranking.

Works on numpy arrays or torch tensors (CPU or GPU) and knows nothing of models. Everything but
re-ranking runs on numpy alone: importing this package, ranking a distance matrix and the
statistics never import torch (``attnreid metrics`` starts in a fraction of torch's import time).
"""

from attnreid.evaluation.distance import compute_distance
from attnreid.evaluation.options import RankingOptions
from attnreid.evaluation.protocols import PROTOCOLS, evaluate, multi_query_features
from attnreid.evaluation.rank import evaluate_cuhk03_single_shot, evaluate_rank

__all__ = [
    "PROTOCOLS",
    "RankingOptions",
    "compute_distance",
    "evaluate",
    "evaluate_cuhk03_single_shot",
    "evaluate_rank",
    "multi_query_features",
    "re_ranking",
]


def __getattr__(name):
    # re-ranking is written in torch: imported on first use, not with the package.
    if name == "re_ranking":
        from attnreid.evaluation.rerank import re_ranking

        return re_ranking
    raise AttributeError(f"module 'attnreid.evaluation' has no attribute {name!r}")
