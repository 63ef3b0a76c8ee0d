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

With ``--trajectory STEPS`` it also trains the CPU recipe (``configs/cpu/market1501_mhsanet.yaml``,
ResNet-18 at 128x64, 751 - 50 training identities of the real Market-1501) for STEPS
optimiser steps and measures the same balance on one fixed batch of 32 training images
(8 identities x 4) at a few steps along the way: how the ratio to the CE terms moves once
the classifiers (initialised at std 0.001, as BoT and the authors' code do) start to learn.
The probe's forward runs in train mode, so the model's BatchNorm statistics are saved
before and restored after each probe.

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
from _data import DATA_ROOT  # noqa: E402

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


def trajectory(steps: int, root: str, threads: int) -> dict:
    """Loss balance of the CPU recipe on a fixed batch of real training images along ``steps`` training steps."""
    from attnreid.config import load_config
    from attnreid.engine.hooks import Hook
    from attnreid.engine.trainer import train
    from attnreid.losses.balance import loss_balance, worst_ratio

    config = "configs/cpu/market1501_mhsanet.yaml"
    # enough epochs for any epoch length: the probe stops the run after `steps` steps, and the
    # recipe's schedule is set in epochs, so it is the same whatever the total
    overrides = [f"data.root={root}", f"train.threads={threads}", "train.device=cpu", "train.eval_every=0",
                 f"train.epochs={steps}", "eval.datasets=[]"]
    cfg = load_config(REPO / config, overrides)
    probe_at = sorted({0, 5, 10, 25, 50, 100, 150, 200, steps} & set(range(steps + 1)))
    rows_at: dict = {}

    class BalanceProbe(Hook):
        def before_train(self, state):
            images, pids = next(iter(self.trainer.loader))[:2]
            self.batch = (images, pids)
            self.probe(0)

        def after_step(self, state):
            if state.step in probe_at:
                self.probe(state.step)
            if state.step >= steps:
                state.stop = "probe steps done"

        def probe(self, step):
            model = self.trainer.model
            buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
            rows = loss_balance(model, self.trainer.criterion, *self.batch)
            model.load_state_dict(buffers, strict=False)
            rows_at[step] = rows
            top = max(rows, key=lambda r: r["ratio_to_ce"] or 0.0)
            print(f"step {step}: worst {top['name']} {worst_ratio(rows):.3g}x the largest CE term's", flush=True)

    import copy
    import tempfile

    from attnreid.data.datasets import build_dataset_from_config

    dataset = build_dataset_from_config(cfg.data)
    small = copy.copy(dataset)  # the run's closing evaluation is not what is measured: keep it short
    small.query = dataset.query[:50]
    keep = {item[1] for item in small.query}
    small.gallery = [item for item in dataset.gallery if item[1] in keep] + dataset.gallery[:200]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        train(cfg, Path(tmp) / "run", overwrite=True, hooks=[BalanceProbe()], quiet=True, dataset=dataset,
              eval_dataset=small)
    ratios = {str(step): {r["name"]: round(r["ratio_to_ce"], 2) for r in rows if r["ratio_to_ce"] is not None}
              for step, rows in sorted(rows_at.items())}
    return {"config": config, "overrides": overrides, "batch": "32 Market-1501 training images, 8 ids x 4",
            "seconds": round(time.perf_counter() - t0, 1), "ratio_to_largest_ce_by_step": ratios,
            "worst_ratio_by_step": {str(step): round(worst_ratio(rows), 2) for step, rows in sorted(rows_at.items())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "loss_balance.json")
    parser.add_argument("--trajectory", type=int, default=0, metavar="STEPS",
                        help="also train the CPU recipe for STEPS steps on Market-1501 and probe the balance on the way")
    parser.add_argument("--trajectory-only", action="store_true", help="keep the file's other runs, redo only the trajectory")
    parser.add_argument("--root", default=str(DATA_ROOT), help="data root holding Market-1501 ($ATTNREID_DATA)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from _machine import machine_record

    if args.trajectory_only:
        results = json.loads(args.out.read_text())
        results["trajectory"] = {**trajectory(args.trajectory, args.root, args.threads), "machine": machine_record()}
        args.out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")
        return

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
    if args.trajectory:
        results["trajectory"] = trajectory(args.trajectory, args.root, args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
