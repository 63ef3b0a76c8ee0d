"""A procedural, occluded person re-ID data set written in the Market-1501 layout.

Why: tests, CI and the demo need a data set that exercises every code path of the real
benchmarks (Market naming, cross-camera protocol, occluded queries) without a download,
is generated in seconds, and is hard enough that an untrained network scores low while a
trained one scores high.

**People.** Each identity draws a build (height, shoulder and hip width, leg gap), skin
and hair colour, hair length, upper clothing (colour, second colour, texture: plain,
horizontal/vertical stripes, checks, a chest band or a left/right split; sleeve length),
lower clothing (trousers, shorts or skirt; colour, plain/stripes/checks), shoes, and a bag
(none, backpack, shoulder bag or hand bag; colour and side). Identity is carried by the
*combination*: colours come from a small palette of 12, so many identities share any
single colour and a colour histogram alone does not separate them.

**Cameras.** Each camera has its own light level, colour cast, noise, blur (a low-quality
camera), background (sky/wall gradient, building blocks, a floor band) and distance to
the people (person height 72-95 % of the frame). The same identity therefore looks
different from camera to camera, as in Market-1501.

**Images.** Per image: pose jitter (stride, mirrored view: the bag changes side),
detector-like crop jitter (centre and top offsets, scale), lighting jitter and JPEG
quality. Occluders cover part of the body: a pole, a car, a bush or another (random)
person standing in front.

**Splits.** Identities ``1 .. n//2`` are training identities, the rest test identities.
Each identity is seen by 2..``num_cameras`` cameras (round-robin over its images). For a
test identity, ``q = clamp(images_per_id // 4, 1, cameras_of_id - 1)`` images, each from a
different camera, are queries; the rest form the gallery. The gallery has no distractors
and every query identity appears in the gallery in at least one other camera. A share
``occluded_query_share`` of the queries is occluded (1.0: Occluded-Duke-like, 0.0:
clean); training images are occluded with probability ``0.2 * occluded_query_share``;
gallery images are never occluded.

**Output.** ``<out>/market1501/{bounding_box_train,bounding_box_test,query}/`` with Market
names ``0001_c1s1_000123_00.jpg`` (pid from 1, camera from 1, frame = a unique image
number), plus ``<out>/market1501/synthetic.json`` (parameters and the occluded queries),
so ``build_dataset("market1501", out)`` reads it. Deterministic for a seed: each image
draws from its own generator seeded by ``(seed, image number)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

from attnreid.data.datasets.base import ReIDDataset
from attnreid.data.datasets.market1501 import Market1501
from attnreid.errors import DataError

GENERATOR_VERSION = 1
MARKET_FOLDER = "market1501"
SPLIT_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
TRAIN_OCCLUSION_FACTOR = 0.2

# A small clothing palette (RGB in 0..1): identities share colours and differ by combination.
PALETTE = np.array(
    [
        [0.08, 0.08, 0.09],  # black
        [0.92, 0.92, 0.90],  # white
        [0.50, 0.50, 0.52],  # grey
        [0.10, 0.15, 0.40],  # navy
        [0.20, 0.45, 0.85],  # blue
        [0.80, 0.12, 0.12],  # red
        [0.15, 0.55, 0.20],  # green
        [0.95, 0.82, 0.15],  # yellow
        [0.45, 0.28, 0.12],  # brown
        [0.85, 0.75, 0.55],  # beige
        [0.95, 0.55, 0.70],  # pink
        [0.45, 0.20, 0.60],  # purple
    ],
    dtype=np.float32,
)
SKIN = np.array(
    [[0.96, 0.80, 0.69], [0.88, 0.67, 0.52], [0.72, 0.52, 0.38], [0.52, 0.36, 0.24], [0.36, 0.24, 0.16]],
    dtype=np.float32,
)
HAIR = np.array(
    [[0.05, 0.04, 0.03], [0.25, 0.15, 0.08], [0.55, 0.40, 0.20], [0.85, 0.75, 0.50], [0.60, 0.60, 0.60]],
    dtype=np.float32,
)
UPPER_TEXTURES = ("plain", "hstripes", "vstripes", "checks", "band", "split")
LOWER_TYPES = ("trousers", "shorts", "skirt")
LOWER_TEXTURES = ("plain", "stripes", "checks")
BAGS = ("none", "backpack", "shoulder", "hand")
OCCLUDERS = ("pole", "car", "bush", "person")


@dataclass
class Person:
    height: float  # fraction of the camera's person height
    shoulder: float  # torso half-width at the shoulders, in person heights
    hip: float
    leg_gap: float
    skin: np.ndarray
    hair: np.ndarray
    long_hair: bool
    upper: np.ndarray
    upper2: np.ndarray
    upper_texture: str
    upper_period: float
    long_sleeves: bool
    lower_type: str
    lower: np.ndarray
    lower2: np.ndarray
    lower_texture: str
    lower_period: float
    shoes: np.ndarray
    bag: str
    bag_colour: np.ndarray
    bag_side: int  # +1 right, -1 left (in the person's unmirrored view)


@dataclass
class Camera:
    gain: float
    cast: np.ndarray  # per-channel multipliers
    blur: int  # passes of a [1, 2, 1] / 4 kernel
    person_scale: float  # person height / image height
    background: np.ndarray  # a larger canvas, cropped per image
    noise_bank: np.ndarray  # sensor noise of this camera, cropped per image (cheaper than drawing it)
    jpeg_quality: int


def _pick(rng: np.random.Generator, n: int) -> int:
    return int(rng.integers(n))


def random_person(rng: np.random.Generator) -> Person:
    """Draw the appearance of one identity (or of an occluding passer-by)."""
    upper_i = _pick(rng, len(PALETTE))
    upper2_i = (upper_i + 1 + _pick(rng, len(PALETTE) - 1)) % len(PALETTE)
    lower_i = _pick(rng, len(PALETTE))
    lower2_i = (lower_i + 1 + _pick(rng, len(PALETTE) - 1)) % len(PALETTE)
    build = float(rng.uniform(0.85, 1.2))
    return Person(
        height=float(rng.uniform(0.9, 1.0)),
        shoulder=0.105 * build,
        hip=0.085 * build,
        leg_gap=float(rng.uniform(0.006, 0.018)),
        skin=SKIN[_pick(rng, len(SKIN))],
        hair=HAIR[_pick(rng, len(HAIR))],
        long_hair=bool(rng.random() < 0.35),
        upper=PALETTE[upper_i],
        upper2=PALETTE[upper2_i],
        upper_texture=UPPER_TEXTURES[_pick(rng, len(UPPER_TEXTURES))],
        upper_period=float(rng.uniform(0.035, 0.07)),
        long_sleeves=bool(rng.random() < 0.6),
        lower_type=LOWER_TYPES[int(rng.choice(3, p=[0.6, 0.25, 0.15]))],
        lower=PALETTE[lower_i],
        lower2=PALETTE[lower2_i],
        lower_texture=LOWER_TEXTURES[int(rng.choice(3, p=[0.6, 0.2, 0.2]))],
        lower_period=float(rng.uniform(0.04, 0.08)),
        shoes=PALETTE[[0, 1, 2, 8][_pick(rng, 4)]],
        bag=BAGS[_pick(rng, len(BAGS))],
        bag_colour=PALETTE[_pick(rng, len(PALETTE))],
        bag_side=1 if rng.random() < 0.5 else -1,
    )


def random_camera(rng: np.random.Generator, height: int, width: int) -> Camera:
    """Draw one camera: light, colour cast, noise, blur, distance and background."""
    bh, bw = int(height * 1.5), width * 3
    yy = np.linspace(0.0, 1.0, bh, dtype=np.float32)[:, None, None]
    top, bottom = rng.uniform(0.3, 0.9, 3).astype(np.float32), rng.uniform(0.2, 0.7, 3).astype(np.float32)
    bg = top * (1 - yy) + bottom * yy + np.zeros((bh, bw, 3), np.float32)
    xs = np.arange(bw)
    for _ in range(int(rng.integers(3, 7))):  # buildings, shop fronts, doors
        x0 = int(rng.integers(0, bw))
        x1 = min(bw, x0 + int(rng.integers(bw // 10, bw // 3)))
        y0 = int(rng.integers(0, bh // 2))
        col = rng.uniform(0.15, 0.85, 3).astype(np.float32)
        bg[y0:, x0:x1] = 0.5 * bg[y0:, x0:x1] + 0.5 * col
    floor_y = int(bh * rng.uniform(0.6, 0.75))
    floor = rng.uniform(0.25, 0.65, 3).astype(np.float32)
    tiles = ((xs[None, :] // max(2, width // 6) + np.arange(bh - floor_y)[:, None] // max(2, height // 16)) % 2)
    bg[floor_y:] = floor * (0.9 + 0.1 * tiles[..., None].astype(np.float32))
    bg += rng.normal(0.0, 0.03, bg.shape).astype(np.float32)  # texture, fixed per camera
    return Camera(
        gain=float(rng.uniform(0.6, 1.3)),
        cast=rng.uniform(0.82, 1.18, 3).astype(np.float32),
        blur=int(rng.integers(0, 3)),
        person_scale=float(rng.uniform(0.72, 0.95)),
        background=np.clip(bg, 0, 1),
        noise_bank=rng.normal(0.0, rng.uniform(0.005, 0.035), (bh, bw, 3)).astype(np.float32),
        jpeg_quality=int(rng.integers(70, 96)),
    )


@lru_cache(maxsize=8)
def _grid(height: int, width: int) -> Tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    return yy + 0.5, xx + 0.5


def _ellipse(u: np.ndarray, v: np.ndarray, cu: float, cv: float, ru: float, rv: float) -> np.ndarray:
    return ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2 <= 1.0


def _band(x: np.ndarray, period: float) -> np.ndarray:
    return np.floor(x / period).astype(np.int32) % 2 == 1


def _texture(kind: str, u: np.ndarray, v: np.ndarray, period: float, c1: np.ndarray, c2: np.ndarray) -> np.ndarray:
    """Clothing colours (N x 3) at person coordinates ``u``, ``v`` (N,), so patterns scale with the person."""
    if kind == "plain":
        return np.broadcast_to(c1, u.shape + (3,))
    if kind == "hstripes":
        pattern = _band(v, period)
    elif kind in ("vstripes", "stripes"):
        pattern = _band(u + 1.0, period)
    elif kind == "checks":
        pattern = _band(u + 1.0, period) ^ _band(v, period)
    elif kind == "band":
        pattern = (v > 0.24) & (v < 0.32)
    else:  # split: left and right halves in different colours
        pattern = u > 0
    return np.where(pattern[:, None], c2, c1)


def draw_person(canvas: np.ndarray, p: Person, cx: float, top: float, ph: float, mirror: bool,
                stride: float, jitter: np.ndarray) -> None:
    """Paint ``p`` on ``canvas`` (H x W x 3, in place).

    ``cx``/``top``/``ph``: centre column, top row and height of the person in pixels;
    ``mirror`` flips the view (the bag changes side); ``stride`` spreads the legs;
    ``jitter`` (3,) multiplies the clothing colours (per-image light on the fabric).
    Only the window the person can cover is computed (the widest part, a bag, stays
    within 0.24 person heights of the centre).
    """
    h, w = canvas.shape[:2]
    r0, r1 = max(0, int(top)), min(h, int(np.ceil(top + ph)))
    c0, c1 = max(0, int(cx - 0.24 * ph)), min(w, int(np.ceil(cx + 0.24 * ph)))
    if r0 >= r1 or c0 >= c1:
        return
    yy, xx = _grid(h, w)
    canvas = canvas[r0:r1, c0:c1]
    u = (xx[r0:r1, c0:c1] - cx) / ph
    v = (yy[r0:r1, c0:c1] - top) / ph
    if mirror:
        u = -u
    au = np.abs(u)

    # Hair behind the head first, then the face.
    hair = _ellipse(u, v, 0.0, 0.068, 0.056, 0.07)
    if p.long_hair:
        hair |= (au < 0.055) & (v > 0.06) & (v < 0.24)
    canvas[hair] = p.hair
    skin = (_ellipse(u, v, 0.0, 0.085, 0.044, 0.055) & (v > 0.055)) | ((au < 0.022) & (v >= 0.12) & (v < 0.16))

    t = np.clip((v - 0.15) / 0.37, 0.0, 1.0)
    torso_w = p.shoulder * (1 - t) + p.hip * t
    torso = (v >= 0.15) & (v < 0.52) & (au < torso_w)
    arm = (v >= 0.16) & (v < 0.49) & (au >= torso_w) & (au < torso_w + 0.042 + 0.03 * t)
    skin |= arm | ((v >= 0.49) & (v < 0.53) & (au >= p.hip) & (au < p.hip + 0.05))
    canvas[skin] = p.skin
    clothed = torso | (arm & (v < (0.46 if p.long_sleeves else 0.26)))
    canvas[clothed] = _texture(p.upper_texture, u[clothed], v[clothed], p.upper_period, p.upper * jitter,
                               p.upper2 * jitter)

    leg_u = au - stride * (v - 0.52).clip(0) * 2
    legs = (v >= 0.52) & (v < 0.95) & (leg_u > p.leg_gap) & (leg_u < p.hip + 0.005)
    if p.lower_type == "trousers":
        cloth = legs
    elif p.lower_type == "shorts":
        cloth = legs & (v < 0.7)
    else:
        cloth = (v >= 0.5) & (v < 0.76) & (au < p.hip + 0.06 * (v - 0.5) / 0.26)
    if p.lower_type != "trousers":
        canvas[legs & ~cloth] = p.skin
    canvas[cloth] = _texture(p.lower_texture, u[cloth], v[cloth], p.lower_period, p.lower * jitter, p.lower2 * jitter)
    canvas[(v >= 0.94) & (v < 0.99) & (leg_u > p.leg_gap) & (leg_u < p.hip + 0.02)] = p.shoes

    if p.bag != "none":
        su = u * p.bag_side  # the bag's side is positive
        if p.bag == "backpack":
            bag = ((np.abs(au - 0.06) < 0.012) & (v >= 0.15) & (v < 0.36)) | (
                (su > p.shoulder - 0.005) & (su < p.shoulder + 0.075) & (v >= 0.17) & (v < 0.42)
            )
        elif p.bag == "shoulder":
            strap = (np.abs(v - (0.16 + (p.shoulder - su) * 1.1)) < 0.012) & (su > -p.shoulder) & (su < p.shoulder)
            bag = strap | ((su > p.hip - 0.01) & (su < p.hip + 0.07) & (v >= 0.4) & (v < 0.52))
        else:
            bag = (su > p.hip + 0.02) & (su < p.hip + 0.1) & (v >= 0.44) & (v < 0.58)
        canvas[bag] = p.bag_colour * jitter


def _blur(img: np.ndarray, passes: int) -> np.ndarray:
    for _ in range(passes):
        img = np.concatenate([img[:1], img, img[-1:]], 0)
        img = 0.25 * img[:-2] + 0.5 * img[1:-1] + 0.25 * img[2:]
        img = np.concatenate([img[:, :1], img, img[:, -1:]], 1)
        img = 0.25 * img[:, :-2] + 0.5 * img[:, 1:-1] + 0.25 * img[:, 2:]
    return img


def draw_occluder(canvas: np.ndarray, kind: str, rng: np.random.Generator, cx: float, top: float, ph: float) -> None:
    """Paint an occluder over part of the person standing at ``cx``/``top``/``ph`` (in place)."""
    h, w = canvas.shape[:2]
    yy, xx = _grid(h, w)
    if kind == "pole":
        pw = ph * rng.uniform(0.07, 0.13)
        x0 = cx + rng.uniform(-0.12, 0.12) * ph - pw / 2
        mask = (xx >= x0) & (xx < x0 + pw)
        shade = 0.6 + 0.4 * np.sin(np.pi * np.clip((xx - x0) / pw, 0, 1))
        col = rng.uniform(0.2, 0.6) * np.array([1.0, 1.0, 1.05], np.float32)
        canvas[mask] = (col * shade[..., None])[mask]
    elif kind == "car":  # parked beside the person, hiding the legs and part of the body
        y0 = top + ph * rng.uniform(0.45, 0.65)
        edge = cx + rng.uniform(-0.25, 0.1) * ph
        from_right = rng.random() < 0.5
        mask = (yy >= y0) & ((xx >= edge) if from_right else (xx < 2 * cx - edge))
        col = PALETTE[_pick(rng, len(PALETTE))]
        canvas[mask] = col
        canvas[mask & (yy < y0 + 0.1 * ph)] = col * 0.3 + 0.1  # windows
        wheel_x = edge + 0.2 * ph if from_right else 2 * cx - edge - 0.2 * ph
        canvas[_ellipse(xx, yy, wheel_x, y0 + 0.45 * ph, 0.1 * ph, 0.08 * ph) & mask] = 0.05
    elif kind == "bush":
        y0 = top + ph * rng.uniform(0.45, 0.7)
        edge = y0 + 0.06 * ph * np.sin(xx / w * rng.uniform(6, 14) + rng.uniform(0, 6))
        mask = yy >= edge
        leaves = rng.uniform(0.0, 1.0, (h, w)).astype(np.float32)
        green = np.array([0.12, 0.38, 0.10], np.float32) * rng.uniform(0.7, 1.3)
        canvas[mask] = (green * (0.7 + 0.6 * leaves[..., None]))[mask]
    else:  # another person, closer to the camera, covering one side of the target
        other = random_person(rng)
        side = 1 if rng.random() < 0.5 else -1
        scale = rng.uniform(1.0, 1.2)
        draw_person(canvas, other, cx + side * ph * rng.uniform(0.12, 0.22), top + ph * rng.uniform(-0.02, 0.1),
                    ph * scale, bool(rng.random() < 0.5), float(rng.uniform(0, 0.03)),
                    rng.uniform(0.9, 1.1, 3).astype(np.float32))


def render_image(person: Person, camera: Camera, rng: np.random.Generator, height: int, width: int,
                 occluder: Optional[str] = None, occluder_rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """One H x W x 3 uint8 picture of ``person`` seen by ``camera``.

    The occluder draws from its own generator, so the same ``rng`` gives the same picture
    with or without the occluder.
    """
    bg = camera.background
    oy = int(rng.integers(0, bg.shape[0] - height + 1))
    ox = int(rng.integers(0, bg.shape[1] - width + 1))
    canvas = bg[oy:oy + height, ox:ox + width].copy()
    # Detector-like boxes: the person is not exactly centred nor exactly scaled.
    ph = height * camera.person_scale * person.height * rng.uniform(0.92, 1.08)
    cx = width / 2 + rng.normal(0.0, 0.06) * width
    top = (height - ph) / 2 + rng.normal(0.0, 0.04) * height
    draw_person(canvas, person, cx, top, ph, bool(rng.random() < 0.5), float(rng.uniform(0, 0.035)),
                rng.uniform(0.92, 1.08, 3).astype(np.float32))
    if occluder is not None:
        draw_occluder(canvas, occluder, occluder_rng if occluder_rng is not None else rng, cx, top, ph)
    canvas *= camera.cast * (camera.gain * rng.uniform(0.9, 1.1))
    img = _blur(canvas, camera.blur)
    ny = int(rng.integers(0, bg.shape[0] - height + 1))
    nx = int(rng.integers(0, bg.shape[1] - width + 1))
    img += camera.noise_bank[ny:ny + height, nx:nx + width]
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


@dataclass
class _Plan:
    pid: int
    cam: int
    split: str
    occluder: Optional[str]


def _plan(num_ids: int, images_per_id: int, num_cameras: int, share: float, seed: int) -> List[_Plan]:
    """Decide every image: identity, camera, split and occluder (see the module docstring).

    Cameras come from a generator per identity and occluders from one per image, so sets
    that differ only in ``occluded_query_share`` hold the same people in the same cameras.
    """
    n_train = max(1, num_ids // 2)
    plans: List[_Plan] = []
    query_index: List[int] = []
    for pid in range(1, num_ids + 1):
        rng = np.random.default_rng([seed, 0, pid])
        m = int(rng.integers(2, min(num_cameras, images_per_id) + 1))
        cams = [int(c) + 1 for c in rng.choice(num_cameras, size=m, replace=False)]
        is_train = pid <= n_train
        n_query = 0 if is_train else max(1, min(m - 1, images_per_id // 4))
        for j in range(images_per_id):
            split = "train" if is_train else ("query" if j < n_query else "gallery")
            occ_rng = np.random.default_rng([seed, 4, len(plans)])
            kind = OCCLUDERS[_pick(occ_rng, len(OCCLUDERS))]
            occ = kind if split == "train" and occ_rng.random() < TRAIN_OCCLUSION_FACTOR * share else None
            if split == "query":
                query_index.append(len(plans))
            plans.append(_Plan(pid, cams[j % m], split, occ))
    n_occ = int(round(share * len(query_index)))
    for k in np.random.default_rng([seed, 5]).permutation(len(query_index))[:n_occ]:
        i = query_index[int(k)]
        plans[i].occluder = OCCLUDERS[_pick(np.random.default_rng([seed, 4, i]), len(OCCLUDERS))]
    return plans


def check_parameters(num_ids: int, images_per_id: int, num_cameras: int, height: int, width: int,
                     occluded_query_share: float, names: Optional[Dict[str, str]] = None) -> None:
    """One line for a parameter out of range, naming it as the caller knows it (``names``: e.g.
    ``{"num_cameras": "--cameras"}`` for the command line; default: the parameter's own name)."""
    n = {k: (names or {}).get(k, k) for k in ("num_ids", "images_per_id", "num_cameras", "occluded_query_share")}
    size = (names or {}).get("height", "image size")
    checks = [
        (num_ids >= 2, f"{n['num_ids']} is {num_ids}; it must be >= 2 (half train, half test identities)"),
        (images_per_id >= 2,
         f"{n['images_per_id']} is {images_per_id}; it must be >= 2 (a query and a gallery image)"),
        (num_cameras >= 2, f"{n['num_cameras']} is {num_cameras}; it must be >= 2 (the protocol is cross-camera)"),
        (num_cameras <= 9,
         f"{n['num_cameras']} is {num_cameras}; it must be <= 9 (Market names hold one camera digit)"),
        (num_ids <= 9999, f"{n['num_ids']} is {num_ids}; it must be <= 9999 (Market names hold a 4-digit pid)"),
        (height >= 16 and width >= 8, f"{size} {height}x{width} is too small; it must be at least 16x8"),
        (height <= 4096 and width <= 4096, f"{size} {height}x{width} is too large; it must be at most 4096x4096"),
        (images_per_id <= 10000, f"{n['images_per_id']} is {images_per_id}; it must be <= 10000"),
        (0.0 <= occluded_query_share <= 1.0,
         f"{n['occluded_query_share']} is {occluded_query_share}; it must be in [0, 1]"),
    ]
    for ok, msg in checks:
        if not ok:
            raise DataError(f"synthetic data set: {msg}")


def generate_synthetic(
    out_dir: str | Path,
    num_ids: int = 60,
    images_per_id: int = 12,
    num_cameras: int = 4,
    height: int = 128,
    width: int = 64,
    occluded_query_share: float = 1.0,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write the set to ``out_dir/market1501`` (atomically: a temp folder, then a rename).

    Returns the Market-layout folder. An existing folder is an error unless ``overwrite``,
    and ``overwrite`` replaces only a set this generator wrote (its ``synthetic.json``): a
    real Market-1501 folder is never deleted. The old set is moved aside, the new one
    renamed in, then the old one removed, so an interruption never leaves neither.
    """
    check_parameters(num_ids, images_per_id, num_cameras, height, width, occluded_query_share)
    out_dir = Path(out_dir)
    target = out_dir / MARKET_FOLDER
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise DataError(f"{target} already exists; remove it or pass overwrite (--overwrite) to replace it")
        if not is_synthetic_folder(target):
            raise DataError(f"{target} was not generated by attnreid (no synthetic.json from its generator); "
                            f"--overwrite replaces only a synthetic set: remove it yourself or choose another --out")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create output folder {out_dir}: {exc.strerror or exc}") from None
    tmp = out_dir / f".{MARKET_FOLDER}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    old = out_dir / f".{MARKET_FOLDER}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _write(tmp, num_ids, images_per_id, num_cameras, height, width, occluded_query_share, seed)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
    finally:
        for leftover in (tmp, old):
            if leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
    return target


def is_synthetic_folder(folder: Path) -> bool:
    """Whether ``folder`` (a real folder, not a link) holds a set this generator wrote."""
    from attnreid.safe_io import read_json

    marker = folder / "synthetic.json"
    if folder.is_symlink() or not folder.is_dir() or not marker.is_file():
        return False
    try:
        meta = read_json(marker)
    except DataError:
        return False
    return isinstance(meta, dict) and meta.get("generator") == "attnreid synthetic"


def _write(folder: Path, num_ids: int, images_per_id: int, num_cameras: int, height: int, width: int,
           share: float, seed: int) -> None:
    for sub in SPLIT_FOLDERS.values():
        (folder / sub).mkdir(parents=True, exist_ok=True)
    people = {pid: random_person(np.random.default_rng([seed, 1, pid])) for pid in range(1, num_ids + 1)}
    cameras = {c: random_camera(np.random.default_rng([seed, 2, c]), height, width) for c in range(1, num_cameras + 1)}
    occluded: Dict[str, str] = {}
    # File creation and JPEG encoding release the GIL: overlap them with the drawing.
    with ThreadPoolExecutor(max_workers=4) as pool:
        pending = []
        for k, plan in enumerate(_plan(num_ids, images_per_id, num_cameras, share, seed)):
            rng = np.random.default_rng([seed, 3, k])
            camera = cameras[plan.cam]
            pixels = render_image(people[plan.pid], camera, rng, height, width, plan.occluder,
                                  np.random.default_rng([seed, 6, k]))
            name = f"{plan.pid:04d}_c{plan.cam}s1_{k:06d}_00.jpg"
            pending.append(pool.submit(_save_jpeg, pixels, folder / SPLIT_FOLDERS[plan.split] / name, camera.jpeg_quality))
            if plan.occluder is not None and plan.split == "query":
                occluded[name] = plan.occluder
        for job in pending:
            job.result()
    meta = {
        "generator": "attnreid synthetic", "version": GENERATOR_VERSION, "num_ids": num_ids,
        "images_per_id": images_per_id, "num_cameras": num_cameras, "height": height, "width": width,
        "occluded_query_share": share, "seed": seed, "occluded_queries": occluded,
    }
    (folder / "synthetic.json").write_text(json.dumps(meta, indent=1))


def _save_jpeg(pixels: np.ndarray, path: Path, quality: int) -> None:
    Image.fromarray(pixels).save(path, quality=quality)


def synthetic_folder_name(num_ids: int, images_per_id: int, num_cameras: int, height: int, width: int,
                          occluded_query_share: float, seed: int) -> str:
    """The folder under a data root that holds the set for these parameters (and generator version)."""
    key = f"{num_ids}-{images_per_id}-{num_cameras}-{height}x{width}-{occluded_query_share:g}-{seed}-v{GENERATOR_VERSION}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    return (f"synthetic_n{num_ids}_k{images_per_id}_c{num_cameras}_{height}x{width}"
            f"_occ{occluded_query_share:g}_s{seed}_{digest}")


def ensure_synthetic(root: str | Path, num_ids: int = 60, images_per_id: int = 12, num_cameras: int = 4,
                     height: int = 128, width: int = 64, occluded_query_share: float = 1.0, seed: int = 0) -> Path:
    """``root/<synthetic_folder_name>`` holding the set, generated on first use and reused after.

    Concurrent first uses are safe: each writes its own temp folder and the first rename
    wins; the others discard theirs.
    """
    check_parameters(num_ids, images_per_id, num_cameras, height, width, occluded_query_share)
    root = Path(root)
    final = root / synthetic_folder_name(num_ids, images_per_id, num_cameras, height, width, occluded_query_share, seed)
    if (final / MARKET_FOLDER / "synthetic.json").is_file():
        return final
    tmp = root / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        generate_synthetic(tmp, num_ids, images_per_id, num_cameras, height, width, occluded_query_share, seed)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MARKET_FOLDER / "synthetic.json").is_file():
                raise DataError(f"cannot create the synthetic data set folder {final}; remove it and retry") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


class SyntheticDataset(ReIDDataset):
    """The synthetic set of this module, generated under ``root`` on first use, read by the Market loader."""

    name = "synthetic"

    def __init__(self, root: str, skip_bad_images: bool = False, num_ids: int = 60, images_per_id: int = 12,
                 num_cameras: int = 4, height: int = 128, width: int = 64, occluded_query_share: float = 1.0,
                 seed: int = 0):
        folder = ensure_synthetic(root, num_ids, images_per_id, num_cameras, height, width, occluded_query_share, seed)
        market = Market1501(str(folder), skip_bad_images=skip_bad_images)
        meta = json.loads((folder / MARKET_FOLDER / "synthetic.json").read_text())
        super().__init__(market.train, market.query, market.gallery, root=market.root, bad_images=market.bad_images)
        self.occluded_queries = meta.get("occluded_queries", {})
