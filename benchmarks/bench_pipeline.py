"""Where the training time goes: MHSA-Net vs the Baseline in the real data pipeline.

Issue 17 reported, for ResNet-18 at 128x64 with 2 loader workers on real JPEGs, MHSA-Net
at 31.7 img/s against the Baseline's 74.9, while on random tensors the two differ by 6 %.
On the real Market-1501 zip (``--root``, read in place), for each model this measures:

- ``pipeline``: the trainer's own step fed by the real loader (``--workers`` processes
  decoding JPEGs from the zip), with 1 and with 2 torch threads; wall-clock images/s and
  the main process's CPU seconds per step (spinning OpenMP threads count as CPU time);
- ``cached``: the same step on real batches held in memory (no loader running);
- ``random``: the same step on random tensors (1 thread);
- ``cpu_ms`` / ``parts_ms``: CPU time of one step at 1 thread (the arithmetic, which
  other jobs on the machine do not change much) and its split into forward, each loss
  term, backward and optimiser step;
- ``ops``: aten operators run per training step (each is a parallel region when threads > 1);
- ``subnormal``: the share of subnormal floats in the attention, embeddings and gradients.

The (model, threads) cells are timed in interleaved rounds so that they share the
machine's load. ``python benchmarks/bench_pipeline.py --root DATA`` (a folder holding the Market-1501 zip) writes
benchmarks/results/train_pipeline.json with the machine record.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from attnreid.config import load_config
from attnreid.data.datasets import build_dataset_from_config
from attnreid.data.loader import build_train_loader
from attnreid.engine.optim import build_optimizers
from attnreid.engine.trainer import TrainState, train_step
from attnreid.losses import build_criterion
from attnreid.models import build_model

from _machine import machine_record

RESULTS = Path(__file__).resolve().parent / "results"


class Setup:
    """One model with its optimiser, loader and a few cached real batches."""

    def __init__(self, name: str, root: Path, batch: int, workers: int, cached: int):
        self.name = name
        self.cfg = load_config(None, [f"model.name={name}", "model.backbone.name=resnet18",
                                      "model.backbone.pretrained=false", "data.dataset=market1501",
                                      f"data.root={root}", "data.height=128", "data.width=64",
                                      f"data.batch_size={batch}", "data.num_instances=4", f"data.workers={workers}"])
        dataset = build_dataset_from_config(self.cfg.data)
        self.classes = dataset.num_train_pids
        self.loader = build_train_loader(self.cfg.data, dataset, seed=0)
        torch.manual_seed(0)
        self.model = build_model(self.cfg.model, self.classes).train()
        self.criterion = build_criterion(self.cfg.loss, self.cfg.model)
        self.optimizers = build_optimizers(self.cfg.optim, self.cfg.loss, self.model, self.criterion)
        self.epoch = 0
        self.it = iter(self.loader)
        self.cached = [self.next_batch() for _ in range(cached)]
        self.noise = [(torch.randn_like(x), y) for x, y in self.cached[:1]]
        self.k = 0

    def next_batch(self):
        try:
            b = next(self.it)
        except StopIteration:
            self.epoch += 1
            self.loader.batch_sampler.set_epoch(self.epoch)
            self.it = iter(self.loader)
            b = next(self.it)
        return b[0], torch.as_tensor(b[1])

    def from_cache(self):
        self.k += 1
        return self.cached[self.k % len(self.cached)]

    def steps(self, feed, n: int) -> dict:
        state = TrainState()
        wall = data = 0.0
        cpu0 = time.process_time()
        t_prev = time.perf_counter()
        for _ in range(n):
            x, y = feed()
            t_data = time.perf_counter()
            train_step(self.model, self.criterion, self.optimizers, x, y, nullcontext, None, 0.0, state)
            t_end = time.perf_counter()
            data += t_data - t_prev
            wall += t_end - t_prev
            t_prev = t_end
        return {"wall_s": wall, "data_s": data, "cpu_s": time.process_time() - cpu0, "steps": n,
                "images": n * self.cfg.data.batch_size}


def summary(acc: dict) -> dict:
    return {"img_per_s": round(acc["images"] / acc["wall_s"], 2), "s_per_step": round(acc["wall_s"] / acc["steps"], 3),
            "cpu_s_per_step": round(acc["cpu_s"] / acc["steps"], 3),
            "data_wait_share": round(acc["data_s"] / acc["wall_s"], 4), "steps": acc["steps"]}


def parts(s: Setup, repeats: int) -> dict:
    """Mean CPU ms of forward, each loss term, backward and optimiser step (1 thread)."""
    acc: dict = {}

    def add(key, t0):
        acc[key] = acc.get(key, 0.0) + (time.process_time() - t0) * 1000 / repeats

    for _ in range(repeats):
        x, y = s.from_cache()
        t0 = time.process_time()
        out = s.model(x)
        add("forward", t0)
        total = None
        for name, weight, fn in s.criterion.terms:
            t0 = time.process_time()
            v = fn(out, y)
            add(f"loss_{name}", t0)
            total = weight * v if total is None else total + weight * v
        s.optimizer.zero_grad(set_to_none=True)
        t0 = time.process_time()
        total.backward()
        add("backward", t0)
        t0 = time.process_time()
        s.optimizer.step()
        add("optimizer", t0)
    return {k: round(v, 1) for k, v in acc.items()}


def count_ops(s: Setup) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        s.steps(s.from_cache, 1)
    return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))


def subnormal_share(s: Setup) -> dict:
    x, y = s.from_cache()
    out = s.model(x)
    for key in ("alpha", "P"):
        if key in out:
            out[key].retain_grad()
    total, _ = s.criterion(out, y)
    s.model.zero_grad(set_to_none=True)
    total.backward()
    tiny = torch.finfo(torch.float32).tiny

    def share(t):
        t = t.detach().float()
        return float(((t != 0) & (t.abs() < tiny)).float().mean())

    res = {"weight_grads": share(torch.cat([p.grad.flatten() for p in s.model.parameters() if p.grad is not None]))}
    for key in ("alpha", "P"):
        if key in out:
            res[key], res[f"{key}_grad"] = share(out[key]), share(out[key].grad)
    s.optimizer.zero_grad(set_to_none=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True, help="folder holding the Market-1501 zip (or folder)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    ap.add_argument("--steps", type=int, default=2, help="timed steps per cell and round")
    ap.add_argument("--threads", default="1,2", help="torch thread counts to compare")
    ap.add_argument("--out", type=Path, default=RESULTS / "train_pipeline.json")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    load_before = [round(v, 2) for v in os.getloadavg()]
    setups = [Setup(n, args.root, args.batch, args.workers, cached=2) for n in ("baseline", "mhsanet")]
    torch.set_num_threads(1)
    for s in setups:  # warm-up: first-step allocations, optimiser state, worker start-up
        s.steps(s.next_batch, 1)
        s.steps(s.from_cache, 1)
    cells = {(s.name, kind, t): None for s in setups for kind in ("pipeline", "cached") for t in threads}
    for r in range(args.rounds):
        for s in (setups if r % 2 == 0 else setups[::-1]):
            for t in (threads if r % 2 == 0 else threads[::-1]):
                torch.set_num_threads(t)
                for kind, feed in (("pipeline", s.next_batch), ("cached", s.from_cache)):
                    got = s.steps(feed, args.steps)
                    old = cells[(s.name, kind, t)]
                    cells[(s.name, kind, t)] = got if old is None else {k: old[k] + got[k] for k in got}
    torch.set_num_threads(1)
    rows = []
    for s in setups:
        row = {"model": s.name, "classes": s.classes, "loss_terms": [n for n, _, _ in s.criterion.terms],
               "params": sum(p.numel() for p in s.model.parameters())}
        for kind in ("pipeline", "cached"):
            for t in threads:
                row[f"{kind}_threads{t}"] = summary(cells[(s.name, kind, t)])
        row["random_threads1"] = summary(s.steps(lambda: s.noise[0], args.steps))
        row["parts_cpu_ms_threads1"] = parts(s, repeats=args.steps)
        row["ops_per_step"] = count_ops(s)
        row["subnormal"] = subnormal_share(s)
        rows.append(row)
        print(json.dumps(row))
    out = {"command": f"python benchmarks/bench_pipeline.py --root {args.root} --batch {args.batch} "
                      f"--workers {args.workers} --rounds {args.rounds} --steps {args.steps} --threads {args.threads}",
           "input": [128, 64], "backbone": "resnet18 (random init, last stride 1)", "batch": args.batch,
           "workers": args.workers, "load_average_before": load_before,
           "load_average_after": [round(v, 2) for v in os.getloadavg()], "rows": rows, "machine": machine_record()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
