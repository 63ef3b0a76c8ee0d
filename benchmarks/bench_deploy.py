"""Deployment benchmarks: eager PyTorch vs onnxruntime on the CPU, gallery search, export of every variant.

    .venv/bin/python benchmarks/bench_deploy.py                 # all three parts
    .venv/bin/python benchmarks/bench_deploy.py extract         # one of: extract, search, variants
    .venv/bin/python benchmarks/bench_deploy.py extract --extract-threads 1 2 --repeats 5 --models hacnn_160x64
    .venv/bin/python benchmarks/bench_deploy.py tables          # results as markdown tables

Writes ``benchmarks/results/deploy_extract.json``, ``deploy_search.json`` and
``deploy_export_variants.json``.

- extract: images/s of the model alone (preprocessed random batches; preprocessing is
  the same for both runtimes and left out) for MHSA-Net (ResNet-50, last stride 1,
  384x128) and HA-CNN (160x64), eager PyTorch vs onnxruntime, same batch and thread
  count, at each onnxruntime graph-optimisation level. Random weights: speed does not
  depend on them. Eager and onnxruntime runs alternate so that both see the same
  machine load; wall-clock and process CPU time are both recorded (on a shared machine
  images per CPU-second is the fairer ratio).
- search: a 100k-vector gallery (clustered like a re-ID gallery: 10k identities x 10
  images around identity centres), 100 queries; latency of exact torch search and faiss
  flat / IVF / HNSW, build time, recall@10 against exact.
- variants: every MHSA-Net and HA-CNN variant exported (small widths) and checked in
  onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _machine import machine_record

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _machine(threads: int) -> dict:
    import onnxruntime

    info = {**machine_record(), "threads": threads, "load_avg_1min": round(os.getloadavg()[0], 2),
            "onnxruntime": onnxruntime.__version__}
    try:
        import faiss

        info["faiss"] = faiss.__version__
    except ImportError:
        pass
    return info


def _write(name: str, result: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / name).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


def _timed(fn, n_images: int) -> dict:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"img_per_s": n_images / wall, "img_per_cpu_s": n_images / max(cpu, 1e-9)}


# -- extraction: eager vs onnxruntime ----------------------------------------------------

EXTRACT_MODELS = {
    "mhsanet_resnet50_384x128": ({"model": {"name": "mhsanet"}, "data": {"height": 384, "width": 128}}, 8),
    "hacnn_160x64": ({"model": {"name": "hacnn"}, "data": {"height": 160, "width": 64}}, 32),
}


def _compare(ext, onnx_path: Path, x: torch.Tensor, name: str, batch: int, batches: int, repeats: int,
             threads: int, levels: dict, report: dict) -> dict:
    """Eager vs onnxruntime (each optimisation level) at one thread count; medians over repeats."""
    import onnxruntime as ort

    sessions = {}
    for label, level in levels.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = level
        sessions[label] = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    feed = {"images": x.numpy()}

    def eager():
        for _ in range(batches):
            ext.forward_batch(x)

    def run_ort(session):
        def fn():
            for _ in range(batches):
                session.run(None, feed)
        return fn

    eager()  # warm-up
    for s in sessions.values():
        s.run(None, feed)
    runs = {"eager": []} | {f"ort_{k}": [] for k in sessions}
    for _ in range(repeats):  # alternate, so that both runtimes see the same load
        runs["eager"].append(_timed(eager, batch * batches))
        for k, s in sessions.items():
            runs[f"ort_{k}"].append(_timed(run_ort(s), batch * batches))
    summary = {k: {"img_per_s": round(statistics.median(r["img_per_s"] for r in v), 2),
                   "img_per_cpu_s": round(statistics.median(r["img_per_cpu_s"] for r in v), 2)}
               for k, v in runs.items()}
    best = max((k for k in summary if k.startswith("ort_")), key=lambda k: summary[k]["img_per_s"])
    return {
        "model": name, "threads": threads, "batch": batch, "input_size": list(ext.input_size),
        "feature_dim": ext.feature_dim, "images_per_repeat": batch * batches, "repeats": repeats,
        "export_rel_diff": report["rel_diff"], "exporter": report["exporter"], "runs": summary, "best_ort": best,
        "speedup_wall": round(summary[best]["img_per_s"] / summary["eager"]["img_per_s"], 2),
        "speedup_cpu": round(summary[best]["img_per_cpu_s"] / summary["eager"]["img_per_cpu_s"], 2),
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }


def bench_extract(thread_counts, repeats: int, batches: int, models=None) -> None:
    import onnxruntime as ort

    from attnreid.config import from_dict
    from attnreid.deploy.extractor import FeatureExtractor
    from attnreid.inference.export import export_onnx

    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    out = RESULTS / "deploy_extract.json"
    # re-measuring some models keeps the others' rows
    results = [r for r in json.loads(out.read_text())["results"] if r["model"] not in models] \
        if models and out.is_file() else []
    for name, (overrides, batch) in EXTRACT_MODELS.items():
        if models and name not in models:
            continue
        cfg = from_dict(overrides)
        ext = FeatureExtractor(cfg, batch_size=batch, backend="torch")  # the eager side of the comparison
        x = torch.randn(batch, 3, *ext.input_size)
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = Path(tmp) / f"{name}.onnx"
            report = export_onnx(ext.model, onnx_path, ext.input_size)
            for threads in thread_counts:
                torch.set_num_threads(threads)
                results.append(_compare(ext, onnx_path, x, name, batch, batches, repeats, threads, levels, report))
                print(json.dumps(results[-1]), file=sys.stderr)
    _write("deploy_extract.json", {"benchmark": "CPU feature extraction, eager PyTorch vs onnxruntime",
                                   "target_speedup": 1.5, "machine": _machine(max(thread_counts)),
                                   "results": results})


# -- search ------------------------------------------------------------------------------

def clustered_gallery(n: int, dim: int, per_id: int, seed: int = 0, spread: float = 0.35):
    """n vectors around n/per_id identity centres (unit-norm centres, Gaussian spread)."""
    rng = np.random.default_rng(seed)
    ids = n // per_id
    centres = rng.standard_normal((ids, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(ids), per_id)
    x = centres[labels] + spread / np.sqrt(dim) * rng.standard_normal((n, dim)).astype(np.float32)
    return x.astype(np.float32), centres


def bench_search(thread_counts, n: int, dims, queries: int, k: int) -> None:
    from attnreid.deploy.index import FaissParams, FaissSearcher, exact_topk, import_faiss, recall_at_k

    faiss = import_faiss()
    metric = "euclidean_sq"
    rows = []

    def timed_search(fn, qt):
        """(top-k of the batch, wall ms and CPU ms per query one at a time, wall ms per query in a batch)."""
        t = time.perf_counter()
        _, idx = fn(qt)
        batch_ms = (time.perf_counter() - t) * 1000
        t, c = time.perf_counter(), time.process_time()
        for i in range(10):
            fn(qt[i:i + 1])
        return idx, (time.perf_counter() - t) * 100, (time.process_time() - c) * 100, batch_ms / len(qt)

    for dim in dims:
        gallery, centres = clustered_gallery(n, dim, per_id=10)
        rng = np.random.default_rng(1)
        picks = rng.integers(0, centres.shape[0], queries)
        q = centres[picks] + 0.35 / np.sqrt(dim) * rng.standard_normal((queries, dim)).astype(np.float32)
        g, qt = torch.from_numpy(gallery), torch.from_numpy(q.astype(np.float32))
        built = {}
        faiss.omp_set_num_threads(max(thread_counts))
        for kind in ("flat", "ivf", "hnsw"):  # one build each; nprobe / efSearch are search-time knobs
            t = time.perf_counter()
            built[kind] = (FaissSearcher(g, metric, kind), round(time.perf_counter() - t, 2))
        searchers = {}
        for kind, params in (("flat", FaissParams()), ("ivf", FaissParams(nprobe=8)), ("ivf", FaissParams(nprobe=32)),
                             ("hnsw", FaissParams(ef_search=32)), ("hnsw", FaissParams(ef_search=128))):
            label = {"flat": "faiss flat", "ivf": f"faiss IVF{params.ivf_nlist(n)} nprobe={params.nprobe}",
                     "hnsw": f"faiss HNSW{params.hnsw_m} efSearch={params.ef_search}"}[kind]
            searchers[label] = (*built[kind], params)
        for threads in thread_counts:
            torch.set_num_threads(threads)
            faiss.omp_set_num_threads(threads)
            exact_topk(qt[:2], g, k, metric)  # warm-up
            norms = torch.linalg.vector_norm(g, dim=1)  # cached by GalleryIndex in real use
            exact_idx, single, single_cpu, batched = timed_search(
                lambda x: exact_topk(x, g, k, metric, gallery_norms=norms), qt)
            rows.append({"dim": dim, "threads": threads, "method": "torch exact", "build_s": 0.0,
                         "ms_per_query_single": round(single, 2), "cpu_ms_per_query_single": round(single_cpu, 2),
                         "ms_per_query_batched": round(batched, 3),
                         f"recall@{k}": 1.0, "load_avg_1min": round(os.getloadavg()[0], 2)})
            print(json.dumps(rows[-1]), file=sys.stderr)
            for label, (searcher, build_s, params) in searchers.items():
                searcher.tune(params.nprobe, params.ef_search)
                idx, single, single_cpu, batched = timed_search(lambda x: searcher.search(x, k), qt)
                rows.append({"dim": dim, "threads": threads, "method": label,
                             "build_s": build_s, "ms_per_query_single": round(single, 2),
                             "cpu_ms_per_query_single": round(single_cpu, 2),
                             "ms_per_query_batched": round(batched, 3),
                             f"recall@{k}": round(recall_at_k(idx, exact_idx, k), 4),
                             "load_avg_1min": round(os.getloadavg()[0], 2)})
                print(json.dumps(rows[-1]), file=sys.stderr)
    _write("deploy_search.json", {"benchmark": f"top-{k} search in a {n}-vector gallery", "gallery": n,
                                  "queries": queries, "k": k, "metric": metric,
                                  "gallery_kind": "10 vectors per identity centre",
                                  "build_threads": max(thread_counts), "machine": _machine(max(thread_counts)),
                                  "results": rows})


# -- export of every variant -------------------------------------------------------------

MHSA_SMALL = {"backbone": {"name": "resnet18"}, "mhsanet": {"num_heads": 4, "attention_dim": 32, "embed_dim": 64}}
VARIANTS = {
    "MHSA-Net (concat p*,q*)": {"model": {"name": "mhsanet", **MHSA_SMALL}},
    "MHSA-Net-star (p*)": {"model": {"name": "mhsanet", **MHSA_SMALL, "test_feature": "star"}},
    "MHSA-Net head P_0": {"model": {"name": "mhsanet", **MHSA_SMALL, "test_feature": "head"}},
    "MHSA-Net global q*": {"model": {"name": "mhsanet", **MHSA_SMALL, "test_feature": "global"}},
    "MHSA-Net fusion=concat, no RLM": {"model": {"name": "mhsanet", "backbone": MHSA_SMALL["backbone"],
                                                 "mhsanet": {**MHSA_SMALL["mhsanet"], "fusion": "concat", "rlm": False}}},
    "MHSA-Net fusion=sum, heads-norm, L2": {"model": {"name": "mhsanet", "backbone": MHSA_SMALL["backbone"],
                                                      "feature_norm": True,
                                                      "mhsanet": {**MHSA_SMALL["mhsanet"], "fusion": "sum",
                                                                  "attention_norm": "heads"}}},
    "Baseline (GFB)": {"model": {"name": "baseline", "backbone": MHSA_SMALL["backbone"]}},
    "HA-CNN (joint)": {"model": {"name": "hacnn"}},
    "HA-CNN global": {"model": {"name": "hacnn", "test_feature": "global"}},
    "HA-CNN local, no cross-attention": {"model": {"name": "hacnn", "test_feature": "local",
                                                   "hacnn": {"cross_attention": False}}},
    "HA-CNN soft attention only": {"model": {"name": "hacnn", "hacnn": {"attention": "soft"}}},
    "HA-CNN hard attention only": {"model": {"name": "hacnn", "hacnn": {"attention": "hard"}}},
    "HA-CNN no attention": {"model": {"name": "hacnn", "hacnn": {"attention": "none"}}},
}


def bench_variants(threads: int) -> None:
    from attnreid.config import from_dict
    from attnreid.deploy.extractor import FeatureExtractor
    from attnreid.inference.export import export_onnx
    from attnreid.errors import AttnReidError

    torch.set_num_threads(threads)
    rows = []
    for label, overrides in VARIANTS.items():
        hacnn = overrides["model"]["name"] == "hacnn"
        size = {"height": 160, "width": 64} if hacnn else {"height": 128, "width": 64}
        if hacnn:
            overrides = {"model": {**overrides["model"], "hacnn": {"widths": [32, 64, 96], "embed_dim": 128,
                                                                   **overrides["model"].get("hacnn", {})}}}
        ext = FeatureExtractor(from_dict({**overrides, "data": size}))
        for attention in ((False, True) if overrides["model"]["name"] != "baseline" else (False,)):
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    r = export_onnx(ext.model, Path(tmp) / "m.onnx", ext.input_size, attention=attention)
                    row = {"variant": label, "attention": attention, "ok": True, "exporter": r["exporter"],
                           "opset": r["opset"], "outputs": r["outputs"], "feature_dim": ext.feature_dim,
                           "max_abs_diff": r["max_abs_diff"], "rel_diff": r["rel_diff"],
                           "export_s": r["export_seconds"]}
                except AttnReidError as exc:
                    row = {"variant": label, "attention": attention, "ok": False, "error": str(exc)}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    _write("deploy_export_variants.json", {"benchmark": "ONNX export + onnxruntime check of every variant",
                                           "machine": _machine(threads), "results": rows})


def markdown_tables() -> str:
    """The results files as the markdown tables of docs/deployment.md."""
    out = []
    f = RESULTS / "deploy_extract.json"
    if f.is_file():
        r = json.loads(f.read_text())
        out += ["| model | threads | batch | eager img/s | onnxruntime img/s (basic / extended / all) | "
                "speed-up (wall) | speed-up (CPU time) | load avg |", "|---|---|---|---|---|---|---|---|"]
        for row in r["results"]:
            runs = row["runs"]
            ort_cols = " / ".join(f"{runs[f'ort_{k}']['img_per_s']:.1f}" for k in ("basic", "extended", "all"))
            out.append(f"| {row['model']} | {row['threads']} | {row['batch']} | {runs['eager']['img_per_s']:.1f} | "
                       f"{ort_cols} | {row['speedup_wall']:.2f}x | {row['speedup_cpu']:.2f}x | {row['load_avg_1min']} |")
        out.append("")
    f = RESULTS / "deploy_search.json"
    if f.is_file():
        r = json.loads(f.read_text())
        out += [f"Top-{r['k']} search ({r['metric']}), {r['gallery']:,}-vector gallery, {r['queries']} queries "
                f"(faiss indexes built with {r['build_threads']} threads):", "",
                f"| dim | threads | method | build s | ms / query, one at a time (CPU ms) | "
                f"ms / query, batch of {r['queries']} | recall@{r['k']} vs exact |", "|---|---|---|---|---|---|---|"]
        for row in r["results"]:
            out.append(f"| {row['dim']} | {row['threads']} | {row['method']} | {row['build_s']} | "
                       f"{row['ms_per_query_single']} ({row['cpu_ms_per_query_single']}) | {row['ms_per_query_batched']} | "
                       f"{row[f'recall@' + str(r['k'])]:.3f} |")
        out.append("")
    f = RESULTS / "deploy_export_variants.json"
    if f.is_file():
        r = json.loads(f.read_text())
        out += ["| variant | attention outputs | exporter | feature dim | max abs diff | relative diff |",
                "|---|---|---|---|---|---|"]
        for row in r["results"]:
            if row["ok"]:
                out.append(f"| {row['variant']} | {'yes' if row['attention'] else 'no'} | {row['exporter']} | "
                           f"{row['feature_dim']} | {row['max_abs_diff']:.1e} | {row['rel_diff']:.1e} |")
            else:
                out.append(f"| {row['variant']} | {'yes' if row['attention'] else 'no'} | failed: {row['error']} | | | |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("parts", nargs="*", help="extract, search, variants (default: all), or tables")
    p.add_argument("--threads", type=int, default=2, help="threads for variants")
    p.add_argument("--search-threads", type=int, nargs="+", default=[1, 2], help="thread counts compared (search)")
    p.add_argument("--extract-threads", type=int, nargs="+", default=[1, 2], help="thread counts compared (extract)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", nargs="+", choices=list(EXTRACT_MODELS), help="extract: only these (others' rows kept)")
    p.add_argument("--batches", type=int, default=3, help="batches per timed repeat (extract)")
    p.add_argument("--gallery", type=int, default=100_000)
    p.add_argument("--dims", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--queries", type=int, default=100)
    args = p.parse_args()
    parts = args.parts or ["extract", "search", "variants"]
    if parts == ["tables"]:
        print(markdown_tables())
        return
    unknown = set(parts) - {"extract", "search", "variants"}
    if unknown:
        p.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    if "extract" in parts:
        bench_extract(args.extract_threads, args.repeats, args.batches, args.models)
    if "search" in parts:
        bench_search(args.search_threads, args.gallery, args.dims, args.queries, k=10)
    if "variants" in parts:
        bench_variants(args.threads)


if __name__ == "__main__":
    main()
