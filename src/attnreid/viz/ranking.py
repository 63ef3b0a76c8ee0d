"""Ranked lists: a query and its top-k gallery images, true matches green, false red.

Input is a run's ``eval_ranks.npz`` (docs/design.md, Engine): ``query_paths``,
``gallery_paths``, ``query_pids``, ``gallery_pids``, ``query_camids``,
``gallery_camids``, ``topk_index`` (Q x k, gallery indices, nearest first) and
``topk_dist`` (Q x k). Images are read with :func:`attnreid.data.io.read_image`, so
paths inside a zip (``/x/Market.zip::...``) work too.

Junk entries follow the Market-1501 protocol (and torchreid's ranked-list pictures): a
gallery image of the query's identity taken by the query's camera is neither right nor
wrong, so it is left out of the picture and of the scores. The ``partial`` protocol
(Partial-REID / Partial-iLIDS) has no such rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from attnreid.data.io import read_image
from attnreid.errors import DataError

RANK_KEYS = ("query_paths", "gallery_paths", "query_pids", "gallery_pids", "query_camids",
             "gallery_camids", "topk_index", "topk_dist")
TRUE, FALSE, JUNK = 1, 0, -1

GREEN = (40, 170, 60)
RED = (220, 40, 40)
QUERY_BORDER = (40, 90, 220)
CELL_W, CELL_H = 64, 128  # a re-ID crop's 1:2 aspect
BORDER = 4


def load_ranks(path: str | Path) -> Dict[str, np.ndarray]:
    """Read and check an ``eval_ranks.npz``; a missing/corrupt file or key is a DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"ranked-list file not found: {path}")
    from attnreid.safe_io import load_npz

    try:
        data = load_npz(path)
    except DataError as exc:
        raise DataError(f"ranked-list file {exc}") from None
    missing = [k for k in RANK_KEYS if k not in data]
    if missing:
        raise DataError(f"ranked-list file {path} lacks key(s): {', '.join(missing)}")
    q, g = len(data["query_paths"]), len(data["gallery_paths"])
    if data["topk_index"].ndim != 2 or data["topk_index"].shape != data["topk_dist"].shape \
            or data["topk_index"].shape[0] != q or len(data["query_pids"]) != q \
            or len(data["gallery_pids"]) != g:
        raise DataError(f"ranked-list file {path} has inconsistent shapes (topk_index "
                        f"{data['topk_index'].shape}, {q} queries, {g} gallery images)")
    for key in ("topk_index", "query_pids", "gallery_pids", "query_camids", "gallery_camids"):
        if key in data and data[key].dtype.kind not in "iu":
            raise DataError(f"ranked-list file {path}: '{key}' holds {data[key].dtype} values; expected integers")
    if data["topk_index"].size and (data["topk_index"].min() < 0 or data["topk_index"].max() >= g):
        raise DataError(f"ranked-list file {path}: topk_index points outside the {g} gallery images")
    return data


def match_status(ranks: Dict[str, np.ndarray], protocol: str = "market") -> np.ndarray:
    """Q x k array: ``TRUE`` (same identity, other camera), ``FALSE``, or ``JUNK``.

    ``JUNK`` (same identity and camera) only under protocols other than ``partial``.
    """
    idx = ranks["topk_index"]
    same_pid = ranks["gallery_pids"][idx] == ranks["query_pids"][:, None]
    same_cam = ranks["gallery_camids"][idx] == ranks["query_camids"][:, None]
    status = np.where(same_pid, TRUE, FALSE)
    if protocol != "partial":
        status = np.where(same_pid & same_cam, JUNK, status)
    return status


def query_scores(ranks: Dict[str, np.ndarray], protocol: str = "market") -> Dict[str, np.ndarray]:
    """Per query: ``first_hit`` (1-based rank of the first true match among the non-junk
    top-k, ``k + 1`` when none) and ``ap_at_k``.

    ``ap_at_k`` = (1/R) sum over true matches at non-junk rank i <= k of (hits up to i)/i,
    with R the query's true matches in the whole gallery: the average precision of the
    query with everything beyond rank k counted as a miss, hence a lower bound of its AP.
    Queries without any true match in the gallery (skipped by the evaluation) get NaN.
    """
    status = match_status(ranks, protocol)
    q_pids, g_pids = ranks["query_pids"], ranks["gallery_pids"]
    q_cams, g_cams = ranks["query_camids"], ranks["gallery_camids"]
    k = status.shape[1]
    first_hit = np.full(len(status), k + 1, dtype=np.int64)
    ap = np.full(len(status), np.nan)
    for i, row in enumerate(status):
        valid = row[row != JUNK]
        hits = np.flatnonzero(valid == TRUE)
        if hits.size:
            first_hit[i] = hits[0] + 1
        relevant = g_pids == q_pids[i]
        if protocol != "partial":
            relevant &= g_cams != q_cams[i]
        total = int(relevant.sum())
        if total:
            ap[i] = float(np.sum(np.arange(1, hits.size + 1) / (hits + 1)) / total)
    return {"first_hit": first_hit, "ap_at_k": ap}


