"""MHSA-Net (Tan et al.): one small module per paper component.

Shapes for batch B, K heads, backbone channels C (2048 for ResNet-50), grid h x w,
J = h*w positions (192 at 384x128 with last stride 1), embedding width E = 512.

===========================  ===========================================  ==========
component                    code                                         paper
===========================  ===========================================  ==========
Global Feature Branch        :class:`~attnreid.models.baseline.GlobalFeatureBranch`  Sec. IV
MHSAM                        :class:`MultiHeadSelfAttention`               Eq. 1-2
FRM (P-perp = P)             ``P`` itself, shaped by FDRT and IHTL         Eq. 3, 5
SAFFM                        :class:`SelfAttentionFeatureFusion`           Eq. 6-7
fusion alternatives          :class:`ConcatFusion`, :class:`SumFusion`     Table IX
RLM (+ LayerNorm on z)       :class:`ResidualLearningModule`               Eq. 9
whole network                :class:`MHSANet`                              Fig. 2
===========================  ===========================================  ==========

The losses (Eq. 3, 5, 8, 10-13) live in :mod:`attnreid.losses`.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from attnreid.choices import ATTENTION_NORMS, HEAD_PRIORS
from attnreid.errors import ConfigError
from attnreid.models.backbones import build_backbone
from attnreid.models.baseline import GlobalFeatureBranch, make_classifier, neck
from attnreid.models.output import TrainOutput
from attnreid.models.registry import get_spec

# Hidden widths of SAFFM per head (Eq. 6: w4 512K -> 128K, w5 128K -> 64K).
SAFFM_HIDDEN = (128, 64)


class MultiHeadSelfAttention(nn.Module):
    """MHSAM, Eq. 1-2: K attention maps over the grid and K embeddings P.

    Eq. 1: ``alpha = softmax(w2 ReLU(w1 Q^T))`` with Q: B x J x C, w1: C -> A (A = 512),
    w2: A -> K, both without bias; logits B x J x K. ``norm="spatial"`` (default): softmax
    over the J positions for each head; ``norm="heads"``: over the K heads at each position,
    and the pooled sum alpha Q is divided by J (docs/spec.md §1). Eq. 2: ``P = (alpha Q) w3 +
    b3``, w3: C -> E with bias: P is B x K x E. ``alpha`` is returned as B x K x J either way.

    Two options that are not in the paper, off by default (why they exist: docs/models.md,
    "What gets the heads apart"):

    - ``logit_cap`` = c > 0 (``model.mhsanet.attention_logit_cap``): the logits become
      ``c tanh(logits / c)``, so no position wins a head's softmax by more than e^(2c).
    - ``head_prior`` (``model.mhsanet.head_prior``): adds to head k's logits, after the cap,
      a Gaussian log-prior over the grid rows, ``-(y - mu_k)^2 / (2 sigma_k^2)`` with y =
      (row + 0.5) / h, ``mu_k = (k + 0.5) / K`` and ``sigma_k = head_prior_width / K``: head k
      starts on the k-th horizontal stripe. ``rows`` keeps mu and sigma fixed; ``rows_learned``
      learns offsets to them (``prior_shift`` to mu, ``prior_log_scale`` to log sigma, 2K
      parameters starting at 0). ``head_prior_columns`` = s > 0 adds, for every head,
      ``-(x - 0.5)^2 / (2 s^2)`` over the columns, x = (col + 0.5) / w.
    """

    def __init__(self, in_channels: int, num_heads: int, attention_dim: int = 512, embed_dim: int = 512,
                 norm: str = "spatial", logit_cap: float = 0.0, head_prior: str = "none",
                 head_prior_width: float = 1.0, head_prior_columns: float = 0.0):
        super().__init__()
        if norm not in ATTENTION_NORMS:
            raise ConfigError(f"config key 'model.mhsanet.attention_norm' is {norm!r}; expected spatial or heads")
        if head_prior not in HEAD_PRIORS:
            raise ConfigError(f"config key 'model.mhsanet.head_prior' is {head_prior!r}; expected one of: {', '.join(HEAD_PRIORS)}")
        if not head_prior_width > 0:
            raise ConfigError(f"config key 'model.mhsanet.head_prior_width' is {head_prior_width}; it must be > 0")
        self.norm = norm
        self.logit_cap = float(logit_cap)
        if head_prior_columns < 0 or (head_prior_columns > 0 and head_prior == "none"):
            raise ConfigError(f"config key 'model.mhsanet.head_prior_columns' is {head_prior_columns}; it must be >= 0, "
                              "and > 0 only with a model.mhsanet.head_prior")
        self.head_prior = head_prior
        self.head_prior_columns = float(head_prior_columns)
        # The stripes are buffers (not saved: none/rows checkpoints share one layout); the
        # learned form adds offsets that start at 0, so weight decay pulls them back to the
        # stripes instead of pulling every head to the top of the image.
        self.register_buffer("prior_mu", (torch.arange(num_heads, dtype=torch.float32) + 0.5) / num_heads,
                             persistent=False)
        self.register_buffer("prior_log_sigma", torch.full((num_heads,), math.log(head_prior_width / num_heads)),
                             persistent=False)
        if head_prior == "rows_learned":
            self.prior_shift = nn.Parameter(torch.zeros(num_heads))
            self.prior_log_scale = nn.Parameter(torch.zeros(num_heads))
        self.w1 = nn.Linear(in_channels, attention_dim, bias=False)
        self.w2 = nn.Linear(attention_dim, num_heads, bias=False)
        self.w3 = nn.Linear(in_channels, embed_dim)

    def row_prior(self, height: int, width: int) -> torch.Tensor:
        """The per-head log-prior over a ``height`` x ``width`` grid, K x J (rows major, as Q is flattened)."""
        mu, log_sigma = self.prior_mu, self.prior_log_sigma
        if self.head_prior == "rows_learned":
            mu, log_sigma = mu + self.prior_shift.float(), log_sigma + self.prior_log_scale.float()
        y = (torch.arange(height, dtype=torch.float32, device=mu.device) + 0.5) / height
        rows = -((y[None, :] - mu[:, None]) ** 2) / (2 * log_sigma.exp()[:, None] ** 2)
        prior = rows.repeat_interleave(width, dim=1)
        if self.head_prior_columns > 0:
            x = (torch.arange(width, dtype=torch.float32, device=mu.device) + 0.5) / width
            prior = prior + (-((x - 0.5) ** 2) / (2 * self.head_prior_columns ** 2)).repeat(height)
        return prior

    def attention(self, q: torch.Tensor, grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """Eq. 1: Q (B x J x C) -> alpha (B x K x J); ``grid`` = (h, w) with h w = J, needed by a head prior."""
        logits = self.w2(F.relu(self.w1(q))).transpose(1, 2)
        if self.logit_cap > 0:
            logits = self.logit_cap * torch.tanh(logits / self.logit_cap)
        if self.head_prior != "none":
            if grid is None or grid[0] * grid[1] != q.shape[1]:
                raise ValueError(f"a head prior needs the grid (h, w) of the {q.shape[1]} positions, got {grid}")
            logits = logits + self.row_prior(*grid).to(logits.dtype)
        return logits.softmax(dim=2 if self.norm == "spatial" else 1)

    def forward(self, feature_map: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Q(x) as B x C x h x w -> (P: B x K x E, alpha: B x K x J)."""
        q = feature_map.flatten(2).transpose(1, 2)
        alpha = self.attention(q, tuple(feature_map.shape[-2:]))
        pooled = torch.bmm(alpha, q)
        if self.norm == "heads":
            pooled = pooled / q.shape[1]
        return self.w3(pooled), alpha


