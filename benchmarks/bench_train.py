"""Training throughput (images/s) of MHSA-Net (ResNet-50, 384x128) and HA-CNN (160x64).

Runs the trainer's own step (:func:`attnreid.engine.trainer.train_step`) on PK batches
from the real data pipeline (synthetic set, JPEG decoding and transforms in DataLoader
workers) and reports images/s and the share of step time spent waiting for data. The
first ``--warmup`` steps are not timed. On a machine with CUDA it also runs the GPU path
(bf16 autocast, channels_last).

    python benchmarks/bench_train.py [--steps 4] [--batch 32] [--workers 2] [--threads N] [--models hacnn_160x64]

Writes benchmarks/results/train_cpu.json (and train_cuda.json on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from attnreid.config import load_config
from attnreid.data.datasets import build_dataset_from_config
from attnreid.data.loader import build_train_loader
from attnreid.engine.optim import build_optimizer
from attnreid.engine.trainer import TrainState, train_step
from attnreid.losses import build_criterion
from attnreid.models import build_model

RESULTS = Path(__file__).resolve().parent / "results"

MODELS = {
    "mhsanet_resnet50_384x128": ["model.name=mhsanet", "model.backbone.name=resnet50", "model.backbone.pretrained=false",
                                 "data.height=384", "data.width=128", "data.flip=true"],
    "hacnn_160x64": ["model.name=hacnn", "data.height=160", "data.width=64", "data.flip=false"],
}


def bench(name: str, overrides, root: Path, device: torch.device, steps: int, warmup: int, batch: int,
          workers: int) -> dict:
    cfg = load_config(None, [f"data.root={root}", "data.dataset=synthetic", "data.synthetic.num_ids=40",
                             "data.synthetic.images_per_id=8", f"data.batch_size={batch}", "data.num_instances=4",
                             f"data.workers={workers}", *overrides])
    dataset = build_dataset_from_config(cfg.data)
    loader = build_train_loader(cfg.data, dataset, seed=0)
    model = build_model(cfg.model, dataset.num_train_pids).to(device)
    criterion = build_criterion(cfg.loss, cfg.model).to(device)
    cuda = device.type == "cuda"
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg.optim, [model, criterion])
    params = [p for g in optimizer.param_groups for p in g["params"]]
    model.train()

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext()

    state = TrainState()
    load_before = list(os.getloadavg())
    data_s = step_s = 0.0
    images = 0
    timed = 0
    epoch = 0
    it = None
    t_prev = time.perf_counter()
    for i in range(warmup + steps):
        if it is None:
            loader.batch_sampler.set_epoch(epoch)
            it = iter(loader)
        try:
            batch_ = next(it)
        except StopIteration:
            epoch, it = epoch + 1, None
            loader.batch_sampler.set_epoch(epoch)
            it = iter(loader)
            batch_ = next(it)
        t_data = time.perf_counter()
        x = batch_[0].to(device, non_blocking=True)
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.as_tensor(batch_[1]).to(device)
        train_step(model, criterion, optimizer, x, y, autocast, None, 0.0, params, state)
        if cuda:
            torch.cuda.synchronize()
        t_end = time.perf_counter()
        if i >= warmup:
            data_s += t_data - t_prev
            step_s += t_end - t_prev
            images += x.shape[0]
            timed += 1
        t_prev = t_end
    return {"model": name, "device": str(device), "batch": batch, "steps_timed": timed, "workers": workers,
            "img_per_s": round(images / step_s, 2), "seconds_per_step": round(step_s / timed, 3),
            "data_wait_share": round(data_s / step_s, 4), "input": [cfg.data.height, cfg.data.width],
            "amp": "bf16" if cuda else "off", "channels_last": cuda, "threads": torch.get_num_threads(),
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in os.getloadavg()]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of: " + ", ".join(MODELS))
    ap.add_argument("--root", type=Path, default=None, help="where to generate the synthetic set (default: a temp dir)")
    args = ap.parse_args()
    root = args.root or Path(tempfile.mkdtemp(prefix="bench_train_"))
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    names = [n for n in args.models.split(",") if n]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; expected: {', '.join(MODELS)}")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    RESULTS.mkdir(parents=True, exist_ok=True)
    for device in devices:
        batch = args.batch if device.type == "cpu" else max(args.batch, 64)
        rows = [bench(n, MODELS[n], root, device, args.steps, args.warmup, batch, args.workers) for n in names]
        for r in rows:
            print(f"{r['model']:28s} {r['device']:5s} batch {r['batch']:3d}: {r['img_per_s']:8.2f} img/s, "
                  f"{100 * r['data_wait_share']:.1f}% of step time waiting for data")
        out = {"rows": rows, "torch": torch.__version__, "threads": torch.get_num_threads(),
               "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()), "machine": platform.machine(),
               "note": ("CPU numbers from a 2-core machine shared with other jobs (see load_average); "
                        "random-init weights, synthetic images resized to the paper input sizes.")}
        if device.type == "cuda":
            out["gpu"] = torch.cuda.get_device_name(0)
        name = "train_cpu.json" if device.type == "cpu" else "train_cuda.json"
        (RESULTS / name).write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {RESULTS / name}")


if __name__ == "__main__":
    main()