def select_queries(ranks: Dict[str, np.ndarray], num: int = 5, by: str = "ap",
                   protocol: str = "market") -> List[int]:
    """Indices of the ``num`` worst queries, of different identities where there are enough.

    ``by="ap"``: lowest AP within the top-k; ``by="first_hit"``: latest first true match.
    Ties are broken by the rank of the first true match in the whole gallery
    (``first_match_rank`` of eval_ranks.npz, when the file has it; later is worse), then
    by the other score. One query per identity is taken first, so that three equally bad
    queries of one person do not fill the section; more of an identity only when there
    are not ``num`` identities. Queries without a true match are not chosen.
    """
    if by not in ("ap", "first_hit"):
        raise DataError(f"worst queries are chosen by 'ap' or 'first_hit', not {by!r}")
    s = query_scores(ranks, protocol)
    valid = np.flatnonzero(~np.isnan(s["ap_at_k"]))
    full = ranks.get("first_match_rank")
    deep = np.asarray(full)[valid] if full is not None and len(full) == len(s["ap_at_k"]) else np.zeros(len(valid))
    ap, hit = s["ap_at_k"][valid], s["first_hit"][valid]
    # np.lexsort: the last key is the primary one.
    order = np.lexsort((-hit, -deep, ap)) if by == "ap" else np.lexsort((ap, -deep, -hit))
    ranked = [int(i) for i in valid[order]]
    pids = ranks["query_pids"]
    seen, first, rest = set(), [], []
    for q in ranked:
        (rest if pids[q] in seen else first).append(q)
        seen.add(pids[q])
    return (first + rest)[:num]


def _font(size: int = 11) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _cell(path: str, reader: Callable[[str], Image.Image]) -> Image.Image:
    """The image resized to a cell; a grey 'unreadable' cell when it cannot be read, so
    one moved file does not cost the whole report."""
    try:
        return reader(path).convert("RGB").resize((CELL_W, CELL_H), Image.BILINEAR)
    except Exception:
        img = Image.new("RGB", (CELL_W, CELL_H), (170, 170, 170))
        ImageDraw.Draw(img).text((4, CELL_H // 2 - 6), "unreadable", fill=(0, 0, 0), font=_font(10))
        return img


def _default_reader() -> Callable[[str], Image.Image]:
    return read_image


def draw_ranked_list(rows: Sequence[Tuple[str, Dict[str, np.ndarray], int]], out_path: str | Path,
                     topk: int = 10, protocol: str = "market",
                     reader: Optional[Callable[[str], Image.Image]] = None) -> Path:
    """Draw one PNG with one row per ``(label, ranks, query_index)``.

    Each row: the label, then the query (blue border, its pid and camera), then its top-k
    gallery images skipping junk, bordered green for a true match and red for a false
    one, with the rank and the distance written under each. Two rows for the same query
    compare two runs.
    """
    reader = reader or _default_reader()
    font = _font(11)
    gap, sep, label_h, text_h, margin = 4, 18, 16, 28, 6
    n = max(1, topk)
    width = margin * 2 + (n + 1) * (CELL_W + 2 * BORDER + gap) + sep
    row_h = label_h + CELL_H + 2 * BORDER + text_h
    canvas = Image.new("RGB", (width, margin * 2 + row_h * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (label, ranks, qi) in enumerate(rows):
        y0 = margin + r * row_h
        status = match_status(ranks, protocol)[qi]
        keep = np.flatnonzero(status != JUNK)[:n]
        hits = int(np.sum(status[keep] == TRUE))
        draw.text((margin, y0), f"{label}  (query {qi}: {hits} of top-{len(keep)} correct)", fill=(0, 0, 0), font=font)
        y = y0 + label_h
        x = margin
        qpath = str(ranks["query_paths"][qi])
        draw.rectangle([x, y, x + CELL_W + 2 * BORDER - 1, y + CELL_H + 2 * BORDER - 1], fill=QUERY_BORDER)
        canvas.paste(_cell(qpath, reader), (x + BORDER, y + BORDER))
        ty = y + CELL_H + 2 * BORDER + 1
        draw.text((x, ty), "query", fill=(0, 0, 0), font=font)
        draw.text((x, ty + 13), f"id {ranks['query_pids'][qi]} c{ranks['query_camids'][qi]}", fill=(60, 60, 60), font=font)
        x += CELL_W + 2 * BORDER + gap + sep
        for rank, j in enumerate(keep, start=1):
            g = int(ranks["topk_index"][qi, j])
            color = GREEN if status[j] == TRUE else RED
            draw.rectangle([x, y, x + CELL_W + 2 * BORDER - 1, y + CELL_H + 2 * BORDER - 1], fill=color)
            canvas.paste(_cell(str(ranks["gallery_paths"][g]), reader), (x + BORDER, y + BORDER))
            draw.text((x, ty), f"#{rank} {'hit' if status[j] == TRUE else 'miss'}", fill=color, font=font)
            draw.text((x, ty + 13), f"d={float(ranks['topk_dist'][qi, j]):.3g}", fill=(0, 0, 0), font=font)
            x += CELL_W + 2 * BORDER + gap
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_path)
    return out_path


def find_query(ranks: Dict[str, np.ndarray], query_path: str) -> Optional[int]:
    """Index of ``query_path`` among the run's queries (to line two runs up), or None."""
    hits = np.flatnonzero(ranks["query_paths"].astype(str) == str(query_path))
    return int(hits[0]) if hits.size else None
