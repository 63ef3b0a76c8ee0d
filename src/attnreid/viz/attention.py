"""Attention overlays from the models' own attention (not generic activation maps).

MHSA-Net (``forward_attention`` -> ``attention`` B x K x h x w, ``beta`` B x K): one panel
per head k, the head's attention alpha_k (Eq. 1-2, on the backbone's h x w grid)
upsampled bilinearly to the input size and blended over the image with a jet colour map;
the panel title gives beta_k, the weight SAFFM (Eq. 6-7) gives that head in p*.

HA-CNN (``soft_attention``: list over levels of B x h_l x w_l, ``regions``: list of
B x T x 4 boxes x1, y1, x2, y2 in input pixels, ``region_levels``): one panel with the
hard regions (HA Eq. 5) drawn as boxes on the image, then one panel per level with the
soft attention (HA Eq. 1-4, averaged over channels) blended over the image and that
level's regions on top.

The image is shown exactly as the network saw it: resized to the model's input size,
so the grid and the boxes line up with the pixels.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from attnreid.data.io import read_image
from attnreid.data.transforms import build_transforms
from attnreid.errors import AttnReidError
from attnreid.safe_io import save_figure, write_text_atomic
from attnreid.evaluation.attention_stats import beta_entropy, beta_entropy_max, head_overlap
from attnreid.models.registry import MODELS, find_spec
from attnreid.viz.page import CSS, GENERATOR_TAG, check_page_folder

REGION_COLOURS = ["#00e5ff", "#ffea00", "#ff3d00", "#76ff03", "#d500f9", "#ffffff", "#2979ff", "#ff9100"]


def upsample_map(grid: np.ndarray | torch.Tensor, height: int, width: int) -> np.ndarray:
    """Bilinear upsampling of an h x w map to height x width (align_corners=False, as
    the feature grid's cells cover the image's pixels)."""
    t = torch.as_tensor(np.asarray(grid, dtype=np.float32))[None, None]
    return F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)[0, 0].numpy()


def normalise_map(m: np.ndarray, low: Optional[float] = None, high: Optional[float] = None) -> np.ndarray:
    """Scale to [0, 1] by ``low``/``high`` (default: the map's own min and max).

    A constant map (e.g. HA-CNN channel-only attention) becomes all zeros rather than a
    division by zero.
    """
    low = float(np.min(m)) if low is None else low
    high = float(np.max(m)) if high is None else high
    if high - low <= 1e-12:
        return np.zeros_like(m, dtype=np.float32)
    return np.clip((m - low) / (high - low), 0.0, 1.0).astype(np.float32)


def overlay(image: np.ndarray, heat01: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a [0, 1] map, coloured by ``cmap``, over an H x W x 3 uint8 image:
    ``(1 - alpha) * image + alpha * colour``."""
    import matplotlib  # heavy: imported only when drawing

    colour = matplotlib.colormaps[cmap](heat01)[..., :3] * 255.0
    return ((1.0 - alpha) * image.astype(np.float32) + alpha * colour).round().clip(0, 255).astype(np.uint8)


def mhsanet_panels(image: np.ndarray, attention: np.ndarray, beta: Optional[np.ndarray],
                   scale: str = "map", alpha: float = 0.5) -> List[Dict[str, Any]]:
    """Panels of one image: the input, then head k's alpha_k (K x h x w) over it.

    ``scale="map"`` stretches each head's map to its own min..max (where each head
    looks); ``"shared"`` uses one min..max over all heads (how peaked each head is
    compared with the others).
    """
    h, w = image.shape[:2]
    maps = [upsample_map(a, h, w) for a in attention]
    lo, hi = (float(min(m.min() for m in maps)), float(max(m.max() for m in maps))) if scale == "shared" else (None, None)
    panels = [{"title": "input", "image": image, "boxes": []}]
    for k, m in enumerate(maps):
        title = f"head {k + 1}" + (f"\nβ={float(beta[k]):.3f}" if beta is not None else "")
        panels.append({"title": title, "image": overlay(image, normalise_map(m, lo, hi), alpha), "boxes": []})
    return panels


def hacnn_panels(image: np.ndarray, soft: Sequence[np.ndarray], regions: Sequence[np.ndarray],
                 region_levels: Sequence[int], hard: bool = True, alpha: float = 0.5) -> List[Dict[str, Any]]:
    """Panels of one image: the input with every level's hard regions, then each
    level's soft attention (h_l x w_l) over the image with that level's regions."""
    h, w = image.shape[:2]
    by_level = dict(zip(region_levels, regions))
    all_boxes = [(lvl, b) for lvl in region_levels for b in by_level[lvl]]
    what = "hard regions" if hard else "fixed stripes"
    panels = [{"title": f"input + {what}\n(levels {', '.join(map(str, region_levels))})" if all_boxes else "input",
               "image": image, "boxes": all_boxes}]
    for level, m in enumerate(soft, start=1):
        up = upsample_map(m, h, w)
        panels.append({"title": f"level {level} soft attn\n[{float(np.min(m)):.2f}, {float(np.max(m)):.2f}]",
                       "image": overlay(image, normalise_map(up), alpha),
                       "boxes": [(level, b) for b in by_level.get(level, [])]})
    return panels


def render_panels(panels: Sequence[Dict[str, Any]], out_path: str | Path, title: str = "") -> Path:
    """One row of panels to a PNG; boxes (x1, y1, x2, y2 in pixels) drawn as rectangles,
    one colour per region index, a dashed line for levels after the first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(1.45 * n + 0.2, 3.7), dpi=100, squeeze=False)
    for ax, p in zip(axes[0], panels):
        ax.imshow(p["image"], interpolation="bilinear")
        first_level = min((lvl for lvl, _ in p["boxes"]), default=None)
        counts: Dict[int, int] = {}
        for lvl, (x1, y1, x2, y2) in p["boxes"]:
            t = counts.get(lvl, 0)
            counts[lvl] = t + 1
            # imshow puts pixel i's centre at i: the image's left edge is at -0.5.
            ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, linewidth=1.6,
                                   edgecolor=REGION_COLOURS[t % len(REGION_COLOURS)],
                                   linestyle="-" if lvl == first_level else "--"))
        ax.set_title(p["title"], fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out_path = Path(out_path)
    save_figure(fig, out_path)
    plt.close(fig)
    return out_path


def attention_maps(model: torch.nn.Module, batch: torch.Tensor) -> Dict[str, Any]:
    """``model.forward_attention`` in eval mode without gradients, as numpy arrays.

    A model without attention (the baseline) raises AttnReidError with one line.
    """
    fn = getattr(model, "forward_attention", None)
    if fn is None:
        name = getattr(model, "model_name", type(model).__name__)
        with_maps = ", ".join(spec.name for spec in MODELS.values() if spec.attention is not None)
        raise AttnReidError(f"model '{name}' has no attention maps; use a model that has them ({with_maps})")
    model.eval()
    with torch.no_grad():
        out = fn(batch)

    def to_np(v):
        if isinstance(v, torch.Tensor):
            return v.detach().float().cpu().numpy()
        if isinstance(v, (list, tuple)):
            return [to_np(x) for x in v]
        return v

    return {k: to_np(v) for k, v in out.items()}


def explain_images(model: torch.nn.Module, images: Sequence[Tuple[str, Image.Image]], out_dir: str | Path,
                   height: int, width: int, transform: Callable[[Image.Image], torch.Tensor],
                   scale: str = "map", batch_size: int = 16, device: str | torch.device = "cpu",
                   prefix: str = "") -> List[Dict[str, Any]]:
    """Write one PNG of panels per image; return ``[{"image", "png", "beta"?}]``.

    ``transform`` turns a PIL image into the normalised 3 x height x width input (the
    data layer's test transform); the panels show the image resized to the same size.
    """
    if scale not in ("map", "shared"):
        raise AttnReidError(f"attention scale must be 'map' or 'shared', not {scale!r}")
    out_dir = Path(out_dir)
    name = getattr(model, "model_name", type(model).__name__)
    results: List[Dict[str, Any]] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        batch = torch.stack([transform(img) for _, img in chunk]).to(device)
        maps = attention_maps(model, batch)
        for b, (path, img) in enumerate(chunk):
            shown = np.asarray(img.convert("RGB").resize((width, height), Image.BILINEAR))
            if "attention" in maps:
                beta = maps["beta"][b] if maps.get("beta") is not None else None
                panels = mhsanet_panels(shown, maps["attention"][b], beta, scale=scale)
            elif "soft_attention" in maps:
                levels = list(maps.get("region_levels") or range(1, len(maps["regions"]) + 1))
                hard = getattr(model, "learn_regions", True)
                panels = hacnn_panels(shown, [s[b] for s in maps["soft_attention"]],
                                      [r[b] for r in maps["regions"]], levels, hard=hard)
            else:
                raise AttnReidError(f"model '{name}' returned no attention maps (keys: {', '.join(maps)})")
            index = start + b
            diversity = head_diversity(maps["attention"][b], beta) if "attention" in maps else {}
            title = f"{name}: {Path(str(path).split('::')[-1]).name}"
            if diversity:
                title += f"  ({diversity_text(diversity)})"
            png = render_panels(panels, out_dir / f"{prefix}attention_{index:03d}.png", title=title)
            entry: Dict[str, Any] = {"image": str(path), "png": str(png), **diversity}
            if "attention" in maps and maps.get("beta") is not None:
                entry["beta"] = [round(float(x), 4) for x in maps["beta"][b]]
            results.append(entry)
    return results


def head_diversity(attention: np.ndarray, beta: Optional[np.ndarray]) -> Dict[str, float]:
    """One image's ``head_overlap`` (K >= 2) and ``beta_entropy`` / ``beta_entropy_max`` (nats).

    attention: K x h x w, beta: K or None; see :mod:`attnreid.evaluation.attention_stats`.
    """
    out: Dict[str, float] = {}
    overlap = head_overlap(torch.as_tensor(attention)[None])
    if overlap is not None:
        out["head_overlap"] = round(overlap, 4)
    if beta is not None:
        out["beta_entropy"] = round(beta_entropy(torch.as_tensor(beta)[None]), 4)
        out["beta_entropy_max"] = round(beta_entropy_max(len(beta)), 4)
    return out


def diversity_text(stats: Dict[str, Any]) -> str:
    """``head overlap 0.82 · β entropy 0.41 of ln K = 1.39 nats`` from whichever keys are present."""
    parts = []
    if "head_overlap" in stats:
        parts.append(f"head overlap {stats['head_overlap']:.2f}")
    if "beta_entropy" in stats:
        entropy = max(0.0, stats["beta_entropy"])  # files from before beta_entropy clamped -0.0
        parts.append(f"β entropy {entropy:.2f} of ln K = {stats['beta_entropy_max']:.2f} nats")
    return " · ".join(parts)


def write_index(entries: Sequence[Dict[str, Any]], out_dir: str | Path, model_name: str) -> Path:
    """A small self-contained index.html showing every overlay with its source path."""
    e = html.escape
    out_dir = Path(out_dir)
    body = "".join(
        f'<figure><img src="{e(Path(x["png"]).name)}" alt="attention of {e(x["image"])}">'
        f'<figcaption>{e(x["image"])}</figcaption></figure>' for x in entries)
    legend = LEGENDS.get(attention_kind(model_name), "")
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{GENERATOR_TAG}<title>attention: {e(model_name)}'
            f'</title><style>{CSS}</style></head><body><h1>Attention of {e(model_name)}</h1>'
            f'<p class="meta">{e(legend)}</p>{body}</body></html>\n')

    return write_text_atomic(out_dir / "index.html", page)


# By what the model's forward_attention returns (its registry entry's ``attention``).
LEGENDS = {
    "heads": "One panel per head: the head's attention alpha_k over the feature grid, upsampled to the "
               "image (red: attended, blue: ignored; each map stretched to its own range). beta is the "
               "weight SAFFM gives that head in the fused feature p*.",
    "levels": "First panel: the hard regions (one colour per region; solid: level 1, dashed: later levels). "
             "Then each level's soft attention (spatial x channel, averaged over channels; red high, blue "
             "low; its value range in brackets) with that level's regions.",
}


def attention_kind(model_name: str) -> Optional[str]:
    """What ``model_name``'s ``forward_attention`` returns (its registry entry's ``attention``), or None."""
    spec = find_spec(model_name)
    return spec.attention if spec is not None else None


def read_images(image_paths: Sequence[str]) -> List[Tuple[str, Image.Image]]:
    """Every image read, before any model is loaded: a file that is not a picture fails fast,
    in one line naming it."""
    if not image_paths:
        raise AttnReidError("explain needs at least one image")
    return [(str(p), read_image(str(p))) for p in image_paths]


def explain(model: torch.nn.Module, images: Sequence[Tuple[str, Image.Image]], out_dir: str | Path, data: Any,
            scale: str = "map", device: str | torch.device = "cpu", prefix: str = "",
            index: bool = True, overwrite: bool = False) -> Dict[str, Any]:
    """``attnreid explain``: overlays of ``images`` (from :func:`read_images`) as ``model`` (eval
    mode, on ``device``) sees them, and ``index.html``. ``data`` is the model's data config
    (``height``, ``width``, ``mean``, ``std``: its test transform). With ``index``, a folder holding
    files but no attnreid page is refused unless ``overwrite`` (:func:`attnreid.viz.page.check_page_folder`)."""
    if index:
        check_page_folder(Path(out_dir), overwrite)
    transform = build_transforms(data.height, data.width, data.mean, data.std, train=False, flip=False,
                                 random_erasing=0.0)
    entries = explain_images(model, images, out_dir, data.height, data.width, transform, scale=scale, device=device,
                             prefix=prefix)
    name = getattr(model, "model_name", type(model).__name__)
    page = write_index(entries, out_dir, name) if index else None
    return {"model": name, "index": str(page) if page else None, "images": entries}
