"""Training throughput (images/s): float32 vs bf16 autocast, eager vs torch.compile, on this CPU.

Runs the trainer's own step (:func:`attnreid.engine.trainer.train_step`: forward under
autocast, each model's criterion in float32, backward, optimiser step) on PK batches
from the real data pipeline (synthetic set, JPEG decoding and transforms in DataLoader
workers) and reports images/s and the share of step time spent waiting for data. The
first ``--warmup`` steps are not timed (with torch.compile they include the compilation,
reported as ``compile_s``: the warm-up steps' time minus as many steady steps). The
compiled network is the one ``train.compile=on`` builds
(:func:`attnreid.engine.compiled.compile_for_training`). Random weights. Every row
carries ``machine_record()`` taken in its own process (CPU model and flags, threads,
load average) and the load average before and after its steps.

Models (``--models``):

- ``baseline_resnet18_128x64``, ``mhsanet_resnet18_k8_128x64``, ``hacnn_160x64``,
  ``mhsanet_resnet50_256x128``: the precision table (issue 13), channels_last on;
- ``mhsanet_resnet50_384x128``, ``hacnn_160x64`` with ``--no-channels-last --amps off``:
  the earlier float32 rows (paper input sizes, NCHW);
- ``baseline_mobilenetv2_256x128_frozen{-1,2,3}``, ``mhsanet_mobilenetv2_256x128_frozen3``: the
  ImageNet-initialised CPU recipes' network with 0, 2 and 3 stages frozen (``--batch 64`` is the recipes').

``--amps`` takes ``off``, ``bf16`` and ``bf16-guard``: bf16 with the bf16 kernel-fault
guard of ``train()`` (engine/amp_guard.py): the one-off layer check at the start, timed
separately as ``layer_check_s``, then timed steps that alternate between guarded (the
per-step check and its snapshots) and plain bf16 steps, reported in ``paired`` (issue 25:
the guard must cost at most 10 % of bf16's speed). ``--repeat N`` runs the
list of variants N times in turn (A B A B ...), so that variants compared with each other
see the same load on a shared machine.

Every variant (model x amp x compile) runs in its own subprocess with a time limit, so a
compilation that takes longer than the machine allows is recorded as such. Rows of
variants not re-measured are kept from the existing result file, each with the machine
it came from.

    python benchmarks/bench_train.py [--steps 4] [--batch 32] [--threads 2] [--amps off,bf16,bf16-guard] [--compile]
                                     [--repeat N]
    python benchmarks/bench_train.py --quick     # a self-check in about a minute: writes scratch/train_cpu_quick.json

Writes benchmarks/results/train_cpu.json (``--out``; and train_cuda.json on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _machine import machine_record

RESULTS = Path(__file__).resolve().parent / "results"
SCRATCH = Path(__file__).resolve().parent.parent / "scratch"
UNRECORDED = "unrecorded (an earlier machine of this kind)"

MODELS = {
    "baseline_resnet18_128x64": ["model.name=baseline", "model.backbone.name=resnet18",
                                 "model.backbone.pretrained=false", "data.height=128", "data.width=64"],
    "mhsanet_resnet18_k8_128x64": ["model.name=mhsanet", "model.backbone.name=resnet18",
                                   "model.backbone.pretrained=false", "model.mhsanet.num_heads=8",
                                   "data.height=128", "data.width=64"],
    "hacnn_160x64": ["model.name=hacnn", "data.height=160", "data.width=64", "data.flip=false"],
    "mhsanet_resnet50_256x128": ["model.name=mhsanet", "model.backbone.name=resnet50",
                                 "model.backbone.pretrained=false", "data.height=256", "data.width=128"],
    "mhsanet_resnet50_384x128": ["model.name=mhsanet", "model.backbone.name=resnet50",
                                 "model.backbone.pretrained=false", "data.height=384", "data.width=128",
                                 "data.flip=true"],
}
# The ImageNet-initialised CPU recipes' backbone (configs/cpu/market1501_*_mobilenetv2.yaml): how much freezing the
# early stages buys (random weights: the speed does not depend on them).
_MNV2 = ["model.backbone.name=mobilenetv2", "model.backbone.pretrained=false", "model.backbone.last_stride=1",
         "data.height=256", "data.width=128"]
for _k in (-1, 2, 3):
    MODELS[f"baseline_mobilenetv2_256x128_frozen{_k}"] = ["model.name=baseline", *_MNV2,
                                                         f"model.backbone.frozen_stages={_k}"]
MODELS["mhsanet_mobilenetv2_256x128_frozen3"] = ["model.name=mhsanet", *_MNV2, "model.backbone.frozen_stages=3"]
TABLE = ["baseline_resnet18_128x64", "mhsanet_resnet18_k8_128x64", "hacnn_160x64", "mhsanet_resnet50_256x128"]
COMPILE_MODELS = ["baseline_resnet18_128x64", "mhsanet_resnet18_k8_128x64", "mhsanet_resnet50_256x128"]


def load() -> list:
    return [round(v, 2) for v in os.getloadavg()]


def bench(name: str, root: Path, device: torch.device, steps: int, warmup: int, batch: int, workers: int,
          amp: str, channels_last: bool, compile_: bool) -> dict:
    from attnreid.config import load_config
    from attnreid.data.datasets import build_dataset_from_config
    from attnreid.data.loader import build_train_loader
    from attnreid.engine.amp_guard import AmpGuard
    from attnreid.engine.compiled import compile_for_training
    from attnreid.engine.optim import build_optimizers
    from attnreid.engine.trainer import TrainState, train_step
    from attnreid.losses import build_criterion
    from attnreid.models import build_model
    from attnreid.precision import resolve_precision

    cfg = load_config(None, [f"data.root={root}", "data.dataset=synthetic", "data.synthetic.num_ids=40",
                             "data.synthetic.images_per_id=8", f"data.batch_size={batch}", "data.num_instances=4",
                             f"data.workers={workers}", *MODELS[name]])
    dataset = build_dataset_from_config(cfg.data)
    loader = build_train_loader(cfg.data, dataset, seed=0)
    torch.manual_seed(0)
    model = build_model(cfg.model, dataset.num_train_pids).to(device)
    criterion = build_criterion(cfg.loss, cfg.model).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizers = build_optimizers(cfg.optim, cfg.loss, model, criterion)
    model.train()
    net = compile_for_training(model, "on" if compile_ else "off", device, quiet=True)
    guarded = amp.endswith("-guard")
    precision = resolve_precision(amp.removesuffix("-guard"), device)
    guard = AmpGuard(precision, check=guarded)
    guard.attach(model, [criterion])
    check_s = check_cpu_s = None
    if guarded:  # what train() does before its first step
        t0, c0 = time.perf_counter(), time.process_time()
        guard.check_layers((batch, 3, cfg.data.height, cfg.data.width), channels_last, device)
        check_s, check_cpu_s = round(time.perf_counter() - t0, 2), round(time.process_time() - c0, 2)
    plain = lambda step: step(precision.autocast, None)  # noqa: E731

    state = TrainState()
    load_before = load()
    data_s = step_s = warm_s = 0.0
    images = timed = epoch = 0
    cpu_s = 0.0  # this process's CPU time in the timed steps (data loading excluded)
    paired = {True: [0, 0.0, 0.0], False: [0, 0.0, 0.0]}  # guarded variant: images, wall s, CPU s of guarded / plain
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
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.as_tensor(batch_[1]).to(device)
        # The guarded variant alternates guarded and plain steps, so that the two are timed
        # under the same load (a shared machine's load drifts between variants).
        use_guard = guarded and i % 2 == 0
        t_step, c_step = time.perf_counter(), time.process_time()
        (guard.run_step if use_guard else plain)(
            lambda autocast, check: train_step(net, criterion, optimizers, x, y, autocast, None, 0.0, state,
                                               check=check))
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_end, c_end = time.perf_counter(), time.process_time()
        if i >= warmup and guarded:
            paired[use_guard][0] += x.shape[0]
            paired[use_guard][1] += t_end - t_step
            paired[use_guard][2] += c_end - c_step
        if i >= warmup:
            cpu_s += c_end - c_step
            data_s += t_data - t_prev
            step_s += t_end - t_prev
            images += x.shape[0]
            timed += 1
        else:
            warm_s += t_end - t_prev
        t_prev = t_end
    row = {"model": name, "device": str(device), "batch": batch, "steps_timed": timed, "workers": workers,
           "img_per_s": round(images / step_s, 2), "seconds_per_step": round(step_s / timed, 3),
           "data_wait_share": round(data_s / step_s, 4), "input": [cfg.data.height, cfg.data.width],
           # images per second of this process's CPU time in the steps: on a saturated shared machine
           # (wall time several times the CPU time) the better estimate of an idle machine's speed
           # with one thread
           "cpu_img_per_s": round(images / max(cpu_s, 1e-9), 2), "cpu_s_per_step": round(cpu_s / timed, 3),
           "amp": amp.removesuffix("-guard"), "guard": guarded, "precision": precision.describe(), "channels_last": channels_last, "compile": compile_,
           "threads": torch.get_num_threads(), "load_average_before": load_before, "load_average_after": load(),
           "warmup_steps": warmup}
    if guarded:
        with_, without = (paired[k][0] / max(paired[k][1], 1e-9) for k in (True, False))
        cpu_with, cpu_without = (paired[k][0] / max(paired[k][2], 1e-9) for k in (True, False))
        row.update(layer_check_s=check_s, layer_check_cpu_s=check_cpu_s, float32_layers=list(guard.pinned), faults=guard.faults,
                   paired={"guarded_img_per_s": round(with_, 2), "plain_img_per_s": round(without, 2),
                           "ratio": round(with_ / without, 3), "cpu_guarded_img_per_s": round(cpu_with, 2),
                           "cpu_plain_img_per_s": round(cpu_without, 2), "cpu_ratio": round(cpu_with / cpu_without, 3),
                           "steps_each": timed // 2,
                           "note": "alternating guarded and plain bf16 steps in one process (data wait excluded), "
                                   "by wall time and by this process's CPU time; img_per_s above mixes both"})
    if compile_:
        row["compile_s"] = round(warm_s - warmup * step_s / timed, 1)  # warm-up steps minus their steady cost
    row["loaded"] = max(row["load_average_before"][0], row["load_average_after"][0]) > 1
    row["machine"] = machine_record()
    return row


def key(r: dict) -> tuple:
    return (r["model"], r["device"], r.get("amp", "off"), bool(r.get("guard")), bool(r.get("channels_last")),
            bool(r.get("compile")), r.get("repeat", 0))


def ratios(rows: list) -> list:
    """bf16 (and compiled) images/s over eager float32 of the same model and layout, one line each."""
    lines = []
    def of(r, amp, guard=False):
        return (r["model"], bool(r.get("channels_last")), r.get("repeat", 0), amp, guard)

    base = {of(r, r.get("amp", "off"), bool(r.get("guard"))): r for r in rows
            if r.get("img_per_s") and not r.get("compile")}
    for r in rows:
        ref = base.get(of(r, "off"))
        if ref is None or r is ref or not r.get("img_per_s"):
            continue
        extra = f", compile {r['compile_s']} s" if r.get("compile") else ""
        plain = base.get(of(r, "bf16"))
        if r.get("guard") and r.get("paired"):
            extra += (f", guarded steps {r['paired']['ratio']:.3f}x (CPU time: {r['paired']['cpu_ratio']:.3f}x) "
                      f"the plain bf16 steps between them (layer check {r['layer_check_s']} s once)")
        elif r.get("guard") and plain is not None:
            extra += f", {r['img_per_s'] / plain['img_per_s']:.3f}x plain bf16 (layer check {r['layer_check_s']} s once)"

        lines.append(f"{r['model']:28s} amp={r['amp']:4s} guard={bool(r.get('guard'))!s:5s} "
                     f"compile={bool(r.get('compile'))!s:5s} repeat {r.get('repeat', 0)}: "
                     f"{r['img_per_s'] / ref['img_per_s']:.2f}x eager fp32{extra}")
    return lines


def run_variant(args, name: str, amp: str, compile_: bool, root: Path, repeat: int = 0) -> dict:
    row = _run_variant(args, name, amp, compile_, root)
    if args.repeat > 1:
        row["repeat"] = repeat
    return row


def _run_variant(args, name: str, amp: str, compile_: bool, root: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--models", name, "--amps", amp, "--root", str(root),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
           "--workers", str(args.workers), "--threads", str(args.threads)]
    if not args.channels_last:
        cmd.append("--no-channels-last")
    if compile_:
        cmd.append("--compile")
    limit = args.compile_limit if compile_ else args.limit
    start = load()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
        rows = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
        if rows:
            return rows[0]
        tail = [line for line in proc.stderr.strip().splitlines() if line.strip()][-3:]
        error = f"exit code {proc.returncode}: " + " | ".join(tail)
    except subprocess.TimeoutExpired:
        error = f"did not finish within {limit} s ({args.warmup} warm-up + {args.steps} timed steps)"
    return {"model": name, "device": "cpu", "batch": args.batch, "amp": amp.removesuffix("-guard"),
            "guard": amp.endswith("-guard"), "channels_last": args.channels_last,
            "compile": compile_, "img_per_s": None, "error": error[-1500:], "threads": args.threads,
            "load_average_before": start, "load_average_after": load(), "machine": machine_record()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--models", default=",".join(TABLE), help="comma-separated subset of: " + ", ".join(MODELS))
    ap.add_argument("--amps", default="off,bf16", help="comma-separated: off, bf16, bf16-guard")
    ap.add_argument("--repeat", type=int, default=1, help="run the list of variants this many times in turn")
    ap.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    ap.add_argument("--compile", action="store_true",
                    help="also torch.compile the step (models: " + ", ".join(COMPILE_MODELS) + ")")
    ap.add_argument("--compile-amps", default="off,bf16", help="the amps the compiled variants run with")
    ap.add_argument("--limit", type=int, default=900, help="seconds allowed to one eager variant")
    ap.add_argument("--compile-limit", type=int, default=600, help="seconds allowed to one compiled variant")
    ap.add_argument("--root", type=Path, default=None, help="where to generate the synthetic set (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=None,
                    help="result file (default: benchmarks/results/train_cpu.json; with --quick scratch/train_cpu_quick.json)")
    ap.add_argument("--quick", action="store_true",
                    help="self-check: Baseline ResNet-18 128x64, batch 8, 1 warm-up + 1 timed step, 1 thread, "
                         "no loader workers, fp32 and bf16 (compiled too with --compile); to scratch/")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.models, args.batch, args.steps, args.warmup = "baseline_resnet18_128x64", 8, 1, 1  # batch: 2 ids x K=4
        args.threads, args.workers = 1, 0
        args.out = args.out or SCRATCH / "train_cpu_quick.json"
    root = args.root or Path(tempfile.mkdtemp(prefix="bench_train_"))
    torch.set_num_threads(args.threads)
    names = [n for n in args.models.split(",") if n]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; expected: {', '.join(MODELS)}")
    amps = [a for a in args.amps.split(",") if a]
    if args.worker:  # one variant, in this process
        row = bench(names[0], root, torch.device("cpu"), args.steps, args.warmup, args.batch, args.workers, amps[0],
                    args.channels_last, args.compile)
        print("ROW " + json.dumps(row), flush=True)
        return
    if torch.cuda.is_available():  # the GPU path: bf16 autocast, channels_last, in this process
        rows = [bench(n, root, torch.device("cuda"), args.steps, args.warmup, max(args.batch, 64), args.workers,
                      "bf16", True, False) for n in names]
        (RESULTS / "train_cuda.json").write_text(json.dumps({"machine": {**machine_record(),
                                                 "gpu": torch.cuda.get_device_name(0)}, "rows": rows}, indent=2) + "\n")
    from attnreid.config import load_config
    from attnreid.data.datasets import build_dataset_from_config

    # generate the synthetic set once, before the variants' processes read it
    build_dataset_from_config(load_config(None, [f"data.root={root}", "data.dataset=synthetic",
                                                 "data.synthetic.num_ids=40", "data.synthetic.images_per_id=8"]).data)
    machine = machine_record()
    rows = []
    compile_amps = [a for a in args.compile_amps.split(",") if a]
    for n in names:
        for repeat in range(args.repeat):
            for compile_ in ([False, True] if args.compile and n in COMPILE_MODELS else [False]):
                for amp in (compile_amps if compile_ else amps):
                    r = run_variant(args, n, amp, compile_, root, repeat)
                    rows.append(r)
                    speed = f"{r['img_per_s']:8.2f} img/s" if r["img_per_s"] is not None else f"failed: {r['error']}"
                    print(f"{n:28s} amp={amp:10s} compile={compile_!s:5s} channels_last={args.channels_last!s:5s}"
                          f" repeat {repeat}: {speed}", flush=True)
    out_file = args.out or RESULTS / "train_cpu.json"
    kept = []
    if out_file.is_file() and not args.quick:
        old = json.loads(out_file.read_text())
        new_keys = {key(r) for r in rows}
        for r in old.get("rows", []):
            if key(r) not in new_keys:
                if not isinstance(r.get("machine"), dict):  # older files recorded the machine once, at the top
                    r["machine"] = old["machine"] if isinstance(old.get("machine"), dict) else UNRECORDED
                kept.append(r)
    out = {"machine": machine, "load_average_end": load(), "rows": kept + rows,
           "settings": {"steps": args.steps, "warmup": args.warmup, "batch": args.batch, "threads": args.threads,
                        "repeat": args.repeat,
                        "workers": args.workers, "channels_last": args.channels_last, "quick": args.quick},
           "note": ("CPU numbers from a 2-core machine shared with other jobs (each row's load_average; loaded = "
                    "1-minute load above 1); random-init weights, synthetic images resized to the input sizes. "
                    "Rows whose machine is not this file's were measured earlier and kept.")}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(out, indent=2) + "\n")
    print("\n".join(ratios(rows)))
    print(f"wrote {out_file}")


if __name__ == "__main__":
    main()
