"""Evaluation benchmarks (issue 3, issue 29): exact CMC/mAP and k-reciprocal re-ranking at real sizes.

    python benchmarks/bench_evaluation.py [rank] [rerank] [msmt] [metrics]   (default: all four)
        [--torchreid DIR]        a torchreid source checkout, for the metrics part's Cython evaluator
        [--baseline-src DIR]     an older attnreid src/ folder, for the msmt part's whole-matrix baseline

- ``rank``: Market-1501 sizes (3,368 queries x 15,913 gallery) with the real pids and camera ids
  parsed from the file names in ``$ATTNREID_DATA/Market-1501-v15.09.15.zip`` (pid -1 dropped, 0000
  distractors kept in the gallery), identity-correlated random features of dimension 512 and 2048.
  Times ``attnreid.evaluation.evaluate_rank`` against a numpy re-implementation of torchreid's
  Cython evaluator algorithm (``eval_market1501_cy``: full ``np.argsort``, ``Q x G`` match matrix,
  then a per-query loop; here the loop body uses numpy vector operations where the Cython uses C
  loops); its ``np.argsort`` + match-matrix preamble, which runs in numpy in the real evaluator
  too, is timed separately as a lower bound of that evaluator's time.
- ``rerank``: all 19,281 Market images (dimension 512), ``attnreid.evaluation.re_ranking`` against
  the dense numpy transcription of the reference (``tests/test_evaluation_rerank.py``, numpy's
  default argsort as in the original), each in its own subprocess; time, peak RSS, max |difference|.
- ``msmt``: MSMT17 size (11,659 + 82,161 images, dimension 512, random ids and cameras): time and
  peak RSS of re-ranking + evaluation streamed over query blocks (``protocols.evaluate`` with
  re-ranking), one thread, each variant in its own process with the features read from a file
  (their generation is not in the peak). With ``--baseline-src``, the same with that source's
  ``re_ranking`` (the whole Q x G matrix) then ``evaluate_rank``, and the metrics of both compared.
- ``metrics``: whole processes, ``python -m`` start to exit, on one Market-size distance matrix
  (3,368 x 15,913 float32, real ids and cameras) saved as an npz: ``python -m attnreid metrics
  FILE --json`` (with its 1,000-resample intervals, and with ``--bootstrap 0``) against a process
  that loads the same npz and runs torchreid's Cython evaluator (``rank_cy.evaluate_cy``, built
  from ``--torchreid``'s ``torchreid/metrics/rank_cylib/rank_cy.pyx`` in ``scratch/``, imported
  alone: torchreid's package would import torch). Skipped, with the reason, without a checkout,
  Cython or a C compiler. Alternated, ``METRICS_REPEATS`` times each; medians compared.

Results go to ``benchmarks/results/evaluation_{rank,rerank,rerank_msmt,metrics_process}.json`` and
are printed.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT / "benchmarks"))
from _data import MARKET_ZIP  # noqa: E402
# torchreid's pattern: pid and camera at the start of the name (a few names end in ".jpg.jpg").
NAME = re.compile(r"/(query|bounding_box_test)/([-\d]+)_c(\d)[^/]*\.jpg$")


def machine() -> dict:
    from _machine import machine_record

    return {
        **machine_record(),
        "platform": platform.platform(),
        "numpy": np.__version__,
        "load_average_at_start": os.getloadavg(),
        "note": "shared 2-core machine: other jobs were running; compare ratios, not absolute times",
    }


def market_ids():
    """(q_pids, q_camids, g_pids, g_camids) parsed from the Market-1501 zip's file names."""
    q, g = [], []
    with zipfile.ZipFile(MARKET_ZIP) as zf:
        for name in zf.namelist():
            m = NAME.search(name)
            if not m:
                continue
            pid, cam = int(m.group(2)), int(m.group(3)) - 1
            if pid == -1:
                continue
            (q if m.group(1) == "query" else g).append((pid, cam))
    q, g = np.array(sorted(q)), np.array(sorted(g))
    return q[:, 0], q[:, 1], g[:, 0], g[:, 1]


