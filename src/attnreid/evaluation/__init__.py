"""Evaluation: distances, CMC / mAP / mINP under the re-ID protocols, k-reciprocal re-ranking.

Works on numpy arrays or torch tensors (CPU or GPU) and knows nothing of models.
"""

from attnreid.evaluation.distance import compute_distance
from attnreid.evaluation.protocols import PROTOCOLS, evaluate, multi_query_features
from attnreid.evaluation.rank import evaluate_cuhk03_single_shot, evaluate_rank
from attnreid.evaluation.rerank import re_ranking

__all__ = [
    "PROTOCOLS",
    "compute_distance",
    "evaluate",
    "evaluate_cuhk03_single_shot",
    "evaluate_rank",
    "multi_query_features",
    "re_ranking",
]
