"""``attnreid data check``: what in a data set will hurt training or make its numbers wrong.

:func:`check_dataset` reads every image once (its bytes are hashed and decoded) and looks
at the identity lists. Each check gives a ``count``, a ``status`` (``ok`` | ``warn`` |
``error``), what it means, and up to :data:`EXAMPLES` examples:

- ``unreadable``: files that cannot be decoded (error: training stops on them, unless
  ``data.skip_bad_images``);
- ``tiny``: images smaller than ``min_height`` x ``min_width`` pixels (warn: too little to
  recognise anyone);
- ``duplicates``: files with identical bytes (SHA-1), counted as the copies beyond the
  first; an error when copies carry different identities (a labelling mistake) or sit in
  both training and test splits (a leak), else a warning;
- ``single_image_ids``: training identities with one image (warn: a triplet needs two);
- ``single_camera_ids``: identities seen by one camera only (warn; sets with cameras only:
  such a training identity cannot be a validation identity, such a test identity has no
  cross-camera match);
- ``query_without_match``: queries with no valid gallery image of their identity under the
  set's protocol (warn: evaluation skips them);
- ``train_test_overlap``: identities (the set's own pids) both in training and in query or
  gallery (warn: the test is not on unseen people).

Memory: one hash per file and the identity lists, no images kept.
"""

from __future__ import annotations

import hashlib
import io
from collections import defaultdict
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from PIL import Image

from attnreid.data.io import read_bytes
from attnreid.errors import DataError

EXAMPLES = 5
MIN_HEIGHT = 32
MIN_WIDTH = 16
MEANING = {
    "unreadable": "files that cannot be decoded",
    "tiny": "images below the minimum size",
    "duplicates": "files whose bytes repeat another file's",
    "single_image_ids": "training identities with a single image",
    "single_camera_ids": "identities seen by a single camera",
    "query_without_match": "queries without a valid gallery match",
    "train_test_overlap": "identities both in training and in query/gallery",
}


def _check(count: int, examples: Sequence[Any], bad: str = "warn", extra: Optional[Dict] = None) -> Dict[str, Any]:
    out = {"count": int(count), "status": bad if count else "ok", "examples": list(examples)[:EXAMPLES]}
    out.update(extra or {})
    return out


def _labelled(dataset) -> List[Tuple[str, str, int, int]]:
    """``(split, path, pid, camid)`` of every image, training pids mapped back to the set's own."""
    source = getattr(dataset, "train_source_pids", None) or []
    out = [("train", p, source[pid] if pid < len(source) else pid, c) for p, pid, c in dataset.train]
    for split in ("query", "gallery"):
        out.extend((split, p, pid, c) for p, pid, c in getattr(dataset, split))
    return out


