"""Benchmark: MHSA-Net's loss terms at initialisation, and whether FDRT and ACM act at all.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_loss_balance.py [--threads 1]

For each setting (the shipped defaults, ``configs/mhsanet/paper_literal.yaml`` = the
literal reading and this project's defaults before issue 20, and the authors' FDRT/ACM
forms, and Table IX's CONCAT fusion) and each scale (ResNet-50 at 384x128, the paper's; ResNet-18 at 128x64, the CPU
recipe's), one batch of 32 random images (8 identities x 4) through a randomly
initialised MHSA-Net (K = 8, 751 classes):

- :func:`attnreid.losses.balance.loss_balance`: every term's value and the norm of the
  gradient of weight x term at the backbone output, and its ratio to the largest CE's;
- ||p*||, ||z||; the attention grid J, min / mean alpha, the share of alpha below ACM's
  threshold, and lambda x FDRT (what FDRT adds to the loss).

Writes ``benchmarks/results/loss_balance.json`` with ``machine_record()``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

SETTINGS = {
    "defaults": ("configs/mhsanet/market1501.yaml", []),
    "paper_literal": ("configs/mhsanet/paper_literal.yaml", []),
    "authors_fdrt_acm": ("configs/mhsanet/market1501.yaml",
                         ["loss.fdrt_form=gram", "loss.acm_form=linear", "loss.acm_gamma=0.01", "loss.lambda_acm=1e-4"]),
    "fusion_concat": ("configs/mhsanet/occluded_duke_star_concat.yaml", []),
}
SCALES = {
    "resnet50_384x128": ["model.backbone.name=resnet50", "data.height=384", "data.width=128"],
    "resnet18_128x64": ["model.backbone.name=resnet18", "data.height=128", "data.width=64"],
}


def measure(config: str, overrides: list, batch: int = 32, num_instances: int = 4, seed: int = 0) -> dict:
    from attnreid.config import load_config
    from attnreid.losses import build_criterion
    from attnreid.losses.balance import loss_balance
    from attnreid.losses.regularizers import feature_diversity
    from attnreid.models import build_model

    cfg = load_config(REPO / config, ["model.backbone.pretrained=false"] + overrides)
    torch.manual_seed(seed)
    model = build_model(cfg.model, 751)
    images = torch.randn(batch, 3, cfg.data.height, cfg.data.width, generator=torch.Generator().manual_seed(seed))
    labels = torch.arange(batch // num_instances).repeat_interleave(num_instances)
    t0 = time.perf_counter()
    rows = loss_balance(model, build_criterion(cfg.loss, cfg.model), images, labels)
    seconds = time.perf_counter() - t0
    model.train()
    with torch.no_grad():
        out = model(images)
    alpha = out["alpha"]
    gamma = cfg.loss.acm_gamma
    return {
        "config": config, "overrides": overrides, "seconds": round(seconds, 2),
        "terms": rows,
        "p_star_norm": float(out["p_star"].norm(dim=1).mean()),
        "z_norm": float(out["z"].norm(dim=1).mean()),
        "attention_positions_J": int(alpha.shape[2]),
        "alpha_min": float(alpha.min()), "alpha_mean": float(alpha.mean()),
        "acm_form": cfg.loss.acm_form, "acm_gamma": gamma,
        "alpha_below_gamma": float((alpha < gamma).float().mean()),
        "fdrt_form": cfg.loss.fdrt_form,
        "fdrt_weighted": cfg.loss.lambda_fdrt * float(feature_diversity(out["P"], cfg.loss.fdrt_form)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "loss_balance.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from _machine import machine_record

    results = {"machine": machine_record(), "batch": "32 random images, 8 ids x 4, 751 classes, K = 8, seed 0",
               "runs": {}}
    for scale, scale_over in SCALES.items():
        for name, (config, over) in SETTINGS.items():
            key = f"{name}@{scale}"
            results["runs"][key] = measure(config, scale_over + over)
            r = results["runs"][key]
            worst = max(r["terms"], key=lambda t: t["ratio_to_ce"] or 0.0)
            print(f"{key}: worst {worst['name']} {worst['ratio_to_ce']:.3g}x CE, ||z|| {r['z_norm']:.1f}, "
                  f"alpha<gamma {r['alpha_below_gamma']:.3f}, lambda*FDRT {r['fdrt_weighted']:.2g} ({r['seconds']} s)",
                  flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