def features(pids, camids, dim, seed=0, signal=None, camera=0.1):
    """Identity-correlated random features: identity centre + camera shift + noise.

    Distractors (pid 0) each get their own centre. ``signal`` is chosen so that mAP is far from
    both 0 and 1 (ranks are non-trivial).
    """
    if signal is None:
        signal = 0.4 * (512.0 / dim) ** 0.25  # separability grows like sqrt(dim)
    rng = np.random.default_rng(seed)
    uniq, inv = np.unique(pids, return_inverse=True)
    centres = rng.standard_normal((len(uniq), dim)).astype(np.float32)
    cams = rng.standard_normal((int(camids.max()) + 1, dim)).astype(np.float32)
    own = rng.standard_normal((len(pids), dim)).astype(np.float32)
    c = np.where((pids == 0)[:, None], own, centres[inv])
    noise = rng.standard_normal((len(pids), dim)).astype(np.float32)
    return signal * c + camera * cams[camids] + noise


def torchreid_algorithm_numpy(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """torchreid's ``eval_market1501_cy`` algorithm in numpy (+ fast-reid's mINP); returns timings too."""
    t0 = time.perf_counter()
    distmat = np.asarray(distmat, dtype=np.float32)
    indices = np.argsort(distmat, axis=1)
    matches = (g_pids[indices] == q_pids[:, np.newaxis]).astype(np.int64)
    t_pre = time.perf_counter() - t0
    all_cmc, all_ap, all_inp = [], [], []
    for q_idx in range(distmat.shape[0]):
        order = indices[q_idx]
        keep = (g_pids[order] != q_pids[q_idx]) | (g_camids[order] != q_camids[q_idx])
        raw_cmc = matches[q_idx][keep]
        if not raw_cmc.any():
            continue
        cmc = raw_cmc.cumsum()
        all_inp.append(cmc[-1] / (np.flatnonzero(raw_cmc)[-1] + 1.0))
        all_ap.append((cmc / np.arange(1.0, len(cmc) + 1) * raw_cmc).sum() / raw_cmc.sum())
        all_cmc.append(np.minimum(cmc[:max_rank], 1))
    cmc = np.asarray(all_cmc, dtype=np.float64).mean(0)
    return {"mAP": float(np.mean(all_ap)), "mINP": float(np.mean(all_inp)), "cmc": cmc.tolist(),
            "num_valid_queries": len(all_ap)}, t_pre, time.perf_counter() - t0


def best_of(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, min(times), times


def bench_rank() -> dict:
    import torch

    from attnreid.evaluation import compute_distance, evaluate_rank

    qp, qc, gp, gc = market_ids()
    res = {"what": "full CMC (rank 50) + mAP + mINP, Market-1501 single query, distmat given",
           "num_query": len(qp), "num_gallery": len(gp), "machine": machine(), "runs": []}
    for dim in (512, 2048):
        pids, cams = np.concatenate([qp, gp]), np.concatenate([qc, gc])
        f = features(pids, cams, dim, seed=dim)
        t = time.perf_counter()
        dist = compute_distance(torch.from_numpy(f[: len(qp)]), torch.from_numpy(f[len(qp):]))
        t_dist = time.perf_counter() - t
        dist_np = dist.numpy()
        ours, t_ours, all_ours = best_of(lambda: evaluate_rank(dist, qp, gp, qc, gc), 3)
        (ref, t_pre, t_ref), _, _ = best_of(lambda: torchreid_algorithm_numpy(dist_np, qp, gp, qc, gc), 1)
        run = {
            "dim": dim,
            "distance_s": round(t_dist, 3),
            "ours_s": round(t_ours, 3),
            "ours_all_s": [round(x, 3) for x in all_ours],
            "torchreid_algorithm_numpy_s": round(t_ref, 3),
            "torchreid_preamble_argsort_matches_s": round(t_pre, 3),
            "speedup_vs_numpy_reimplementation": round(t_ref / t_ours, 2),
            "speedup_vs_preamble_lower_bound": round(t_pre / t_ours, 2),
            "mAP": ours["mAP"], "mINP": ours["mINP"], "rank1": ours["rank1"],
            "num_valid_queries": ours["num_valid_queries"],
            "max_abs_diff_mAP": abs(ours["mAP"] - ref["mAP"]),
            "max_abs_diff_mINP": abs(ours["mINP"] - ref["mINP"]),
            "max_abs_diff_cmc": float(np.abs(np.array(ours["cmc"]) - np.array(ref["cmc"])).max()),
            "same_num_valid_queries": ours["num_valid_queries"] == ref["num_valid_queries"],
        }
        res["runs"].append(run)
        print(json.dumps(run), flush=True)
    res["note"] = (
        "torchreid's Cython evaluator could not be built here (no Cython, no network); the reference is "
        "its algorithm in numpy (per-query loop). Its np.argsort + match-matrix preamble is the same numpy "
        "code the Cython evaluator runs, so 'torchreid_preamble_argsort_matches_s' is a lower bound of the "
        "real Cython evaluator's time."
    )
    return res


# --- re-ranking: one subprocess per variant, peak RSS from the kernel ------------------------


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def worker(variant: str, num_q: int, num_g: int, dim: int, out_path: str, dtype: str = "float32") -> None:
    """Run one re-ranking variant; print {time_s, peak_rss_mb, baseline_rss_mb} as JSON."""
    import torch  # noqa: F401  (both variants pay the same import baseline)

    sys.path.insert(0, str(ROOT / "tests"))
    from test_evaluation_rerank import re_ranking_dense

    from attnreid.evaluation.rerank import re_ranking

    if num_q == 3368 and num_g == 15913:
        qp, qc, gp, gc = market_ids()
        f = features(np.concatenate([qp, gp]), np.concatenate([qc, gc]), dim, seed=7)
    else:
        rng = np.random.default_rng(17)
        pids = rng.integers(1, 3060, num_q + num_g)
        f = features(pids, rng.integers(0, 15, num_q + num_g), dim, seed=17)
    f = f.astype(dtype)
    qf, gf = f[:num_q], f[num_q:]
    baseline = _rss_mb("VmRSS")
    t = time.perf_counter()
    if variant == "ours":
        out = re_ranking(qf, gf)
    else:
        out = re_ranking_dense(qf, gf, stable=False)
    elapsed = time.perf_counter() - t
    peak = _rss_mb("VmHWM")
    if out_path:
        np.save(out_path, out)
    print(json.dumps({"time_s": elapsed, "peak_rss_mb": peak, "baseline_rss_mb": baseline,
                      "out_shape": list(out.shape)}))


def run_worker(variant, num_q, num_g, dim, out_path="", dtype="float32"):
    cmd = [sys.executable, __file__, "--worker", variant, str(num_q), str(num_g), str(dim), out_path, dtype]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{variant} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_rerank() -> dict:
    res = {"what": "k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3) of all Market-1501 test images",
           "num_query": 3368, "num_gallery": 15913, "dim": 512, "machine": machine(), "runs": []}
    for dtype in ("float32", "float64"):
        with tempfile.TemporaryDirectory(dir=ROOT / "scratch" if (ROOT / "scratch").is_dir() else None) as tmp:
            ours = run_worker("ours", 3368, 15913, 512, f"{tmp}/ours.npy", dtype)
            print(dtype, "ours", json.dumps(ours), flush=True)
            ref = run_worker("dense", 3368, 15913, 512, f"{tmp}/ref.npy", dtype)
            print(dtype, "dense reference", json.dumps(ref), flush=True)
            diff = np.abs(np.load(f"{tmp}/ours.npy").astype(np.float64) - np.load(f"{tmp}/ref.npy"))
        run = dict(
            features_dtype=dtype, ours=ours, dense_reference=ref,
            speedup=round(ref["time_s"] / ours["time_s"], 2),
            peak_rss_ratio=round(ours["peak_rss_mb"] / ref["peak_rss_mb"], 3),
            working_memory_ratio=round((ours["peak_rss_mb"] - ours["baseline_rss_mb"])
                                       / (ref["peak_rss_mb"] - ref["baseline_rss_mb"]), 3),
            max_abs_diff=float(diff.max()),
            num_entries_diff_over_1e4=int((diff > 1e-4).sum()),
        )
        res["runs"].append(run)
        print(json.dumps(run), flush=True)
    res["note"] = (
        "peak RSS = VmHWM of each variant's own process (features and the torch/numpy import baseline "
        "included in both); working memory = peak minus the RSS just before the call. With float32 "
        "features the two implementations compute the N x N distances with different matrix products "
        "(torch vs numpy BLAS), whose last-bit differences flip a few near-tied neighbours at the "
        "k1+1 / k1/2+1 / k2 cut-offs, which changes the re-ranked distances of the few entries that "
        "depend on them; with float64 features (same algorithm, same sizes) the results agree to "
        "max_abs_diff."
    )
    return res


MSMT = (11659, 82161, 512)


def msmt_worker(variant: str, feats_path: str, ids_path: str, num_q: str) -> None:
    """One MSMT-size variant on one thread; prints {time_s, peak_rss_mb, baseline_rss_mb, metrics}."""
    import torch

    torch.set_num_threads(1)
    f = np.load(feats_path)
    ids = np.load(ids_path)
    num_q = int(num_q)
    qf, gf = f[:num_q], f[num_q:]
    pids, cams = ids["pids"], ids["cams"]
    args = (pids[:num_q], pids[num_q:], cams[:num_q], cams[num_q:])
    baseline = _rss_mb("VmRSS")
    t, cpu = time.perf_counter(), time.process_time()
    if variant == "stream":
        from attnreid.evaluation import RankingOptions, evaluate

        res = evaluate(qf, gf, *args, ranking=RankingOptions(rerank=True))
    else:  # the whole Q x G matrix, then the evaluator (an older attnreid on PYTHONPATH)
        from attnreid.evaluation.rank import evaluate_rank
        from attnreid.evaluation.rerank import re_ranking

        res = evaluate_rank(re_ranking(qf, gf), *args)
    elapsed, cpu = time.perf_counter() - t, time.process_time() - cpu
    print(json.dumps({"time_s": elapsed, "cpu_s": cpu, "peak_rss_mb": _rss_mb("VmHWM"), "baseline_rss_mb": baseline,
                      "metrics": {k: res[k] for k in ("mAP", "mINP", "rank1", "rank5", "cmc", "num_valid_queries")}}))


def bench_msmt(baseline_src: str = "", concurrent: bool = False) -> dict:
    num_q, num_g, dim = MSMT
    res = {"what": "k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3) + CMC/mAP/mINP at MSMT17 size, streamed over "
                   "query blocks; identity-correlated random features, random ids (3,060) and cameras (15)",
           "num_query": num_q, "num_gallery": num_g, "dim": dim, "threads": 1, "machine": machine()}
    rng = np.random.default_rng(17)
    pids = rng.integers(1, 3060, num_q + num_g)
    cams = rng.integers(0, 15, num_q + num_g)
    f = features(pids, cams, dim, seed=17)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    scratch = ROOT / "scratch" if (ROOT / "scratch").is_dir() else None
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        np.save(f"{tmp}/feats.npy", f)
        np.savez(f"{tmp}/ids.npz", pids=pids, cams=cams)
        del f
        variants = [("stream", str(ROOT / "src"))] + ([("whole", baseline_src)] if baseline_src else [])
        done = {}
        running = []
        for name, src in variants:
            cmd = [sys.executable, __file__, "--msmt-worker", name, f"{tmp}/feats.npy", f"{tmp}/ids.npz", str(num_q)]
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env=dict(env, PYTHONPATH=src))
            running.append((name, src, proc))
            if not concurrent:  # one after the other: wait for this one before starting the next
                done[name] = proc.communicate()
        for name, src, proc in running:
            out, err = done[name] if name in done else proc.communicate()
            if proc.returncode != 0:  # recorded, not raised: e.g. the whole-matrix variant killed for memory
                why = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
                res[name] = {"failed": why, "stderr_tail": err[-500:], "source": src}
                print(name, "failed:", why, flush=True)
                continue
            res[name] = json.loads(out.strip().splitlines()[-1])
            res[name]["source"] = src
            print(name, json.dumps(res[name]), flush=True)
    if "failed" in res["stream"]:
        return res
    res["peak_rss_gb"] = round(res["stream"]["peak_rss_mb"] / 1024, 2)
    res["within_1_5GB"] = res["stream"]["peak_rss_mb"] <= 1.5 * 1024
    if "whole" in res and "failed" not in res["whole"]:
        a, b = res["stream"]["metrics"], res["whole"]["metrics"]
        res["same_metrics"] = a == b
        res["max_abs_diff_metrics"] = float(max(abs(np.asarray(a[k]) - np.asarray(b[k])).max() for k in a))
        res["time_ratio_stream_to_whole"] = round(res["stream"]["time_s"] / res["whole"]["time_s"], 3)
        res["cpu_ratio_stream_to_whole"] = round(res["stream"]["cpu_s"] / res["whole"]["cpu_s"], 3)
        res["peak_ratio_stream_to_whole"] = round(res["stream"]["peak_rss_mb"] / res["whole"]["peak_rss_mb"], 3)
    res["variants_ran"] = "concurrently, one process each" if concurrent and "whole" in res else "one after the other"
    res["note"] = ("peak RSS = VmHWM of each variant's own process (torch import and the 0.19 GB of features "
                   "included); the Q x G float32 matrix alone would be 3.8 GB. time_s is wall time, cpu_s the "
                   "process's CPU time (user + system; one thread, so the measure to compare on a machine "
                   "shared with other jobs).")
    return res


# --- metrics: whole processes, attnreid metrics vs torchreid's Cython evaluator ----------------------

METRICS_REPEATS = 5
CYTHON_RUNNER = """
import json, sys, time
import numpy as np
from rank_cy import evaluate_cy
z = np.load(sys.argv[1])
cmc, mAP = evaluate_cy(z["distmat"], z["query_pids"], z["gallery_pids"], z["query_camids"], z["gallery_camids"], 50)
print(json.dumps({"mAP": float(mAP), "cmc": [float(v) for v in cmc]}))
"""
BUILD = """
import numpy as np
from setuptools import Extension, setup
from Cython.Build import cythonize
setup(name="rank_cy", ext_modules=cythonize([Extension("rank_cy", ["rank_cy.pyx"], include_dirs=[np.get_include()])],
      quiet=True), script_args=["build_ext", "--inplace", "-q"])
"""


def build_rank_cy(torchreid: str) -> tuple:
    """Build torchreid's ``rank_cy`` in ``scratch/torchreid_rank_cy``; ``(folder, None)`` or ``(None, reason)``."""
    if not torchreid:
        return None, "no torchreid checkout given (--torchreid DIR or TORCHREID_SRC)"
    pyx = Path(torchreid) / "torchreid" / "metrics" / "rank_cylib" / "rank_cy.pyx"
    if not pyx.is_file():
        return None, f"{pyx} not found"
    try:
        import Cython  # noqa: F401
    except ImportError:
        return None, "Cython is not installed (pip install cython)"
    out = ROOT / "scratch" / "torchreid_rank_cy"
    out.mkdir(parents=True, exist_ok=True)
    (out / "rank_cy.pyx").write_bytes(pyx.read_bytes())
    (out / "cython_metrics.py").write_text(CYTHON_RUNNER)
    proc = subprocess.run([sys.executable, "-c", BUILD], cwd=out, capture_output=True, text=True)
    if proc.returncode != 0:
        return None, f"building rank_cy failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
    return out, None


def _timed(cmd, env, cwd=None) -> tuple:
    """Wall time, CPU time (user + system, all threads) and the JSON output of one process."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    elapsed = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[2:4]} failed: {proc.stderr[-2000:]}")
    return elapsed, cpu, json.loads(proc.stdout.strip().splitlines()[-1])


def bench_metrics(torchreid: str = "") -> dict:
    from attnreid.evaluation import compute_distance

    qp, qc, gp, gc = market_ids()
    res = {"what": "whole process, python -m start to exit: CMC (rank 50) + mAP from a Market-size distance "
                   "matrix in an npz (3,368 x 15,913 float32, real ids and cameras, identity-correlated random "
                   "512-d features), attnreid metrics vs torchreid's Cython evaluator on the same file",
           "num_query": len(qp), "num_gallery": len(gp), "repeats": METRICS_REPEATS, "machine": machine()}
    folder, reason = build_rank_cy(torchreid or os.environ.get("TORCHREID_SRC", ""))
    if folder is None:
        res["skipped"] = reason
        print("metrics: skipped:", reason, flush=True)
        return res
    pids, cams = np.concatenate([qp, gp]), np.concatenate([qc, gc])
    f = features(pids, cams, 512, seed=512)
    dist = compute_distance(f[: len(qp)], f[len(qp):])
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    runs = {"attnreid": [], "attnreid_no_intervals": [], "torchreid_cython": []}
    cpu = {k: [] for k in runs}
    outputs = {}
    scratch = ROOT / "scratch" if (ROOT / "scratch").is_dir() else None
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        path = f"{tmp}/market_distmat.npz"
        np.savez(path, distmat=dist, query_pids=qp, gallery_pids=gp, query_camids=qc, gallery_camids=gc)
        commands = {
            "attnreid": ([sys.executable, "-m", "attnreid", "metrics", path, "--json"], None),
            "attnreid_no_intervals": ([sys.executable, "-m", "attnreid", "metrics", path, "--json",
                                       "--bootstrap", "0"], None),
            "torchreid_cython": ([sys.executable, "-m", "cython_metrics", path], str(folder)),
        }
        for _ in range(METRICS_REPEATS):  # alternated, so that a change of load hits all alike
            for name, (cmd, cwd) in commands.items():
                elapsed, used, out = _timed(cmd, env, cwd)
                runs[name].append(round(elapsed, 3))
                cpu[name].append(round(used, 3))
                outputs[name] = out
                print(name, round(elapsed, 3), flush=True)
    med = {k: float(np.median(v)) for k, v in runs.items()}
    med_cpu = {k: float(np.median(v)) for k, v in cpu.items()}
    ours, cy = outputs["attnreid"], outputs["torchreid_cython"]
    res.update({
        "runs_s": runs,
        "median_s": med,
        "ratio_attnreid_to_cython": round(med["attnreid"] / med["torchreid_cython"], 3),
        "ratio_attnreid_no_intervals_to_cython": round(med["attnreid_no_intervals"] / med["torchreid_cython"], 3),
        "cpu_s": cpu,
        "median_cpu_s": med_cpu,
        "cpu_ratio_attnreid_to_cython": round(med_cpu["attnreid"] / med_cpu["torchreid_cython"], 3),
        "target_ratio": 0.35,
        "mAP": ours["mAP"], "rank1": ours["rank1"],
        "abs_diff_mAP_vs_cython": abs(ours["mAP"] - cy["mAP"]),
        "max_abs_diff_cmc_vs_cython": float(np.abs(np.array(ours["cmc"]) - np.array(cy["cmc"])).max()),
        "note": ("torchreid's evaluator keeps mAP and the CMC in float32 (its Cython declares them float), "
                 "attnreid in float64: differences of order 1e-7 are that rounding. attnreid's process imports no "
                 "torch (tests/test_evaluation_onepass.py checks it); the Cython process imports numpy and rank_cy "
                 "only. The attnreid run includes its default 1,000-resample bootstrap intervals; "
                 "attnreid_no_intervals is the same command with --bootstrap 0. Wall times (runs_s) are the "
                 "target's measure; CPU times (cpu_s: user + system over all threads; attnreid sorts on "
                 "the CPUs' threads, the Cython evaluator uses one) are steadier on a shared machine."),
    })
    return res


def main(argv) -> None:
    if argv[:1] == ["--worker"]:
        worker(argv[1], int(argv[2]), int(argv[3]), int(argv[4]), argv[5] if len(argv) > 5 else "",
               argv[6] if len(argv) > 6 else "float32")
        return
    if argv[:1] == ["--msmt-worker"]:
        msmt_worker(*argv[1:5])
        return
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parts", nargs="*", help="rank, rerank, msmt, metrics (default: all)")
    ap.add_argument("--torchreid", default="", help="torchreid source checkout (metrics part)")
    ap.add_argument("--baseline-src", default="", help="an older attnreid src/ folder (msmt part)")
    ap.add_argument("--concurrent", action="store_true", help="msmt: run both variants at once (compare cpu_s)")
    args = ap.parse_args(argv)
    parts = args.parts or ["rank", "rerank", "msmt", "metrics"]
    unknown = set(parts) - {"rank", "rerank", "msmt", "metrics"}
    if unknown:
        ap.error(f"unknown part(s): {', '.join(sorted(unknown))}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    for part, fn, name in (("rank", bench_rank, "evaluation_rank"), ("rerank", bench_rerank, "evaluation_rerank"),
                           ("msmt", lambda: bench_msmt(args.baseline_src, args.concurrent), "evaluation_rerank_msmt"),
                           ("metrics", lambda: bench_metrics(args.torchreid), "evaluation_metrics_process")):
        if part not in parts:
            continue
        res = fn()
        res["machine"]["load_average_at_end"] = os.getloadavg()
        path = RESULTS / f"{name}.json"
        path.write_text(json.dumps(res, indent=2) + "\n")
        print(f"== {path.relative_to(ROOT)}\n{json.dumps(res, indent=2)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
