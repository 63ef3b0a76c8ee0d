"""Synthetic occluders, applied to query images deterministically.

An occluder is a rectangle that covers a controlled share of the image (the *level*,
a fraction of the image area; re-ID crops are tight around the person, so the image
area stands for the body area). Three kinds, chosen to match what occludes people in
Occluded-Duke / Occluded-REID:

- ``block``: an object; per image either a solid colour or a texture (stripes or a
  checkerboard of two colours), chosen at random;
- ``person``: another pedestrian, cut from a gallery image of a *different* identity
  and scaled to cover the rectangle (aspect kept, centre crop);
- ``erasing``: random-erasing noise (Zhong et al. 2020): every covered pixel uniform
  random.

Positions: ``top`` and ``bottom`` are bands touching the upper / lower border (width 70
to 100 % of the image, random horizontal offset); ``side`` is a band touching the left or
right border (height 70 to 100 %, random vertical offset, side chosen at random). The
band's other side is set so that the rectangle covers ``level`` of the image, up to
rounding to whole pixels.

Determinism: every random choice for one image comes from
``numpy.random.default_rng([seed, index])`` (:func:`draw_plan`), independent of the
level, kind and position. The same image therefore keeps the same band width, offset,
colours and donor across levels, so a curve over levels measures coverage, not a change
of occluder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from attnreid.errors import AttnReidError

OCCLUDER_KINDS = ("block", "person", "erasing")
POSITIONS = ("top", "bottom", "side")

# Shortest side of the band, as a share of the image side it runs along.
MIN_BAND_SPAN = 0.7


@dataclass(frozen=True)
class OcclusionPlan:
    """The random draws for one image; shared by every level, kind and position."""

    span: float  # band length as a share of the image side it runs along, in [MIN_BAND_SPAN, 1]
    offset: float  # where the band sits along that side, in [0, 1] of the free room
    right: bool  # side position: band on the right border (else the left)
    textured: bool  # block: texture (else solid colour)
    stripes: bool  # block texture: stripes (else checkerboard)
    colors: Tuple[Tuple[int, int, int], Tuple[int, int, int]]
    period: int  # block texture: stripe / checker period in pixels
    donor: float  # person: which donor, as a share of the donor list
    noise_seed: int  # erasing: seed of the pixel noise


def draw_plan(seed: int, index: int) -> OcclusionPlan:
    """All random choices for image ``index`` under ``seed`` (a fixed number of draws)."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index)])
    u = rng.random(6)
    colors = rng.integers(0, 256, size=(2, 3))
    return OcclusionPlan(
        span=MIN_BAND_SPAN + (1.0 - MIN_BAND_SPAN) * float(u[0]),
        offset=float(u[1]),
        right=bool(u[2] < 0.5),
        textured=bool(u[3] < 0.5),
        stripes=bool(u[4] < 0.5),
        colors=(tuple(int(c) for c in colors[0]), tuple(int(c) for c in colors[1])),  # type: ignore[arg-type]
        period=int(rng.integers(4, 13)),
        donor=float(u[5]),
        noise_seed=int(rng.integers(0, 2**31 - 1)),
    )


def check_level(level: float) -> float:
    """A level is a fraction of the image area in [0, 1]."""
    if not 0.0 <= float(level) <= 1.0:
        raise AttnReidError(f"occlusion level {level} is outside [0, 1] (a share of the image area)")
    return float(level)


def occlusion_box(width: int, height: int, level: float, position: str, plan: OcclusionPlan) -> Tuple[int, int, int, int]:
    """The occluded rectangle ``(x1, y1, x2, y2)`` (pixels, x2/y2 exclusive).

    Area ``(x2 - x1) * (y2 - y1)`` is ``level * width * height`` up to one row or
    column of pixels; an empty box for level 0.
    """
    level = check_level(level)
    if position not in POSITIONS:
        raise AttnReidError(f"occlusion position '{position}' is unknown; expected one of: {', '.join(POSITIONS)}")
    if level == 0.0:
        return (0, 0, 0, 0)
    area = level * width * height
    if position in ("top", "bottom"):
        # A band too short to hold the area along its length would need depth > height.
        along = max(plan.span, level)
        bw = min(width, max(1, round(along * width)))
        bh = min(height, max(1, round(area / bw)))
        x1 = round(plan.offset * (width - bw))
        y1 = 0 if position == "top" else height - bh
        return (x1, y1, x1 + bw, y1 + bh)
    along = max(plan.span, level)
    bh = min(height, max(1, round(along * height)))
    bw = min(width, max(1, round(area / bh)))
    y1 = round(plan.offset * (height - bh))
    x1 = width - bw if plan.right else 0
    return (x1, y1, x1 + bw, y1 + bh)


