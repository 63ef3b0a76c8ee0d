"""How a query's gallery is ranked: the distance and, optionally, k-reciprocal re-ranking.

One small object instead of six loose parameters: built once (from ``cfg.eval`` with
:meth:`RankingOptions.from_config`, or from command-line options) and handed to
:func:`attnreid.evaluation.protocols.evaluate`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Dict, Optional

from attnreid.choices import METRICS, RERANK_INPUTS
from attnreid.errors import AttnReidError


@dataclass(frozen=True)
class RankingOptions:
    """``metric`` (``euclidean_sq`` | ``cosine``); with ``rerank``, Zhong et al.'s k-reciprocal
    re-ranking with ``k1``, ``k2``, ``lambda_value`` and ``rerank_input`` (``zhong``: the paper's
    formulation; ``torchreid``: what torchreid's engine feeds it, see :mod:`attnreid.evaluation.rerank`).
    Checked on construction: a bad value is one line naming it."""

    metric: str = "euclidean_sq"
    rerank: bool = False
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3
    rerank_input: str = "zhong"

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise AttnReidError(f"unknown distance metric {self.metric!r}; expected one of {', '.join(METRICS)}")
        if self.rerank_input not in RERANK_INPUTS:
            raise AttnReidError(
                f"unknown re-ranking input {self.rerank_input!r}; expected one of {', '.join(RERANK_INPUTS)}")
        if self.k1 < 1 or self.k2 < 1:
            raise AttnReidError(f"re-ranking needs k1 >= 1 and k2 >= 1, got k1={self.k1}, k2={self.k2}")
        if not 0.0 <= self.lambda_value <= 1.0:
            raise AttnReidError(f"re-ranking lambda must be in [0, 1], got {self.lambda_value}")

    @classmethod
    def from_config(cls, ev: Any, rerank: Optional[bool] = None) -> "RankingOptions":
        """From the ``eval`` section of a config (duck-typed: a missing key keeps its default);
        ``rerank`` (when not None) overrides ``eval.rerank``."""
        base = cls()
        get = lambda key: getattr(ev, key, getattr(base, key))  # noqa: E731
        return cls(metric=get("metric"), rerank=bool(get("rerank") if rerank is None else rerank), k1=int(get("k1")),
                   k2=int(get("k2")), lambda_value=float(get("lambda_value")), rerank_input=get("rerank_input"))

    def with_rerank(self, rerank: bool) -> "RankingOptions":
        return replace(self, rerank=bool(rerank))

    def record(self) -> Dict[str, Any]:
        """What eval.json says about the ranking: the metric, whether re-ranked, and which reading."""
        out: Dict[str, Any] = {"metric": self.metric, "rerank": self.rerank}
        if self.rerank:
            out["rerank_input"] = self.rerank_input
        return out


__all__ = ["METRICS", "RERANK_INPUTS", "RankingOptions"]
