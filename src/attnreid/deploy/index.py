"""Gallery index on disk, exact search in torch, approximate search with faiss.

An index is a folder::

    INDEX/meta.json          model name, feature dim, config hash, checkpoint, metric, ...
    INDEX/shard-00000.npz    features (n x D float32), paths (n,), camids (n,) -- one per chunk
    INDEX/skipped.json       images that could not be read in the latest build run
    INDEX/faiss/*.faiss      cached faiss indexes (rebuilt when the gallery grows)
    INDEX/calibration.json   the model's calibration (attnreid calibrate), when the build had one:
                             search(..., fpr=) marks each hit as the same person or not

Shards are written as the build goes (atomically), so an interrupted build resumes where
it stopped: a re-run skips every image already in a shard. A new shard takes the number
after the highest one present and never replaces an existing file, so deleting a corrupt
shard and re-running re-indexes exactly its images. One build at a time writes an index
(a lock, :class:`attnreid.safe_io.FolderLock`); a second is refused in one line. Shards are
checked when read (feature size, finite values, keys and lengths). The meta records
:func:`~attnreid.engine.build.config_fingerprint`, so a query model whose features
are not comparable (other model, variant, feature size or input size) is refused.

Distances: ``euclidean_sq`` (squared Euclidean, the papers' test distance) or ``cosine``
(1 - cosine similarity) when the model L2-normalises its feature; smaller is closer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from attnreid.choices import METRICS
from attnreid.errors import AttnReidError, CheckpointError, DataError
from attnreid.evaluation.distance import distance_block
from attnreid.progress import ProgressReporter
from attnreid.safe_io import (LOCK_NAME, FolderLock, fsync_dir, is_temp_name, load_npz, read_json,
                              remove_stale_temps, temp_path, write_text_atomic)

INDEX_VERSION = 1
DEFAULT_CAMERA_REGEX = r"_c(\d+)"  # Market-1501 / DukeMTMC names: 0001_c1s1_001051_00.jpg
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
FAISS_KINDS = ("flat", "ivf", "hnsw")
CALIBRATION_FILE = "calibration.json"


# -- distances and exact search ----------------------------------------------------------

def pairwise_distance(query: torch.Tensor, gallery: torch.Tensor, metric: str,
                      gallery_norms: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Q x G distances (``euclidean_sq`` or ``cosine``), by the evaluation layer's formula.

    ``gallery_norms`` (G,) are the rows' L2 norms when already known.
    """
    if metric not in METRICS:
        raise AttnReidError(f"unknown metric {metric!r}; expected euclidean_sq or cosine")
    return distance_block(query, gallery, metric, gallery_norms)


def _same_camera_mask(query_cams: Optional[torch.Tensor], gallery_cams: torch.Tensor) -> Optional[torch.Tensor]:
    if query_cams is None:
        return None
    return (query_cams[:, None] == gallery_cams[None, :]) & (gallery_cams[None, :] >= 0)


