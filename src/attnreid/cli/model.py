"""`attnreid model-info`: size, cost and output shapes of the model a config builds; with
``--losses``, each loss term's value and gradient at the backbone for one batch at initialisation."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from attnreid.cli._app import app
from attnreid.cli._util import CHECKPOINT_HELP, print_json, resolve_model
from attnreid.errors import ConfigError
from attnreid.models.registry import get_spec


def without_weights(model_cfg):
    """A copy of ``model_cfg`` with the backbone's ImageNet (or file) weights switched off:
    inspecting a model never downloads or reads weights."""
    from attnreid.engine.build import without_initial_weights

    return without_initial_weights(model_cfg)


def model_info(cfg, num_classes: int = 751) -> dict:
    """Parameters, MACs for one image at ``cfg.data`` size, test feature size and attention grid.

    Inspecting a model never needs its weights: the network is built on torch's ``meta``
    device (shapes without storage) with the backbone's ImageNet weights switched off, so
    this runs offline, allocates nothing and takes well under a second even for ResNet-50.
    """
    import torch

    from attnreid.models import build_model
    from attnreid.models.complexity import count_macs, count_params  # torch-heavy: imported when the command runs, not for --help

    spec = get_spec(cfg.model.name)
    with torch.device("meta"):
        model = build_model(without_weights(cfg.model), num_classes)
    size = (cfg.data.height, cfg.data.width)
    info = {
        "model": model.model_name,
        "backbone": cfg.model.backbone.name if spec.backbone else None,
        "input_size": list(size),
        "num_classes": num_classes,
        "params": count_params(model),
        "params_no_classifier": count_params(model, exclude_classifiers=True),
        "macs": count_macs(model, size),
        "feature_dim": model.feature_dim,
    }
    if spec.attention is not None:
        model.eval()
        with torch.no_grad():
            att = model.forward_attention(torch.zeros(1, 3, *size, device="meta"))
        if spec.attention == "heads":
            info["attention_grid"] = list(att["attention"].shape[-2:])
        else:
            info["attention_grid"] = [list(a.shape[-2:]) for a in att["soft_attention"]]
    return info


def loss_info(cfg, num_classes: int = 751, batch_size: int = 32, seed: int = 0) -> list:
    """:func:`attnreid.losses.balance.loss_balance` on one synthetic batch at initialisation.

    The batch is ``batch_size`` standard-normal images at ``cfg.data`` size, P identities
    x ``cfg.data.num_instances`` images (the PK layout the triplets need). The weights are a
    random initialisation (seed ``seed``) even where the config asks for ImageNet weights, so
    this too runs offline; with those weights the balance at the start of training differs.
    """
    import torch

    from attnreid.losses import build_criterion  # torch: imported when the command runs, not for --help
    from attnreid.losses.balance import loss_balance
    from attnreid.models import build_model

    k = cfg.data.num_instances
    if batch_size < 2 * k or batch_size % k:
        raise ConfigError(f"--batch-size {batch_size} must be a multiple of data.num_instances ({k}) "
                          "holding at least 2 identities")
    if batch_size // k > num_classes:
        raise ConfigError(f"--batch-size {batch_size} needs {batch_size // k} identities but --num-classes is {num_classes}")
    torch.manual_seed(seed)
    model = build_model(without_weights(cfg.model), num_classes)
    images = torch.randn(batch_size, 3, cfg.data.height, cfg.data.width, generator=torch.Generator().manual_seed(seed))
    labels = torch.arange(batch_size // k).repeat_interleave(k)
    criterion = build_criterion(cfg.loss, cfg.model, num_classes=num_classes, global_dim=model.global_dim)
    return loss_balance(model, criterion, images, labels)


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f} M"


@app.command("model-info")
def model_info_cmd(
    model: Path = typer.Argument(..., help="A config (e.g. configs/mhsanet/market1501.yaml; no weights needed), a run "
                                 "folder or a checkpoint."),
    overrides: Optional[List[str]] = typer.Argument(None, help="KEY=VALUE overrides, e.g. model.mhsanet.num_heads=6."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help=CHECKPOINT_HELP + " Only its class count is read."),
    num_classes: Optional[int] = typer.Option(
        None, "--num-classes", help="Identities the classifiers are sized for (default: the checkpoint's, else 751 "
        "as in Market-1501)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    losses: bool = typer.Option(False, "--losses", help="Also each loss term's value and gradient norm at the backbone "
                                "output for one synthetic batch at initialisation."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images in the --losses batch (P x data.num_instances)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the --losses weights and images."),
) -> None:
    """Parameters (total and without classifiers), multiply-accumulates, test feature size, attention grid."""
    source = resolve_model(model, overrides, checkpoint, need_weights=False)
    cfg = source.cfg
    if num_classes is None:
        num_classes = _checkpoint_classes(source.checkpoint) if source.checkpoint is not None else 751
    info = model_info(cfg, num_classes)
    if losses:
        info["losses"] = loss_info(cfg, num_classes, batch_size, seed)
        info["losses_batch"] = batch_size
    if as_json:
        print_json(info)
        return
    h, w = info["input_size"]
    backbone = f" ({info['backbone']})" if info["backbone"] else ""
    print(f"model            {info['model']}{backbone}, input {h}x{w}, {num_classes} classes")
    print(f"parameters       {_millions(info['params'])} ({info['params']:,})")
    print(f"  no classifiers {_millions(info['params_no_classifier'])} ({info['params_no_classifier']:,})")
    print(f"MACs (1 image)   {info['macs'] / 1e9:.2f} G ({info['macs']:,})")
    print(f"test feature     {info['feature_dim']}-d")
    if "attention_grid" in info:
        print(f"attention grid   {info['attention_grid']}")
    if losses:
        _print_losses(info["losses"], batch_size)


def _checkpoint_classes(path: Path) -> int:
    from attnreid.engine.checkpoint import load_checkpoint
    from attnreid.errors import CheckpointError

    n = load_checkpoint(path).get("num_classes")
    if not isinstance(n, int):
        raise CheckpointError(f"checkpoint {path} does not record 'num_classes'; pass --num-classes")
    return n


def _print_losses(rows: list, batch_size: int) -> None:
    from attnreid.losses.balance import MAX_GRAD_RATIO  # torch: imported when the command runs, not for --help

    print(f"\nloss terms at a random initialisation ({batch_size} random images; gradient of weight x term at the "
          "backbone output)")
    print(f"  {'term':<10} {'weight':>8} {'value':>11} {'grad norm':>11} {'x largest CE':>13}")
    for r in rows:
        ratio = "-" if r["ratio_to_ce"] is None else f"{r['ratio_to_ce']:.3g}"
        flag = "  <- above the guard" if (r["ratio_to_ce"] or 0) > MAX_GRAD_RATIO else ""
        print(f"  {r['name']:<10} {r['weight']:>8g} {r['value']:>11.4g} {r['grad_norm']:>11.3g} {ratio:>13}{flag}")