def read_images(items: Iterable[Tuple[str, str, int, int]], min_height: int, min_width: int,
                progress: Any = None) -> Tuple[List, List, Dict[str, List]]:
    """``(unreadable, tiny, by_hash)``: one read per file."""
    unreadable, tiny = [], []
    by_hash: Dict[str, List] = defaultdict(list)
    for split, path, pid, cam in items:
        try:
            data = read_bytes(path)
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                width, height = img.size
        except DataError as exc:
            unreadable.append({"path": path, "error": str(exc)})
            data = None
        except Exception as exc:  # Pillow raises many types for a broken file; each is "unreadable"
            unreadable.append({"path": path, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"})
            data = None
        if progress is not None:
            progress.advance(1)
        if data is None:
            continue
        if height < min_height or width < min_width:
            tiny.append({"path": path, "size": f"{height}x{width}"})
        by_hash[hashlib.sha1(data).hexdigest()].append((split, path, pid))
    return unreadable, tiny, by_hash


def duplicate_check(by_hash: Dict[str, List]) -> Dict[str, Any]:
    groups = [g for g in by_hash.values() if len(g) > 1]
    mixed_ids = [g for g in groups if len({pid for _, _, pid in g}) > 1]
    leaks = [g for g in groups if {s for s, _, _ in g} & {"train"} and {s for s, _, _ in g} & {"query", "gallery"}]
    examples = [[f"{s}:{p} (id {pid})" for s, p, pid in g] for g in (mixed_ids + leaks + groups)]
    unique_examples = []
    for e in examples:
        if e not in unique_examples:
            unique_examples.append(e)
    return _check(sum(len(g) - 1 for g in groups), unique_examples, "error" if mixed_ids or leaks else "warn",
                  {"groups": len(groups), "groups_with_different_ids": len(mixed_ids),
                   "groups_across_train_and_test": len(leaks)})


def identity_checks(dataset) -> Dict[str, Dict[str, Any]]:
    """The checks on the identity lists alone (no image is read)."""
    source = getattr(dataset, "train_source_pids", None) or []
    train: Dict[int, List] = defaultdict(list)
    for _, pid, cam in dataset.train:
        train[source[pid] if pid < len(source) else pid].append(cam)
    distractor = getattr(dataset, "distractor_pid", None)
    test: Dict[int, set] = defaultdict(set)
    for _, pid, cam in list(dataset.query) + list(dataset.gallery):
        if pid != distractor:
            test[pid].add(cam)
    single = sorted(pid for pid, cams in train.items() if len(cams) == 1)
    out = {"single_image_ids": _check(len(single), single)}
    if getattr(dataset, "cameras_known", True):
        one_cam = [f"train:{pid}" for pid, cams in sorted(train.items()) if len(set(cams)) == 1]
        one_cam += [f"test:{pid}" for pid, cams in sorted(test.items()) if len(cams) == 1]
        out["single_camera_ids"] = _check(len(one_cam), one_cam)
    else:
        out["single_camera_ids"] = {"count": None, "status": "n/a", "examples": [],
                                    "note": "the set has no camera ids"}
    gallery: Dict[int, List[Tuple[str, int]]] = defaultdict(list)
    for path, pid, cam in dataset.gallery:
        gallery[pid].append((path, cam))
    # the set's protocol: a match is a gallery image of the identity from another camera
    # (another file, for sets without cameras); the partial protocol ignores cameras
    ignore_cameras = getattr(dataset, "protocol", "market") == "partial"
    lonely = [(path, pid) for path, pid, cam in dataset.query
              if not any(ignore_cameras or c != cam for _, c in gallery.get(pid, ()))]
    out["query_without_match"] = _check(len(lonely), [p for p, _ in lonely],
                                        extra={"identities": len({pid for _, pid in lonely})})
    overlap = sorted(set(train) & set(test))
    out["train_test_overlap"] = _check(len(overlap), overlap)
    return out


def check_dataset(dataset, min_height: int = MIN_HEIGHT, min_width: int = MIN_WIDTH,
                  progress: bool = False) -> Dict[str, Any]:
    """Every check of the module doc on ``dataset`` (a ReIDDataset); returns the JSON-ready report."""
    from attnreid.progress import ProgressReporter

    items = _labelled(dataset)
    with ProgressReporter(f"checking {len(items)} images", total=len(items), enabled=progress) as bar:
        unreadable, tiny, by_hash = read_images(items, min_height, min_width, bar)
    skipped = [{"path": p, "error": r} for p, r in getattr(dataset, "bad_images", [])]
    checks = {
        "unreadable": _check(len(unreadable) + len(skipped), skipped + unreadable, "error"),
        "tiny": _check(len(tiny), tiny, extra={"min_height": min_height, "min_width": min_width}),
        "duplicates": duplicate_check(by_hash),
        **identity_checks(dataset),
    }
    for name, check in checks.items():
        check["meaning"] = MEANING[name]
    return {"dataset": dataset.name, "root": str(dataset.root), "cameras_known": bool(getattr(dataset, "cameras_known", True)),
            "images": len(items), "stats": dataset.stats(), "checks": checks,
            "status": "error" if any(c["status"] == "error" for c in checks.values()) else
                      "warn" if any(c["status"] == "warn" for c in checks.values()) else "ok"}
