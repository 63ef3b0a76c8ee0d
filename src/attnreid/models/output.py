"""What a model's ``forward`` returns in training mode: :class:`TrainOutput`.

The keys the criterion (:mod:`attnreid.losses`), the hooks and diagnostics
(:mod:`attnreid.engine.diagnostics`) and the tests read, declared once. It is a ``TypedDict``:
a plain dict at run time (DDP, ``torch.compile`` and the loss code see a dict), typed for
readers and type checkers. In eval mode ``model(x)`` returns the test feature tensor,
B x ``feature_dim``, which the ONNX export and the feature extraction rely on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Dict, TypedDict

if TYPE_CHECKING:
    from torch import Tensor


class _Heads(TypedDict):
    logits: Dict[str, "Tensor"]  # head name -> B x num_classes; what each ce_<head> loss term reads
    features: Dict[str, "Tensor"]  # head name -> B x D; what each triplet / center term reads


class TrainOutput(_Heads, total=False):
    """``logits`` and ``features`` (every model), and the optional entries below.

    - ``P``: B x K x E, the K head embeddings (MHSA-Net Eq. 2; FDRT and IHTL read them);
    - ``alpha``: B x K x J, each head's attention over the J grid positions (Eq. 1; ACM);
    - ``beta``: B x K, SAFFM's fusion weights (Eq. 6);
    - ``q_star``: B x E, the global feature q*; ``p_star``: B x F, the fused p* (Eq. 7);
    - ``z``: B x E, the RLM's residual feature (Eq. 9).

    A model's registry entry (:class:`~attnreid.models.registry.ModelSpec`) names the loss terms
    its entries support; a model with ``attention="heads"`` returns ``alpha``.
    """

    P: "Tensor"
    alpha: "Tensor"
    beta: "Tensor"
    q_star: "Tensor"
    p_star: "Tensor"
    z: "Tensor"
