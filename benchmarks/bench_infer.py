"""Fastest inference path on this CPU: eager fp32 / bf16, torch.compile fp32 / bf16, onnxruntime fp32,
OpenVINO fp32 / bf16 / int8.

For MHSA-Net (ResNet-50, last stride 1, 384x128) and HA-CNN (160x64), random weights
(BatchNorm statistics calibrated on noise so that images get distinct features), at
batch 1 and batch 64: images/s and ms/batch (median of ``--reps`` timed batches after one
warm-up), and how well each path's features agree with eager float32 on the same input
(cosine per image: mean and min). Setup cost (torch.compile's first calls, ONNX export)
is reported separately, not in the speed.

Paths run in subprocesses with a time limit (``--compile-limit`` for each compile path,
``--limit-eager`` for the rest): torch.compile on a loaded 2-core machine can take
minutes, and a path that does not finish is recorded with its error, not left out.
Eager and onnxruntime share one process; each compile path has its own. Every process
also runs eager float32, alternating timed batches with its other paths, so ``speedup_vs_eager_fp32`` compares paths under the same load, and the
features are compared on the same input.

    python benchmarks/bench_infer.py [--threads 2] [--reps 3] [--models hacnn_160x64] [--paths eager_fp32,eager_bf16]
    python benchmarks/bench_infer.py --compile-only --compile-limit 1200   # re-measure just the compile rows
    python benchmarks/bench_infer.py --quick      # self-check, tiny model: scratch/infer_cpu_quick.json

Writes benchmarks/results/infer_cpu.json (``--out``). Rows of paths not re-measured are
kept from the existing file, each with the machine it was measured on; every row carries
the load average at its start and end (``loaded``: the 1-minute load was above 1).
``break_even_images`` in each onnxruntime / openvino row is its setup seconds over the seconds it
saves per image against eager float32: the job size from which exporting pays
(``MIN_IMAGES`` of ``attnreid.inference.onnxruntime_backend`` and ``openvino_backend``).
OpenVINO's rows share one conversion (counted in the first one's setup); int8 is NNCF
post-training quantisation calibrated on ``CALIBRATION_IMAGES`` noise images of another seed
(random weights have no training images; with a trained model ``attnreid`` calibrates on
``eval.int8_calibration`` training images). Rows are compared per CPU (``fastest_matching``
is keyed ``model@batch@cpu``): rows of other machines are kept in the file with their machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _machine import machine_record  # noqa: E402

RESULTS = HERE / "results"
SCRATCH = HERE.parent / "scratch"

MODELS = {
    "mhsanet_resnet50_384x128": ["model.name=mhsanet", "model.backbone.name=resnet50",
                                 "model.backbone.pretrained=false", "data.height=384", "data.width=128"],
    "hacnn_160x64": ["model.name=hacnn", "data.height=160", "data.width=64"],
    # --quick only: a model that exports and compiles in seconds
    "tiny_mhsanet_64x32": ["model.name=mhsanet", "model.backbone.name=mobilenetv3_small", "model.mhsanet.num_heads=2",
                           "model.mhsanet.attention_dim=16", "model.mhsanet.embed_dim=16", "data.height=64",
                           "data.width=32"],
}
TABLE_MODELS = ("mhsanet_resnet50_384x128", "hacnn_160x64")
PATHS = ("eager_fp32", "eager_bf16", "compile_fp32", "compile_bf16", "onnxruntime_fp32", "openvino_fp32",
         "openvino_bf16", "openvino_int8")
CALIBRATION_IMAGES = 64
BATCHES = (1, 64)


def build(name: str):
    """The model (eval mode, BN calibrated on noise, seeded) and its input size."""
    from attnreid.config import load_config
    from attnreid.models import build_model

    cfg = load_config(None, MODELS[name])
    torch.manual_seed(0)
    model = build_model(cfg.model, 10)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, cfg.data.height, cfg.data.width))
    return model.eval(), (cfg.data.height, cfg.data.width)


def inputs(size, batches) -> torch.Tensor:
    return torch.randn(max(batches), 3, *size, generator=torch.Generator().manual_seed(1))


def runner(path: str, model, size, tmp: Path):
    """``(forward(x) -> float32 features, setup seconds or None)`` for one path."""
    bf16 = path.endswith("bf16")

    def ctx():
        return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()

    if path.startswith("eager"):
        def fwd(x):
            with torch.inference_mode(), ctx():
                return model(x).float()
        return fwd, None
    if path.startswith("compile"):
        compiled = torch.compile(model, dynamic=False)  # one graph per batch size, as extract would see

        def fwd(x):
            with torch.inference_mode(), ctx():
                return compiled(x).float()
        return fwd, None  # compile time is the first call of each batch size, measured by the caller
    if path == "onnxruntime_fp32":
        import onnxruntime as ort

        from attnreid.inference.export import export_onnx

        t0 = time.perf_counter()
        onnx_path = tmp / "model.onnx"
        # measured, not gated: the row's mean_cosine says how well it agrees (the export's own check,
        # relative 1e-4, can fail by a hair under 1 thread on some CPUs)
        export_onnx(model, onnx_path, size, tolerance=1e-3)
        so = ort.SessionOptions()
        so.intra_op_num_threads = torch.get_num_threads()
        so.inter_op_num_threads = 1
        session = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        setup = time.perf_counter() - t0

        def fwd(x):
            return torch.from_numpy(session.run(None, {"images": x.numpy()})[0]).float()
        return fwd, setup
    if path.startswith("openvino"):
        from attnreid.inference import openvino_backend

        precision = path.split("_")[1]
        if precision not in openvino_backend.precisions():
            raise SystemExit(f"{path}: OpenVINO reports no {precision} on this CPU")

        def calibration():
            return list(torch.randn(CALIBRATION_IMAGES, 3, *size, generator=torch.Generator().manual_seed(2)).split(16))
        session, setup = openvino_backend.open_session(model, size, precision=precision, calibration=calibration)
        return (lambda x: openvino_backend.features(session, x)), setup
    raise SystemExit(f"unknown path {path}")


def worker(args) -> None:
    """One model, the paths in ``--path`` (eager fp32 first, the reference), both batch sizes.

    The paths' timed batches alternate (one batch of each per round), so that every path
    sees the same machine load; prints one JSON row per path and batch size.
    """
    torch.set_num_threads(args.threads)
    model, size = build(args.model)
    batches = parse_batches(args.batches)
    x = inputs(size, batches)
    paths = args.path.split(",")
    fwds, setups = {}, {}
    for path in list(paths):
        try:
            fwds[path], setups[path] = runner(path, model, size, Path(args.tmp))
        except (Exception, SystemExit) as exc:  # this path fails: its rows say why, the others are measured
            paths.remove(path)
            for batch in batches:
                print("ROW " + json.dumps({"model": args.model, "path": path, "batch": batch, "img_per_s": None,
                                           "error": f"setup failed: {str(exc)[:1500]}",
                                           "load_average_start": [round(v, 2) for v in os.getloadavg()],
                                           "machine": machine_record()}), flush=True)
    for batch in batches:
        xb = x[:batch].contiguous()
        load_start = [round(v, 2) for v in os.getloadavg()]
        first, times, feats = {}, {p: [] for p in paths}, {}
        for path in paths:
            t0 = time.perf_counter()
            fwds[path](xb)
            first[path] = time.perf_counter() - t0
        for _ in range(args.reps):
            for path in paths:
                t0 = time.perf_counter()
                feats[path] = fwds[path](xb)
                times[path].append(time.perf_counter() - t0)
        load_end = [round(v, 2) for v in os.getloadavg()]
        ref_ms = statistics.median(times["eager_fp32"]) * 1000
        for path in paths:
            cos = torch.nn.functional.cosine_similarity(feats[path], feats["eager_fp32"], dim=1)
            ms = statistics.median(times[path]) * 1000
            row = {"model": args.model, "path": path, "batch": batch, "input": list(size),
                   "img_per_s": round(batch / (ms / 1000), 2), "ms_per_batch": round(ms, 1),
                   "speedup_vs_eager_fp32": round(ref_ms / ms, 2), "reps": args.reps,
                   "first_call_s": round(first[path], 2),
                   "mean_cosine": round(float(cos.mean()), 6), "min_cosine": round(float(cos.min()), 6),
                   "feature_dim": int(feats[path].shape[1]), "threads": torch.get_num_threads(),
                   "measured_with": paths, "load_average_start": load_start, "load_average_end": load_end,
                   "loaded": max(load_start[0], load_end[0]) > 1}
            if path.startswith("compile"):
                row["compile_s"] = round(first[path] - ms / 1000, 2)  # first call minus one steady call
            if setups[path] is not None:
                row["setup_s"] = round(setups[path], 2)
                saved = ref_ms / 1000 / batch - ms / 1000 / batch  # seconds saved per image
                row["break_even_images"] = round(setups[path] / saved) if saved > 0 else None
            row["machine"] = machine_record()
            print("ROW " + json.dumps(row), flush=True)


def parse_batches(text: str) -> list:
    return [int(b) for b in text.split(",") if b]


def run_group(model: str, paths, args, tmp: str, limit: int) -> list:
    """One worker subprocess for ``paths``, with a time limit; failed paths get an error row."""
    cmd = [sys.executable, __file__, "--worker", "--model", model, "--path", ",".join(paths),
           "--threads", str(args.threads), "--reps", str(args.reps), "--tmp", tmp, "--batches", args.batches]
    load_start = [round(v, 2) for v in os.getloadavg()]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err, rc = f"did not finish within {limit} s (setup included)", None
    rows = [json.loads(line[4:]) for line in out.splitlines() if line.startswith("ROW ")]
    done = {(r["path"], r["batch"]) for r in rows}
    tail = [line for line in (err or "").strip().splitlines() if line.strip()][-3:]
    reason = (f"exit code {rc}: " + " | ".join(tail)) if rc is not None else err
    for path in paths:
        for batch in parse_batches(args.batches):
            if (path, batch) not in done:
                rows.append({"model": model, "path": path, "batch": batch, "img_per_s": None,
                             "error": reason[-1500:], "wall_s": round(time.perf_counter() - t0, 1),
                             "limit_s": limit, "load_average_start": load_start,
                             "load_average_end": [round(v, 2) for v in os.getloadavg()],
                             "machine": machine_record()})
    return rows


def markdown(rows) -> str:
    from attnreid.inference.backend import fastest_matching_path

    def cpu(r):
        return (r.get("machine") or {}).get("cpu_model", "?")

    lines = ["| model | batch | path | img/s | ms/batch | vs eager fp32 | mean cos | min cos | setup s | load | cpu |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["model"], r["batch"], PATHS.index(r["path"]))):
        setup = r.get("compile_s", r.get("setup_s", ""))
        load = r["load_average_start"][0]
        if r.get("img_per_s") is None:
            lines.append(f"| {r['model']} | {r['batch']} | {r['path']} | {r['error'][:60]} | | | | | | {load} | {cpu(r)} |")
            continue
        lines.append(f"| {r['model']} | {r['batch']} | {r['path']} | {r['img_per_s']:.2f} | {r['ms_per_batch']:.0f} | "
                     f"{r['speedup_vs_eager_fp32']:.2f}x | {r['mean_cosine']:.4f} | {r['min_cosine']:.4f} | {setup} | "
                     f"{load} | {cpu(r)} |")
    groups = sorted({(r["model"], r["batch"], cpu(r)) for r in rows})
    best = {f"{m} batch {b} ({c})": fastest_matching_path([r for r in rows if (r["model"], r["batch"], cpu(r)) == (m, b, c)])
            for m, b, c in groups}
    return "\n".join(lines) + "\n\nfastest path matching fp32 (mean cosine >= 0.999): " + json.dumps(best)


def kept_rows(out: Path, new: list) -> list:
    """The existing file's rows of (model, path, batch) not in ``new``, each with its machine."""
    if not out.is_file():
        return []
    old = json.loads(out.read_text())
    def key(r):
        return r["model"], r["path"], r["batch"], (r.get("machine") or {}).get("cpu_model")

    measured = {key(r) for r in new}
    kept = []
    for r in old.get("rows", []):
        if not isinstance(r.get("machine"), dict):  # older files recorded the machine once, at the top
            r["machine"] = old.get("machine")
        if key(r) not in measured:  # rows of another CPU are kept beside this one's
            kept.append(r)
    return kept


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--compile-limit", "--limit", dest="limit", type=int, default=300,
                    help="seconds allowed to one compile path (both batch sizes, compilation included)")
    ap.add_argument("--compile-only", action="store_true",
                    help="re-measure only compile_fp32 and compile_bf16 (each beside eager fp32); keep the other rows")
    ap.add_argument("--batches", default=",".join(str(b) for b in BATCHES))
    ap.add_argument("--quick", action="store_true",
                    help="self-check: a tiny MHSA-Net at 64x32, batches 1 and 4, 1 rep, 1 thread; to scratch/")
    ap.add_argument("--limit-eager", type=int, default=1200,
                    help="seconds allowed to the eager + onnxruntime process of one model")
    ap.add_argument("--models", default=",".join(TABLE_MODELS))
    ap.add_argument("--paths", default=",".join(PATHS))
    ap.add_argument("--out", type=Path, default=None,
                    help="result file (default: benchmarks/results/infer_cpu.json; with --quick scratch/infer_cpu_quick.json)")
    ap.add_argument("--table", action="store_true", help="print the existing result file as a markdown table")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.models, args.batches, args.reps, args.threads = "tiny_mhsanet_64x32", "1,4", 1, 1
        args.out = args.out or SCRATCH / "infer_cpu_quick.json"
    args.out = args.out or RESULTS / "infer_cpu.json"
    if args.compile_only:
        args.paths = "compile_fp32,compile_bf16"
    if args.worker:
        worker(args)
        return
    if args.table:
        print(markdown(json.loads(args.out.read_text())["rows"]))
        return
    from attnreid.inference.backend import fastest_matching_path

    torch.set_num_threads(args.threads)
    machine_start = machine_record()
    models = [m for m in args.models.split(",") if m]
    paths = [p for p in args.paths.split(",") if p and p != "eager_fp32"]
    # eager/onnxruntime paths share one process; each compile path gets its own (minutes of
    # compilation must not cost the others their time limit). Every group re-runs eager fp32
    # alongside, as the reference for speed and features under the same load.
    # A compile-only rerun has no eager group: its eager fp32 rows stay those of the file.
    eager_group = [] if args.compile_only else [[p for p in paths if not p.startswith("compile")]]
    groups = eager_group + [[p] for p in paths if p.startswith("compile")]
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_infer_") as tmp:
        for model in models:
            for i, group in enumerate(groups):
                limit = args.limit if any(p.startswith("compile") for p in group) else args.limit_eager
                new = run_group(model, ["eager_fp32", *group], args, tmp, limit)
                if i > 0 or not eager_group:  # the eager group's fp32 row is the table's; others are references
                    new = [r for r in new if r["path"] != "eager_fp32"]
                for r in new:
                    print(json.dumps(r), file=sys.stderr, flush=True)
                rows.extend(new)
    rows = kept_rows(args.out, rows) + rows
    batches = sorted({r["batch"] for r in rows})
    cpus = sorted({(r.get("machine") or {}).get("cpu_model", "?") for r in rows})
    fastest = {f"{m}@{b}@{c}": fastest_matching_path([r for r in rows if r["model"] == m and r["batch"] == b
                                                      and (r.get("machine") or {}).get("cpu_model", "?") == c])
               for m in sorted({r["model"] for r in rows}) for b in batches for c in cpus}
    fastest = {k: v for k, v in fastest.items() if v is not None}
    out = {"benchmark": "CPU inference paths: images/s and feature agreement with eager fp32",
           "machine": machine_start, "load_average_end": [round(v, 2) for v in os.getloadavg()],
           "wall_seconds": round(time.perf_counter() - t0, 1),
           "note": ("random weights (BN calibrated on noise), preprocessed random inputs; speed excludes setup "
                    "(compile_s: first call minus a steady call, per batch size; setup_s: ONNX export + session). "
                    "A 2-core machine shared with other jobs: see each row's load average. Rows were measured by "
                    "their own runs (each row's machine); compare a row with the eager fp32 row of its process "
                    "(speedup_vs_eager_fp32)."),
           "match_rule": "mean cosine with eager fp32 >= 0.999", "fastest_matching": fastest, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(markdown(rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