def exact_topk(query: torch.Tensor, gallery: torch.Tensor, k: int, metric: str,
               query_cams: Optional[torch.Tensor] = None, gallery_cams: Optional[torch.Tensor] = None,
               chunk_size: int = 65536, gallery_norms: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The k nearest gallery rows of each query, by brute force over gallery chunks.

    Memory stays at Q x ``chunk_size`` distances however large the gallery.
    ``gallery_norms`` (the rows' L2 norms) can be passed to skip recomputing them. With
    ``query_cams``, gallery rows of the query's camera are excluded (their distance is
    +inf, and they sort last). Returns ``(distances Q x k', indices Q x k')`` with
    ``k' = min(k, G)``, nearest first; excluded slots carry ``inf`` and index -1.
    """
    q = query.float()
    best_d = torch.full((q.shape[0], 0), math.inf)
    best_i = torch.zeros((q.shape[0], 0), dtype=torch.long)
    for start in range(0, gallery.shape[0], chunk_size):
        g = gallery[start:start + chunk_size].float()
        d = pairwise_distance(q, g, metric, None if gallery_norms is None else gallery_norms[start:start + chunk_size])
        if query_cams is not None and gallery_cams is not None:
            d.masked_fill_(_same_camera_mask(query_cams, gallery_cams[start:start + chunk_size]), math.inf)
        kk = min(k, d.shape[1])
        cd, ci = torch.topk(d, kk, dim=1, largest=False, sorted=True)
        best_d = torch.cat([best_d, cd], 1)
        best_i = torch.cat([best_i, ci + start], 1)
        if best_d.shape[1] > k:
            best_d, order = torch.topk(best_d, k, dim=1, largest=False, sorted=True)
            best_i = torch.gather(best_i, 1, order)
    return _refine(q, gallery, best_d, best_i, metric)


def _refine(query: torch.Tensor, gallery: torch.Tensor, dist: torch.Tensor, idx: torch.Tensor,
            metric: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Recompute the k winners' distances from differences and re-sort them.

    The expansion |q|^2 + |g|^2 - 2 q.g that makes brute force fast loses about 1e-7
    of |q|^2 to float32 cancellation (an identical image would be at 0.008, not 0, for
    features of norm 300); sum((q - g)^2) over k candidates is exact and cheap.
    For cosine, 1 - cos = |q/|q| - g/|g||^2 / 2.
    """
    valid = ~torch.isinf(dist)
    cand = gallery[idx.clamp_min(0)].float()
    q = query[:, None, :]
    if metric == "cosine":
        exact = 0.5 * (torch.nn.functional.normalize(q, dim=2) - torch.nn.functional.normalize(cand, dim=2)).pow(2).sum(2)
    else:
        exact = (q - cand).pow(2).sum(2)
    exact = torch.where(valid, exact, torch.full_like(exact, math.inf))
    exact, order = exact.sort(dim=1, stable=True)
    idx = torch.gather(idx, 1, order)
    idx[torch.isinf(exact)] = -1
    return exact, idx


def recall_at_k(approx_idx: np.ndarray | torch.Tensor, exact_idx: np.ndarray | torch.Tensor, k: int) -> float:
    """Mean over queries of |approx top-k  ∩  exact top-k| / k (1.0 = the approximate search lost nothing)."""
    a = np.asarray(approx_idx)[:, :k]
    e = np.asarray(exact_idx)[:, :k]
    if a.shape[0] != e.shape[0]:
        raise ValueError("approx and exact results must have the same number of queries")
    hits = [len(set(ar[ar >= 0].tolist()) & set(er[er >= 0].tolist())) / k for ar, er in zip(a, e)]
    return float(np.mean(hits)) if hits else 0.0


# -- faiss -------------------------------------------------------------------------------

def import_faiss():
    """faiss is an optional extra; without it, one line says how to get it."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        raise AttnReidError("faiss is not installed; pip install 'attnreid[faiss]' (faiss-cpu) "
                            "or use --backend torch") from None
    return faiss


@dataclass
class FaissParams:
    """Approximate-search knobs. ``nlist`` 0 = about 4 sqrt(N) IVF cells (at least 39 points each)."""

    nlist: int = 0
    nprobe: int = 32
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128

    def ivf_nlist(self, n: int) -> int:
        return self.nlist or max(1, min(int(4 * math.sqrt(n)), n // 39))


def vectors_fingerprint(x: np.ndarray) -> str:
    """A short hash of a float32 matrix's shape and bytes: what a cached faiss index was built from."""
    h = hashlib.blake2b(digest_size=8)
    h.update(repr(x.shape).encode())
    h.update(np.ascontiguousarray(x, dtype=np.float32).data)
    return h.hexdigest()


def faiss_cache_prefix(kind: str, metric: str, params: FaissParams, n: int) -> str:
    extra = {"flat": "", "ivf": f"-nlist{params.ivf_nlist(n)}", "hnsw": f"-m{params.hnsw_m}-efc{params.ef_construction}"}
    return f"{kind}{extra.get(kind, '')}-{metric}-"


def faiss_cache_name(kind: str, metric: str, params: FaissParams, n: int, fingerprint: str) -> str:
    """File name of a cached faiss index: changes with the build parameters and with the vectors
    themselves (``fingerprint``, :func:`vectors_fingerprint`), not only with their number."""
    return f"{faiss_cache_prefix(kind, metric, params, n)}{n}-{fingerprint}.faiss"


class FaissSearcher:
    """A faiss index over a gallery: ``flat`` (exact), ``ivf`` (IVF-Flat) or ``hnsw`` (HNSW-Flat).

    For the ``cosine`` metric vectors are L2-normalised and searched by inner product;
    distances come back as 1 - similarity, like :func:`pairwise_distance`. faiss's L2
    distances are already squared, matching ``euclidean_sq``.
    """

    def __init__(self, features: torch.Tensor | np.ndarray, metric: str, kind: str = "flat",
                 params: Optional[FaissParams] = None, cache_dir: Optional[Path] = None):
        """``cache_dir``: where the built index is kept (IVF/HNSW), named by :func:`faiss_cache_name`,
        so that a cache is only ever reused for the very same vectors."""
        if kind not in FAISS_KINDS:
            raise AttnReidError(f"unknown faiss index {kind!r}; expected one of: {', '.join(FAISS_KINDS)}")
        faiss = import_faiss()
        self.faiss, self.metric, self.kind = faiss, metric, kind
        self.params = dataclasses.replace(params) if params else FaissParams()
        x = self._prepare(features)
        self.ntotal = x.shape[0]
        cache = None
        if cache_dir is not None:
            cache = Path(cache_dir) / faiss_cache_name(kind, metric, self.params, len(x), vectors_fingerprint(x))
        self.index = self._read_cache(cache, x.shape) if cache is not None else None
        if self.index is None:
            self.index = self._build(x)
            if cache is not None:
                self._write_cache(cache, faiss_cache_prefix(kind, metric, self.params, len(x)))
        self.tune(self.params.nprobe, self.params.ef_search)

    def _read_cache(self, cache: Path, shape: Tuple[int, ...]):
        """The cached index, or None when absent, unreadable or not of these vectors' size (rebuilt then)."""
        if not cache.is_file():
            return None
        try:
            index = self.faiss.read_index(str(cache))
        except (RuntimeError, MemoryError):
            return None
        return index if (index.ntotal, index.d) == tuple(shape) else None

    def _write_cache(self, cache: Path, prefix: str) -> None:
        """Keep the index (atomically) and drop the caches of older vectors with these parameters."""
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_path(cache)
            try:
                self.faiss.write_index(self.index, str(tmp))
                os.replace(tmp, cache)
            finally:
                tmp.unlink(missing_ok=True)
            for old in cache.parent.glob(f"{prefix}*.faiss"):
                if old != cache:
                    old.unlink(missing_ok=True)
        except (OSError, RuntimeError):
            pass  # a cache that cannot be written (read-only index) costs a rebuild next time, nothing else

    def tune(self, nprobe: int, ef_search: int) -> None:
        """Set the search-time knobs (IVF cells visited, HNSW candidate list); no rebuild needed."""
        self.params.nprobe, self.params.ef_search = nprobe, ef_search
        if self.kind == "ivf":
            self.index.nprobe = nprobe
        elif self.kind == "hnsw":
            self.index.hnsw.efSearch = ef_search

    def _prepare(self, x: torch.Tensor | np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x.numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float32)
        if self.metric == "cosine":
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(x, dtype=np.float32)

    def _build(self, x: np.ndarray):
        faiss, p = self.faiss, self.params
        n, d = x.shape
        mt = faiss.METRIC_INNER_PRODUCT if self.metric == "cosine" else faiss.METRIC_L2
        if self.kind == "flat":
            index = faiss.IndexFlatIP(d) if self.metric == "cosine" else faiss.IndexFlatL2(d)
        elif self.kind == "ivf":
            quantizer = faiss.IndexFlatIP(d) if self.metric == "cosine" else faiss.IndexFlatL2(d)
            index = faiss.IndexIVFFlat(quantizer, d, p.ivf_nlist(n), mt)
            index.train(x)
        else:
            index = faiss.IndexHNSWFlat(d, p.hnsw_m, mt)
            index.hnsw.efConstruction = p.ef_construction
        index.add(x)
        return index

    def _raw(self, q: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        dist, idx = self.index.search(q, k)
        if self.metric == "cosine":
            dist = 1.0 - dist
        dist = np.where(idx < 0, np.inf, dist).astype(np.float32)
        return dist, idx.astype(np.int64)

    def search(self, query: torch.Tensor | np.ndarray, k: int, query_cams: Optional[torch.Tensor] = None,
               gallery_cams: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Same contract as :func:`exact_topk`. Camera exclusion over-fetches (x4 per round) and filters."""
        q = self._prepare(query)
        k = min(k, self.ntotal)
        fetch = k
        while True:
            dist, idx = self._raw(q, fetch)
            if query_cams is None or gallery_cams is None:
                break
            gc = gallery_cams.numpy()[np.maximum(idx, 0)]
            bad = (idx < 0) | ((gc == query_cams.numpy()[:, None]) & (gc >= 0))
            dist = np.where(bad, np.inf, dist)
            enough = (~bad).sum(1).min() >= k
            if enough or fetch >= self.ntotal:
                break
            fetch = min(self.ntotal, fetch * 4)
        order = np.argsort(dist, axis=1, kind="stable")[:, :k]
        dist = np.take_along_axis(dist, order, 1)
        idx = np.where(np.isinf(dist), -1, np.take_along_axis(idx, order, 1))
        return torch.from_numpy(dist), torch.from_numpy(idx)


# -- the index on disk -------------------------------------------------------------------

def list_images(root: str | Path) -> List[Path]:
    """Image files under ``root`` (recursive), sorted, resolved."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    return sorted(p.resolve() for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def parse_camera(path: str | Path, regex: Optional[str] = DEFAULT_CAMERA_REGEX) -> int:
    """Camera id from the file name (first group of ``regex``), or -1 when it does not match."""
    if not regex:
        return -1
    m = re.search(regex, Path(str(path).split("::")[-1]).name)
    if not m:
        return -1
    try:
        return int(m.group(1) if m.groups() else m.group(0))
    except ValueError:
        return -1


def compile_camera_regex(regex: Optional[str]) -> Optional[str]:
    if regex:
        try:
            re.compile(regex)
        except re.error as exc:
            raise AttnReidError(f"--camera-regex {regex!r} is not a valid regular expression ({exc})") from None
    return regex or None


SHARD_RE = re.compile(r"^shard-(\d+)\.npz$")
META_KEYS = ("model", "feature_dim", "config_hash", "metric")  # what search needs from meta.json


def _write_json(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2))


def _shard_number(path: Path) -> int:
    m = SHARD_RE.match(path.name)
    return int(m.group(1)) if m else -1


def write_new_shard(out: Path, **arrays: np.ndarray) -> Path:
    """Write a shard under the number after the highest present; never replace an existing file.

    The name is claimed with a hard link, which fails when the name exists, so even a writer
    without the lock could not overwrite a shard; a taken number moves on to the next.
    """
    number = max((_shard_number(p) for p in GalleryIndex.shard_files(out)), default=-1) + 1
    tmp = temp_path(out / "shard.npz")
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        while True:
            target = out / f"shard-{number:05d}.npz"
            try:
                os.link(tmp, target)
                fsync_dir(out)
                return target
            except FileExistsError:
                number += 1
            except OSError:  # no hard links on this file system: the lock keeps other writers out
                if target.exists():
                    number += 1
                    continue
                os.replace(tmp, target)
                fsync_dir(out)
                return target
    finally:
        tmp.unlink(missing_ok=True)


def read_shard(shard: Path, feature_dim: int, keys: Sequence[str] = ("features", "paths", "camids")) -> Dict[str, np.ndarray]:
    """A shard's arrays, checked: ``features`` n x ``feature_dim`` finite floats, ``paths`` n
    strings, ``camids`` n integers. Anything else is one line naming the shard and the key."""
    fix = "delete it and re-run 'attnreid index build'"
    try:
        z = load_npz(shard, keys, what=" (index shard)")
    except DataError as exc:
        raise DataError(f"{exc}; {fix}") from None
    for key in keys:
        if key not in z:
            raise DataError(f"index shard {shard} has no '{key}' array; {fix}")
    n = len(z["paths"]) if "paths" in z else len(z[keys[0]])
    if "paths" in z and (z["paths"].ndim != 1 or z["paths"].dtype.kind != "U"):
        raise DataError(f"index shard {shard}: 'paths' is {z['paths'].dtype} of shape {z['paths'].shape}, "
                        f"not a list of file names; {fix}")
    if "camids" in z and (z["camids"].shape != (n,) or z["camids"].dtype.kind not in "iu"):
        raise DataError(f"index shard {shard}: 'camids' is {z['camids'].dtype} of shape {z['camids'].shape}, "
                        f"not {n} integers; {fix}")
    f = z.get("features")
    if f is not None:
        if f.ndim != 2 or f.dtype.kind != "f" or f.shape != (n, feature_dim):
            raise DataError(f"index shard {shard}: 'features' is {f.dtype} of shape {f.shape}, but the index "
                            f"holds {feature_dim}-d float features ({n} rows here); {fix}")
        if not np.isfinite(f).all():
            raise DataError(f"index shard {shard} holds non-finite (NaN/inf) features; {fix}")
    return z


def model_meta(extractor) -> Dict[str, Any]:
    """What an index records about the model that made its features."""
    return {
        "model": extractor.model_name,
        "feature_dim": extractor.feature_dim,
        "config_hash": extractor.fingerprint,
        "metric": extractor.metric,
        "flip": extractor.flip,
        "input_size": list(extractor.input_size),
        "checkpoint": extractor.checkpoint,
        "weights_hash": extractor.weights_fingerprint,  # what a calibration must have been made with
        "precision": extractor.precision.describe(),  # informative only: bf16 and fp32 features are comparable
        "backend": extractor.backend,  # likewise: onnxruntime's features match PyTorch's float32
    }


class GalleryIndex:
    """An index folder read into memory: ``meta``, ``features`` (N x D), ``paths``, ``camids`` (N,)."""

    def __init__(self, path: Path, meta: Dict[str, Any], features: torch.Tensor, paths: List[str], camids: torch.Tensor,
                 calibration: Optional[Dict[str, Any]] = None):
        self.path, self.meta, self.features, self.paths, self.camids = path, meta, features, paths, camids
        self.calibration = calibration  # INDEX/calibration.json, checked against the model at build time
        self._norms: Optional[torch.Tensor] = None

    @staticmethod
    def read_meta(path: str | Path) -> Dict[str, Any]:
        path = Path(path)
        meta_file = path / "meta.json"
        if not meta_file.is_file():
            raise DataError(f"{path} is not an attnreid index (no meta.json); build one with 'attnreid index build'")
        try:
            meta = read_json(meta_file, "index meta file")
        except DataError as exc:
            raise DataError(f"{exc}; the index is corrupt") from None
        if not isinstance(meta, dict) or meta.get("version") != INDEX_VERSION:
            raise DataError(f"index {path} has an unsupported format version {meta.get('version') if isinstance(meta, dict) else None}")
        missing = [k for k in META_KEYS if k not in meta]
        if missing:
            raise DataError(f"index meta file {meta_file} has no '{missing[0]}'; rebuild the index into a new folder")
        dim = meta["feature_dim"]
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise DataError(f"index meta file {meta_file}: 'feature_dim' is {dim!r}; expected a whole number >= 1")
        if meta["metric"] not in ("euclidean_sq", "cosine"):
            raise DataError(f"index meta file {meta_file}: 'metric' is {meta['metric']!r}; expected euclidean_sq or cosine")
        return meta

    @staticmethod
    def shard_files(path: Path) -> List[Path]:
        """The shards, in number order (``shard-<n>.npz``)."""
        return sorted((p for p in Path(path).glob("shard-*.npz") if SHARD_RE.match(p.name)), key=_shard_number)

    @classmethod
    def load(cls, path: str | Path) -> "GalleryIndex":
        path = Path(path)
        meta = cls.read_meta(path)
        feats, paths, cams = [], [], []
        for shard in cls.shard_files(path):
            z = read_shard(shard, meta["feature_dim"])
            feats.append(z["features"])
            paths.extend(z["paths"].tolist())
            cams.append(z["camids"])
        if not feats:
            raise DataError(f"index {path} holds no features yet; run 'attnreid index build' first")
        features = torch.from_numpy(np.concatenate(feats).astype(np.float32, copy=False))
        calibration = None
        if (path / CALIBRATION_FILE).is_file():
            from attnreid.deploy.calibration import load_calibration

            calibration = load_calibration(path / CALIBRATION_FILE)
        return cls(path, meta, features, paths, torch.from_numpy(np.concatenate(cams).astype(np.int64)), calibration)

    def __len__(self) -> int:
        return len(self.paths)

    def check_model(self, extractor) -> None:
        """Refuse (one line) a query model whose features cannot be compared with the index's."""
        check_compatible(self.meta, extractor, self.path)

    def threshold(self, fpr: Optional[float] = None, threshold: Optional[float] = None) -> Tuple[float, Dict[str, Any]]:
        """The distance below which a hit is the same person: from the index's calibration for a
        target false-positive rate ``fpr``, or ``threshold`` as given; with what it means."""
        from attnreid.deploy.calibration import resolve_threshold

        return resolve_threshold(self.calibration, fpr, threshold, f"index {self.path}")

    def search(self, query: torch.Tensor, k: int, query_cams: Optional[torch.Tensor] = None,
               backend: str = "torch", faiss_index: str = "flat",
               faiss_params: Optional[FaissParams] = None, fpr: Optional[float] = None,
               threshold: Optional[float] = None):
        """Top-k ``(distances, indices)`` of each query row; see :func:`exact_topk`.

        With ``fpr`` (a false-positive rate the index's calibration knows) or ``threshold`` (a
        distance), also a third Q x k boolean tensor: which hits are the same person
        (distance below the threshold, :meth:`threshold`).
        """
        if fpr is not None or threshold is not None:
            t, _ = self.threshold(fpr, threshold)
            dist, idx = self.search(query, k, query_cams, backend, faiss_index, faiss_params)
            return dist, idx, (dist < t) & (idx >= 0)
        metric = self.meta["metric"]
        gallery_cams = self.camids if query_cams is not None else None
        if backend == "torch":
            if self._norms is None:
                self._norms = torch.linalg.vector_norm(self.features, dim=1)
            return exact_topk(query, self.features, k, metric, query_cams, gallery_cams, gallery_norms=self._norms)
        if backend == "faiss":
            params = faiss_params or FaissParams()
            # flat needs no training, so only IVF/HNSW are worth caching on disk
            cache_dir = None if faiss_index == "flat" else self.path / "faiss"
            searcher = FaissSearcher(self.features, metric, faiss_index, params, cache_dir)
            return searcher.search(query, k, query_cams, gallery_cams)
        raise AttnReidError(f"unknown search backend {backend!r}; expected torch or faiss")


def check_compatible(meta: Dict[str, Any], extractor, where: Path | str) -> None:
    mine = model_meta(extractor)
    keys = ("model", "feature_dim", "config_hash")
    if any(meta.get(k) != mine[k] for k in keys):
        raise CheckpointError(
            f"index {where} was built with model '{meta.get('model')}' (feature dim {meta.get('feature_dim')}, "
            f"config {meta.get('config_hash')}) but the query model is '{mine['model']}' (feature dim "
            f"{mine['feature_dim']}, config {mine['config_hash']}); use the index's checkpoint or rebuild the index")


def _record_backend(meta: Dict[str, Any], record: Dict[str, str], added: int, before: int) -> None:
    """``meta["backends"]``: every backend and precision that made vectors of the index, with
    how many, so a resumed build that switched (e.g. onnxruntime for a big first run, PyTorch
    for a small rest) says so; ``backend`` / ``precision`` are the latest build's."""
    def short(precision: Any) -> Optional[str]:  # "bf16 autocast (CPU has AMX; ...)" -> "bf16 autocast"
        return str(precision).split(" (")[0] if precision else None

    made = meta.get("backends")
    if not isinstance(made, list):  # an index from before this field: its vectors came from its one backend
        made = [{"backend": meta["backend"], "precision": short(meta.get("precision")), "vectors": before}] \
            if before and meta.get("backend") else []
    if added:
        key = {"backend": record["backend"], "precision": short(record["precision"])}
        entry = next((e for e in made if (e.get("backend"), e.get("precision")) == tuple(key.values())), None)
        if entry is None:
            made.append({**key, "vectors": added})
        else:
            entry["vectors"] = int(entry.get("vectors", 0)) + added
    meta["backends"] = made


def build_index(extractor, images_dir: str | Path, out: str | Path, camera_regex: Optional[str] = DEFAULT_CAMERA_REGEX,
                shard_size: int = 1024, progress: bool = True, calibration: Optional[str | Path] = None,
                ctx: Any = None) -> Dict[str, Any]:
    """Index every image under ``images_dir`` into the folder ``out``, resuming a previous run.

    Images already in a shard are skipped; unreadable images are skipped, listed in the
    result and in ``skipped.json`` (and tried again on the next run), never fatal. A
    shard is written every ``shard_size`` images (rounded up to whole batches), so an
    interrupted run loses at most that much work. The folder is locked while the build runs: a
    second build into it is refused in one line. A model that gives non-finite features is
    refused (what came before it is kept). Returns a summary dict (``images``, ``added``,
    ``already_indexed``, ``skipped`` list of ``{"path", "error"}``, ``num_vectors``,
    ``seconds``, ``calibration``, ``world_size``).

    ``calibration`` (a calibration.json of this model; see :func:`attnreid.deploy.calibration.check_fits`,
    refused in one line when it was made with other features) is copied into the index once every
    image is indexed.

    ``ctx`` (:class:`attnreid.distributed.DistContext`, under torchrun): the shards' images
    are dealt out over the ranks, shard ``k`` to rank ``k % world_size``, each rank embeds
    only its own, and rank 0, the only one that locks and writes the folder, writes them in
    order: the same shards one process writes. ``meta.json`` records ``world_size``. The other
    ranks return None.
    """
    from attnreid.distributed import DistContext

    ctx = ctx or DistContext()
    t0 = time.perf_counter()
    out = Path(out)
    camera_regex = compile_camera_regex(camera_regex)
    if not ctx.is_main:  # rank 0 opens the index and says what is left to do (or that it failed)
        todo = ctx.broadcast_object(None)
        if todo is None:
            raise AttnReidError(f"index build into {out} stopped on rank 0")
        _index_images(extractor, [Path(t) for t in todo], out, camera_regex, shard_size, False, "", {}, ctx)
        return None
    try:
        cal = None
        if calibration is not None:
            from attnreid.deploy.calibration import check_fits, load_calibration

            cal = load_calibration(calibration)
            check_fits(cal, model_meta(extractor), f"the index's model ({extractor.checkpoint})", str(calibration))
        images = list_images(images_dir)
        if not images:
            raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {images_dir}")
        _check_index_folder(out)
        lock = FolderLock(out, "index").acquire()
    except BaseException:
        ctx.broadcast_object(None)
        raise
    try:
        try:
            remove_stale_temps([out, out / "faiss"])
            meta, done = _open_index(out, extractor, camera_regex, images_dir)
            todo = [p for p in images if str(p) not in done]
        except BaseException:
            ctx.broadcast_object(None)
            raise
        ctx.broadcast_object([str(p) for p in todo])
        meta["world_size"] = ctx.world_size
        added, skipped = _index_images(extractor, todo, out, camera_regex, shard_size, progress,
                                       f"indexing {Path(images_dir).name}", meta, ctx)
        if cal is not None:  # only once every image is indexed (an interrupted build raised above)
            _write_json(out / CALIBRATION_FILE, cal)
            meta["calibration"] = str(Path(calibration).resolve())
            _write_json(out / "meta.json", meta)
    finally:
        lock.release()
    return {"index": str(out), "images": len(images), "added": added, "already_indexed": len(images) - len(todo),
            "skipped": skipped, "num_vectors": meta["num_vectors"], "seconds": round(time.perf_counter() - t0, 3),
            "calibration": meta.get("calibration"), "world_size": ctx.world_size}


def _check_index_folder(out: Path) -> None:
    """``out`` must be an index, an empty folder or a new path (checked before it is locked)."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file; expected an index folder (or a new path)")
    if out.is_dir() and not (out / "meta.json").is_file():
        if any(e.name != LOCK_NAME and not is_temp_name(e.name) for e in out.iterdir()):
            raise DataError(f"--out {out} exists and is not an attnreid index; choose an empty or new folder")


def _open_index(out: Path, extractor, camera_regex: Optional[str], images_dir: str | Path) -> Tuple[Dict[str, Any], set]:
    """The index's meta (written now for a new index) and the paths its shards already hold."""
    done: set = set()
    if not (out / "meta.json").is_file():
        _check_index_folder(out)
        meta = {"version": INDEX_VERSION, **model_meta(extractor), "camera_regex": camera_regex,
                "images_dir": str(Path(images_dir).resolve()), "num_vectors": 0}
        _write_json(out / "meta.json", meta)
        return meta, done
    meta = GalleryIndex.read_meta(out)
    check_compatible(meta, extractor, out)
    if meta.get("weights_hash") not in (None, extractor.weights_fingerprint):  # its calibration would not fit
        raise CheckpointError(f"index {out} was built with other weights ({meta.get('checkpoint')}); "
                              f"use that checkpoint or another --out")
    if meta.get("camera_regex") != camera_regex:
        raise AttnReidError(f"index {out} was built with --camera-regex {meta.get('camera_regex')!r}, "
                            f"not {camera_regex!r}; use the same one or another --out")
    for shard in GalleryIndex.shard_files(out):
        done.update(read_shard(shard, meta["feature_dim"], keys=("paths",))["paths"].tolist())
    meta["num_vectors"] = len(done)
    return meta, done


def _agree_inference(extractor, first: List[Path], ctx) -> None:
    """Under torchrun, rank 0 settles ``auto`` on the job's first batch and every other rank
    computes exactly that (one index, one backend and precision)."""
    from attnreid.inference.backend import explicit

    if not ctx.enabled or (extractor.inference is not None and extractor.inference.settled):
        return
    if ctx.is_main and first:
        extractor.forward_batch(torch.stack([extractor.preprocess(p) for p in first]))
    asked = ctx.broadcast_object(explicit(extractor.inference) if ctx.is_main and first else None)
    if asked is not None and not ctx.is_main:
        extractor.follow(*asked)


def _embed(extractor, unit: List[Path], out: Path) -> Dict[str, Any]:
    """One shard's images embedded: features and paths of the readable ones, the skipped ones,
    and ``error`` (the features of a batch with a non-finite value are dropped, what came before
    is kept)."""
    feats: List[torch.Tensor] = []
    paths: List[str] = []
    skipped: List[Dict[str, str]] = []
    error = None
    for start in range(0, len(unit), extractor.batch_size):
        tensors, names = [], []
        for p in unit[start:start + extractor.batch_size]:
            try:
                tensors.append(extractor.preprocess(p))
                names.append(str(p))
            except (AttnReidError, OSError, ValueError) as exc:
                skipped.append({"path": str(p), "error": str(exc)})
        if not tensors:
            continue
        f = extractor.forward_batch(torch.stack(tensors))
        bad = (~torch.isfinite(f).all(dim=1)).nonzero().flatten().tolist()
        if bad:
            error = (f"the model gave non-finite (NaN/inf) features for {names[bad[0]]} ({len(bad)} of this batch of "
                     f"{len(names)}); nothing of this batch was added to {out} (check the checkpoint "
                     f"{extractor.checkpoint}, or try --amp off)")
            break
        feats.append(f)
        paths.extend(names)
    return {"features": torch.cat(feats).numpy().astype(np.float32) if feats else None, "paths": paths,
            "skipped": skipped, "error": error, "images": len(unit)}


def _index_images(extractor, todo: List[Path], out: Path, camera_regex: Optional[str], shard_size: int,
                  progress: bool, label: str, meta: Dict[str, Any], ctx) -> Tuple[int, List[Dict[str, str]]]:
    """Extract ``todo`` into new shards of ``shard_size`` images rounded up to whole batches
    (shard ``k`` computed by rank ``k % world_size``, written by rank 0 in order); keep ``meta``
    (``num_vectors``, inference) and ``skipped.json`` up to date, also when interrupted.
    Returns ``(added, skipped)`` (rank 0's; the other ranks return ``(0, [])``)."""
    per_shard = -(-shard_size // extractor.batch_size) * extractor.batch_size
    units = [todo[i:i + per_shard] for i in range(0, len(todo), per_shard)]
    skipped: List[Dict[str, str]] = []
    added = 0
    extractor.expect(len(todo))  # auto's thresholds count the images still to index
    _agree_inference(extractor, todo[:extractor.batch_size], ctx)
    bar = ProgressReporter(label, total=len(todo), enabled=progress and ctx.is_main)
    finished = False
    already = meta.get("num_vectors", 0)
    try:
        for first in range(0, len(units), ctx.world_size):
            k = first + ctx.rank
            parts = ctx.gather_object(_embed(extractor, units[k], out) if k < len(units) else None)
            error = None
            for part in parts or []:  # rank 0: in shard order, up to the first failure
                if part is None or error is not None:
                    continue
                if part["paths"]:
                    cams = np.array([parse_camera(p, camera_regex) for p in part["paths"]], dtype=np.int64)
                    write_new_shard(out, features=part["features"], paths=np.array(part["paths"]), camids=cams)
                    added += len(part["paths"])
                skipped.extend(part["skipped"])
                error = part["error"]
                bar.advance(part["images"])
            error = ctx.broadcast_object(error)
            if error is not None:
                raise DataError(error)
        finished = True
    finally:
        bar.close(ok=finished)
        if ctx.is_main:
            _write_json(out / "skipped.json", skipped)
            meta["num_vectors"] = already + added
            if extractor.inference is not None:  # as settled by this (latest) build
                _record_backend(meta, extractor.inference.record(), added, already)
                meta.update(extractor.inference.record())
            _write_json(out / "meta.json", meta)
    return added, skipped


# -- queries -----------------------------------------------------------------------------

def search_images(index: GalleryIndex, extractor, queries: Sequence[str | Path], k: int = 10,
                  exclude_same_camera: bool = False, backend: str = "torch", faiss_index: str = "flat",
                  faiss_params: Optional[FaissParams] = None, fpr: Optional[float] = None,
                  threshold: Optional[float] = None) -> List[Dict[str, Any]]:
    """Rank the gallery for each query image with the index's model.

    Returns one dict per query: ``query``, ``camera``, ``results`` (list of ``rank``,
    ``path``, ``distance``, ``camera``), nearest first. With ``exclude_same_camera``,
    gallery images from the query's camera (parsed with the index's camera regex) are
    left out, as in the Market-1501 protocol; a query without a camera id is an error.
    With ``fpr`` or ``threshold`` (:meth:`GalleryIndex.threshold`) every result gets ``match``
    (its distance is below the threshold) and every query ``decision`` ("match" when its
    nearest hit matches, else "no match") and ``threshold``.
    """
    if k < 1:
        raise AttnReidError(f"--top-k is {k}; it must be >= 1")
    decide = fpr is not None or threshold is not None
    t = index.threshold(fpr, threshold)[0] if decide else None  # before any image is read
    index.check_model(extractor)
    if fpr is not None:  # the calibrated threshold holds for the weights it was measured with
        from attnreid.deploy.calibration import check_fits

        check_fits(index.calibration, model_meta(extractor), f"the query model ({extractor.checkpoint})",
                   f"of index {index.path}")
    regex = index.meta.get("camera_regex")
    cams = [parse_camera(q, regex) for q in queries]
    if exclude_same_camera:
        if not regex:
            raise AttnReidError(f"index {index.path} records no camera ids (built without a camera regex); "
                                f"cannot exclude same-camera images")
        for q, c in zip(queries, cams):
            if c < 0:
                raise DataError(f"query {q} has no camera id in its name (regex {regex!r}); "
                                f"cannot exclude same-camera images")
    feats = extractor([str(q) for q in queries])
    bad = (~torch.isfinite(feats).all(dim=1)).nonzero().flatten().tolist()
    if bad:
        raise DataError(f"the model gave non-finite (NaN/inf) features for query {queries[bad[0]]}; "
                        f"its distances would be meaningless (check the checkpoint, or try --amp off)")
    qc = torch.tensor(cams, dtype=torch.long) if exclude_same_camera else None
    dist, idx = index.search(feats, k, qc, backend, faiss_index, faiss_params)
    out = []
    for q, c, drow, irow in zip(queries, cams, dist.tolist(), idx.tolist()):
        hits = [(d, i) for d, i in zip(drow, irow) if i >= 0]
        results = [{"rank": r + 1, "path": index.paths[i], "distance": float(d), "camera": int(index.camids[i])}
                   for r, (d, i) in enumerate(hits)]
        entry: Dict[str, Any] = {"query": str(q), "camera": c, "results": results}
        if decide:
            for r in results:
                r["match"] = r["distance"] < t
            entry.update(threshold=t, decision="match" if results and results[0]["match"] else "no match")
        out.append(entry)
    return out