class SelfAttentionFeatureFusion(nn.Module):
    """SAFFM, Eq. 6-7: fuse the K embeddings into one p* (B x E) with learned weights beta.

    Eq. 6: ``beta = softmax_K(w6 ReLU(w5 w4 P*))``, P* = P flattened to B x EK,
    w4: EK -> 128K, w5: 128K -> 64K (no non-linearity between them, as written),
    w6: 64K -> K. The equation shows weight matrices only, so the layers have no bias.
    Eq. 7: ``p* = LayerNorm(sum_k beta_k P_k)``. Returns (p*: B x E, beta: B x K).
    """

    def __init__(self, num_heads: int, embed_dim: int = 512):
        super().__init__()
        h4, h5 = (width * num_heads for width in SAFFM_HIDDEN)
        self.w4 = nn.Linear(embed_dim * num_heads, h4, bias=False)
        self.w5 = nn.Linear(h4, h5, bias=False)
        self.w6 = nn.Linear(h5, num_heads, bias=False)
        self.norm = nn.LayerNorm(embed_dim)
        self.out_dim = embed_dim

    def forward(self, p: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        beta = self.w6(F.relu(self.w5(self.w4(p.flatten(1))))).softmax(dim=1)
        return self.norm(torch.einsum("bk,bke->be", beta, p)), beta


class ConcatFusion(nn.Module):
    """Table IX "CONCAT": p* = LayerNorm(concat_k P_k), B x EK (no beta).

    The concat test feature cat(p*, q*) is then (K+1) x 512, the paper's figure.
    """

    def __init__(self, num_heads: int, embed_dim: int = 512):
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim * num_heads)
        self.out_dim = embed_dim * num_heads

    def forward(self, p: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.norm(p.flatten(1)), None


class SumFusion(nn.Module):
    """Table IX "SUM": p* = LayerNorm(sum_k P_k), B x E (no beta)."""

    def __init__(self, num_heads: int, embed_dim: int = 512):
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)
        self.out_dim = embed_dim

    def forward(self, p: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        return self.norm(p.sum(dim=1)), None


# model.mhsanet.fusion (attnreid.choices.FUSIONS) -> its module
FUSIONS = {"saffm": SelfAttentionFeatureFusion, "concat": ConcatFusion, "sum": SumFusion}


class ResidualLearningModule(nn.Module):
    """RLM, Eq. 9: ``Z = LayerNorm(Q* + P)``, Q* = q* copied to K rows; z = sum_k Z_k.

    ``out_norm=True`` (default, ``model.mhsanet.rlm_out_norm``; the authors' code):
    z = LayerNorm(sum_k Z_k). Without it (Eq. 9 as written, "simply summed") z sums K
    unit-variance rows that start out aligned (q* dominates every row), so ||z|| grows
    as K x sqrt(E): 181 for K = 8, E = 512 at initialisation, against 22.6 for p*; the
    triplet on z then outweighs every other loss term (docs/spec.md §1, RLM).

    q*: B x E, P: B x K x E -> z: B x E (a training-only signal for L_ReN, Eq. 10).
    """

    def __init__(self, embed_dim: int = 512, out_norm: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)
        self.out_norm = nn.LayerNorm(embed_dim) if out_norm else None

    def forward(self, q_star: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        z = self.norm(q_star.unsqueeze(1) + p).sum(dim=1)
        return self.out_norm(z) if self.out_norm is not None else z


class MHSANet(nn.Module):
    """MHSA-Net (Fig. 2): backbone -> Global Feature Branch (q*) + MHSAB (P, p*, z).

    Variants are configuration (``model_cfg``): ``mhsanet.num_heads`` (K >= 1),
    ``attention_norm``, ``fusion`` (saffm | concat | sum), ``rlm`` (false: the RLM and
    its classifier are not built, no ``z``), ``rlm_out_norm`` (LayerNorm on z),
    ``test_feature`` and ``feature_norm``.
    MHSA-Net-dagger (no CE on q*) is a loss switch (``loss.global_ce: false``): the
    global classifier is still built, so dagger and plain checkpoints share one layout,
    but the criterion never calls it, so it gets no gradient.

    Training forward returns a :class:`~attnreid.models.output.TrainOutput`::

        logits   {"global": B x N, "saffm": B x N, "rlm": B x N (if rlm)}
        features {"saffm": p*, "rlm": z (if rlm)}       (batch-hard triplet inputs)
        P B x K x E, alpha B x K x J, q_star B x E, p_star B x F, z B x E (if rlm),
        beta B x K (fusion saffm only)

    where F is the fused width (E, or EK for concat). Eval forward returns the test
    feature, B x ``feature_dim``:

        default / concat  cat(p*, q*)   F + E  (MHSA-Net, 1024 with SAFFM)
        star              p*            F      (MHSA-Net-star)
        head              P_k, k = test_head   E (Table VI)
        global            q*            E
    """

    model_name = "mhsanet"

    def __init__(self, model_cfg, num_classes: int):
        super().__init__()
        cfg = model_cfg.mhsanet
        if cfg.num_heads < 1:
            raise ConfigError(f"config key 'model.mhsanet.num_heads' is {cfg.num_heads}; it must be >= 1")
        if cfg.fusion not in FUSIONS:
            raise ConfigError(f"config key 'model.mhsanet.fusion' is {cfg.fusion!r}; expected one of: {', '.join(FUSIONS)}")
        test_feature = get_spec(self.model_name).test_feature(model_cfg).name
        if test_feature == "head" and not 0 <= model_cfg.test_head < cfg.num_heads:
            raise ConfigError(f"config key 'model.test_head' is {model_cfg.test_head}; it must be in 0..{cfg.num_heads - 1}")
        self.num_heads = cfg.num_heads
        self.num_classes = num_classes
        self.test_feature = test_feature
        self.test_head = model_cfg.test_head
        self.feature_norm = bool(model_cfg.feature_norm)
        e = cfg.embed_dim
        if not getattr(model_cfg, "global_reduce", True):
            raise ConfigError("config key 'model.global_reduce' is false; mhsanet needs q* at the embedding width "
                              "(the RLM adds it to P), only the baseline takes it")
        # BNNeck (models/baseline.py): CE and the test feature after a BN, triplets before it
        self.bnneck = bool(getattr(model_cfg, "bnneck", False))
        self.global_dim = e

        self.backbone = build_backbone(model_cfg.backbone)
        self.global_branch = GlobalFeatureBranch(self.backbone.out_channels, e)
        self.mhsam = MultiHeadSelfAttention(self.backbone.out_channels, cfg.num_heads, cfg.attention_dim, e,
                                            cfg.attention_norm, cfg.attention_logit_cap,
                                            cfg.head_prior, cfg.head_prior_width, cfg.head_prior_columns)
        self.fusion = FUSIONS[cfg.fusion](cfg.num_heads, e)
        self.rlm = ResidualLearningModule(e, cfg.rlm_out_norm) if cfg.rlm else None
        heads = {"global": make_classifier(e, num_classes, self.bnneck),
                 "saffm": make_classifier(self.fusion.out_dim, num_classes, self.bnneck)}
        if cfg.rlm:
            heads["rlm"] = make_classifier(e, num_classes, self.bnneck)
        self.classifiers = nn.ModuleDict(heads)
        self.feature_dim = {"concat": self.fusion.out_dim + e, "star": self.fusion.out_dim, "head": e, "global": e}[test_feature]

    def _test_feature(self, q_star: torch.Tensor, p: torch.Tensor, p_star: torch.Tensor) -> torch.Tensor:
        if self.test_feature == "concat":
            f = torch.cat([p_star, q_star], dim=1)
        elif self.test_feature == "star":
            f = p_star
        elif self.test_feature == "head":
            f = p[:, self.test_head]
        else:
            f = q_star
        return F.normalize(f, dim=1) if self.feature_norm else f

    def forward(self, x: torch.Tensor):
        fmap = self.backbone(x)
        q_star = self.global_branch(fmap)
        p, alpha = self.mhsam(fmap)
        p_star, beta = self.fusion(p)
        if not self.training:
            return self._test_feature(neck(self.classifiers, "global", q_star), p, neck(self.classifiers, "saffm", p_star))
        out: TrainOutput = {
            "logits": {"global": self.classifiers["global"](q_star), "saffm": self.classifiers["saffm"](p_star)},
            "features": {"saffm": p_star},
            "P": p,
            "alpha": alpha,
            "q_star": q_star,
            "p_star": p_star,
        }
        if beta is not None:
            out["beta"] = beta
        if self.bnneck:
            out["features"]["global"] = q_star
        if self.rlm is not None:
            z = self.rlm(q_star, p)
            out["logits"]["rlm"] = self.classifiers["rlm"](z)
            out["features"]["rlm"] = z
            out["z"] = z
        return out

    def forward_attention(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Test feature plus alpha on the feature grid (B x K x h x w) and beta (B x K, saffm only).

        Uses the module's current mode; call ``model.eval()`` first for test-time BatchNorm.
        """
        fmap = self.backbone(x)
        q_star = self.global_branch(fmap)
        p, alpha = self.mhsam(fmap)
        p_star, beta = self.fusion(p)
        out = {
            "feature": self._test_feature(neck(self.classifiers, "global", q_star), p,
                                          neck(self.classifiers, "saffm", p_star)),
            "attention": alpha.reshape(alpha.shape[0], alpha.shape[1], fmap.shape[-2], fmap.shape[-1]),
        }
        if beta is not None:
            out["beta"] = beta
        return out