def _block_pixels(w: int, h: int, plan: OcclusionPlan) -> np.ndarray:
    a = np.array(plan.colors[0], dtype=np.uint8)
    if not plan.textured:
        return np.broadcast_to(a, (h, w, 3)).copy()
    b = np.array(plan.colors[1], dtype=np.uint8)
    ys, xs = np.mgrid[0:h, 0:w]
    if plan.stripes:
        mask = (ys // plan.period) % 2 == 0
    else:
        mask = ((ys // plan.period) + (xs // plan.period)) % 2 == 0
    return np.where(mask[..., None], a, b).astype(np.uint8)


def _person_pixels(w: int, h: int, donor: Image.Image) -> np.ndarray:
    """The donor scaled to cover a w x h box (aspect kept) and centre-cropped to it."""
    dw, dh = donor.size
    scale = max(w / dw, h / dh)
    sw, sh = max(w, round(dw * scale)), max(h, round(dh * scale))
    scaled = donor.convert("RGB").resize((sw, sh), Image.BILINEAR)
    left, top = (sw - w) // 2, (sh - h) // 2
    return np.asarray(scaled.crop((left, top, left + w, top + h)), dtype=np.uint8)


def _erasing_pixels(w: int, h: int, plan: OcclusionPlan) -> np.ndarray:
    return np.random.default_rng(plan.noise_seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def occlude(
    image: Image.Image,
    level: float,
    kind: str,
    position: str,
    plan: OcclusionPlan,
    donor: Optional[Image.Image] = None,
) -> Tuple[Image.Image, float]:
    """Occlude ``image`` (returns a new RGB image and the share of its area covered).

    ``donor`` is the other person's image, required for ``kind='person'``.
    """
    if kind not in OCCLUDER_KINDS:
        raise AttnReidError(f"occluder kind '{kind}' is unknown; expected one of: {', '.join(OCCLUDER_KINDS)}")
    out = np.array(image.convert("RGB"), dtype=np.uint8)
    height, width = out.shape[:2]
    x1, y1, x2, y2 = occlusion_box(width, height, level, position, plan)
    w, h = x2 - x1, y2 - y1
    if w <= 0 or h <= 0:
        return Image.fromarray(out), 0.0
    if kind == "block":
        patch = _block_pixels(w, h, plan)
    elif kind == "erasing":
        patch = _erasing_pixels(w, h, plan)
    else:
        if donor is None:
            raise AttnReidError("occluder kind 'person' needs a donor image of another identity")
        patch = _person_pixels(w, h, donor)
    out[y1:y2, x1:x2] = patch
    return Image.fromarray(out), (w * h) / float(width * height)


def choose_donor(plan: OcclusionPlan, pid: int, donors: Sequence[Tuple[str, int]]) -> str:
    """The path of the donor for a query of identity ``pid``: a gallery image of another identity.

    ``donors`` is the gallery as ``(path, pid)``; the choice is ``plan.donor`` along the
    list of images whose pid differs from ``pid``. Junk (pid < 0) is never a donor, and
    pid 0 only when no other identity exists: Market-1501 labels its distractors (false
    detections, background) 0, and they are not people.
    """
    others = [path for path, p in donors if p != pid and p > 0]
    if not others:
        others = [path for path, p in donors if p != pid and p == 0]
    if not others:
        raise AttnReidError(f"occluder kind 'person' needs a gallery image of an identity other than {pid}; none found")
    return others[min(len(others) - 1, int(plan.donor * len(others)))]


class QueryOccluder:
    """Occludes query ``index`` of identity ``pid`` for one (level, kind, position).

    ``read_image`` loads a donor by path (the data layer's reader); donors are cached.
    """

    def __init__(
        self,
        level: float,
        kind: str,
        position: str,
        seed: int,
        donors: Sequence[Tuple[str, int]] = (),
        read_image=None,
    ):
        if kind not in OCCLUDER_KINDS:
            raise AttnReidError(f"occluder kind '{kind}' is unknown; expected one of: {', '.join(OCCLUDER_KINDS)}")
        if position not in POSITIONS:
            raise AttnReidError(f"occlusion position '{position}' is unknown; expected one of: {', '.join(POSITIONS)}")
        self.level = check_level(level)
        self.kind, self.position, self.seed = kind, position, int(seed)
        self.donors = list(donors)
        self.read_image = read_image
        self._cache: dict = {}

    def _donor(self, plan: OcclusionPlan, pid: int) -> Image.Image:
        path = choose_donor(plan, pid, self.donors)
        if path not in self._cache:
            if self.read_image is None:
                raise AttnReidError("occluder kind 'person' needs a reader for the donor images")
            self._cache[path] = self.read_image(path)
        return self._cache[path]

    def __call__(self, image: Image.Image, index: int, pid: int) -> Tuple[Image.Image, float]:
        plan = draw_plan(self.seed, index)
        donor = self._donor(plan, pid) if self.kind == "person" and self.level > 0 else None
        return occlude(image, self.level, self.kind, self.position, plan, donor)
