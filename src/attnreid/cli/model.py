"""`attnreid model-info`: size, cost and output shapes of the model a config builds."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from attnreid.cli._app import app
from attnreid.cli._util import print_json


def model_info(cfg, num_classes: int = 751) -> dict:
    """Parameters, MACs for one image at ``cfg.data`` size, test feature size and attention grid.

    Inspecting a model never needs its weights: the network is built on torch's ``meta``
    device (shapes without storage) with the backbone's ImageNet weights switched off, so
    this runs offline, allocates nothing and takes well under a second even for ResNet-50.
    """
    import copy

    import torch

    from attnreid.models import build_model
    from attnreid.models.complexity import count_macs, count_params

    model_cfg = copy.deepcopy(cfg.model)
    model_cfg.backbone.pretrained = False
    model_cfg.backbone.weights = None
    with torch.device("meta"):
        model = build_model(model_cfg, num_classes)
    size = (cfg.data.height, cfg.data.width)
    info = {
        "model": model.model_name,
        "backbone": cfg.model.backbone.name if model.model_name != "hacnn" else None,
        "input_size": list(size),
        "num_classes": num_classes,
        "params": count_params(model),
        "params_no_classifier": count_params(model, exclude_classifiers=True),
        "macs": count_macs(model, size),
        "feature_dim": model.feature_dim,
    }
    if model.model_name != "baseline":
        model.eval()
        with torch.no_grad():
            att = model.forward_attention(torch.zeros(1, 3, *size, device="meta"))
        if "attention" in att:
            info["attention_grid"] = list(att["attention"].shape[-2:])
        elif "soft_attention" in att:
            info["attention_grid"] = [list(a.shape[-2:]) for a in att["soft_attention"]]
    return info


def _millions(n: int) -> str:
    return f"{n / 1e6:.2f} M"


@app.command("model-info")
def model_info_cmd(
    config: Path = typer.Argument(..., help="YAML config (e.g. configs/mhsanet/market1501.yaml)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="KEY=VALUE overrides, e.g. model.mhsanet.num_heads=6."),
    num_classes: int = typer.Option(751, "--num-classes", help="Identities the classifiers are sized for (Market-1501: 751)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Parameters (total and without classifiers), multiply-accumulates, test feature size, attention grid."""
    from attnreid.config import load_config

    info = model_info(load_config(config, list(overrides or [])), num_classes)
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
