"""PK sampler, tensor transforms, and the train/test loaders (workers, zip paths, bad images)."""

from __future__ import annotations

import zipfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from attnreid.data.datasets import build_dataset
from attnreid.data.loader import ImageDataset, build_test_loader, build_train_loader
from attnreid.data.sampler import PKSampler
from attnreid.data.transforms import RandomErasing, build_transforms, hflip, normalize, resize, to_tensor
from attnreid.errors import DataError


# ---- PK sampler ----------------------------------------------------------------------

PIDS = [0] * 9 + [1] * 5 + [2] * 2 + [3] * 4 + [4] * 1 + [5] * 7  # ids 2 and 4 have fewer than K = 4


def test_pk_batches_hold_p_ids_times_k_images():
    sampler = PKSampler(PIDS, batch_size=12, num_instances=4, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) > 0
    for batch in batches:
        counts = Counter(PIDS[i] for i in batch)
        assert len(batch) == 12 and len(counts) == 3 and set(counts.values()) == {4}
    # An identity with fewer than K images is sampled with replacement, still K times in its batch
    # (checked above); over a few epochs it does get picked.
    seen = Counter()
    for epoch in range(6):
        sampler.set_epoch(epoch)
        seen.update(PIDS[i] for b in sampler for i in b)
    assert seen[4] > 0 and seen[4] % 4 == 0 and seen[2] > 0


def test_pk_deterministic_per_seed_and_epoch():
    a, b = PKSampler(PIDS, 8, 4, seed=3), PKSampler(PIDS, 8, 4, seed=3)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    b.set_epoch(1)
    assert list(a) == list(b)
    assert list(PKSampler(PIDS, 8, 4, seed=4)) != first


@pytest.mark.parametrize("mode", ["images", "identities"])
def test_pk_distributed_ranks_split_the_global_batches(mode):
    pids = [i // 6 for i in range(60)]  # 10 ids x 6 images
    full = list(PKSampler(pids, 16, 2, seed=0, epoch_mode=mode))  # one process with the global batch
    ranks = [list(PKSampler(pids, 8, 2, seed=0, rank=r, world_size=2, epoch_mode=mode)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(full) > 0
    assert [a + b for a, b in zip(*ranks)] == full


def test_pk_errors():
    with pytest.raises(DataError, match="multiple"):
        PKSampler(PIDS, 10, 4)
    with pytest.raises(DataError, match="multiple"):
        PKSampler(PIDS, 0, 4)
    with pytest.raises(DataError, match="at least P"):
        PKSampler(PIDS, 32, 4)
    with pytest.raises(DataError, match=r"rank 2 is outside 0\.\.1 \(world_size 2\)"):
        PKSampler(PIDS, 8, 4, rank=2, world_size=2)
    assert len(list(PKSampler(PIDS, 4, 1))) > 0  # K = 1 is a PK batch too (P = 4 identities)
    with pytest.raises(DataError, match="data.epoch_mode is 'steps'; expected images or identities"):
        PKSampler(PIDS, 8, 4, epoch_mode="steps")


def test_pk_epoch_modes_visit_images_or_identities():
    """8 ids x 8 images, P = 8, K = 4: an images-epoch cuts each id into 2 groups (2 batches of
    all 8 ids), an identities-epoch visits each id once (1 batch)."""
    pids = [i // 8 for i in range(64)]
    images = PKSampler(pids, 32, 4, seed=0, epoch_mode="images")
    identities = PKSampler(pids, 32, 4, seed=0, epoch_mode="identities")
    assert len(list(images)) == len(images) == 2 and len(list(identities)) == len(identities) == 1
    assert sorted(i for b in images for i in b) == list(range(64))  # every image once
    assert Counter(pids[i] for b in identities for i in b) == {p: 4 for p in range(8)}


@pytest.mark.parametrize("mode", ["images", "identities"])
def test_pk_epoch_uses_each_identity_with_exactly_k_images_once_without_repeats(mode):
    """8 identities with exactly K = 4 images, P = 4: an epoch is 2 batches, each identity in one,
    its 4 images all different (replacement only for identities with fewer than K images)."""
    pids = [i // 4 for i in range(32)]
    sampler = PKSampler(pids, batch_size=16, num_instances=4, seed=2, epoch_mode=mode)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 2
        assert sorted(pids[i] for b in batches for i in b) == sorted(pids)
        assert all(len(set(b)) == 16 for b in batches)


# ---- transforms ------------------------------------------------------------------------


def test_to_tensor_flip_normalize_by_hand():
    img = Image.fromarray(torch.tensor([[[0, 51, 255], [255, 102, 0]]], dtype=torch.uint8).numpy())  # 1 x 2 px
    x = to_tensor(img)
    assert x.shape == (3, 1, 2)
    assert torch.allclose(x[:, 0, 0], torch.tensor([0.0, 0.2, 1.0]))
    assert torch.equal(hflip(x)[:, 0, 0], x[:, 0, 1])
    y = normalize(x, [0.5, 0.2, 0.0], [0.5, 0.1, 2.0])
    assert torch.allclose(y[:, 0, 0], torch.tensor([-1.0, 0.0, 0.5]))


def test_resize_is_antialiased_bilinear():
    x = torch.rand(3, 40, 20)
    out = resize(x, 10, 5)
    ref = F.interpolate(x[None], size=(10, 5), mode="bilinear", align_corners=False, antialias=True)[0]
    assert out.shape == (3, 10, 5) and torch.allclose(out, ref)
    # Anti-aliasing: shrinking a fine checkerboard by 5 gives its mean, not a sample of it.
    board = (torch.arange(40)[:, None] + torch.arange(20)[None, :]) % 2
    assert torch.allclose(resize(board.float()[None], 8, 4), torch.full((1, 8, 4), 0.5), atol=0.03)  # plain bilinear: 0 or 1


def test_random_erasing_fills_one_rectangle_with_value():
    torch.manual_seed(0)
    x = torch.ones(3, 32, 16)
    out = RandomErasing(p=1.0, value=0.0)(x)
    erased = (out == 0).all(0)
    rows, cols = erased.any(1).nonzero(), erased.any(0).nonzero()
    assert erased.sum() > 0
    box = erased[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert box.all()  # one solid rectangle
    assert 0.02 * 512 * 0.5 <= erased.sum() <= 0.4 * 512 * 1.5
    assert torch.equal(RandomErasing(p=0.0)(x), x)


def test_build_transforms_train_and_test():
    img = Image.new("RGB", (16, 32), (255, 0, 0))
    test = build_transforms(64, 32, [0.5] * 3, [0.5] * 3, train=False)
    out = test(img)
    assert out.shape == (3, 64, 32) and torch.allclose(out[0], torch.ones(64, 32)) and torch.allclose(out[1], -torch.ones(64, 32))
    half = Image.new("RGB", (16, 32))
    half.paste((255, 255, 255), (0, 0, 8, 32))  # left half white
    train = build_transforms(32, 16, [0.0] * 3, [1.0] * 3, train=True, flip=True)
    torch.manual_seed(0)
    lefts = {round(float(train(half)[0, 16, 0]), 3) for _ in range(20)}
    assert lefts == {0.0, 1.0}  # flipped sometimes, not always


# ---- loaders ----------------------------------------------------------------------------


def data_cfg(**kw):
    base = dict(height=32, width=16, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225], flip=True,
                random_erasing=0.0, batch_size=8, num_instances=4, test_batch_size=16, workers=0,
                skip_bad_images=False)
    base.update(kw)
    return SimpleNamespace(**base)


def test_train_loader_workers0(synthetic_root: Path):
    ds = build_dataset("market1501", synthetic_root)
    loader = build_train_loader(data_cfg(), ds, seed=0)
    loader.batch_sampler.set_epoch(0)
    images, pids, camids, index = next(iter(loader))
    assert images.shape == (8, 3, 32, 16) and images.dtype == torch.float32
    assert sorted(Counter(pids.tolist()).values()) == [4, 4]
    assert all(ds.train[i][1] == p for i, p in zip(index.tolist(), pids.tolist()))


def test_test_loader_leaves_the_global_rng_alone(synthetic_root: Path):
    """Evaluating must not shift the training's augmentation stream that checkpoints save."""
    ds = build_dataset("market1501", synthetic_root)
    before = torch.get_rng_state()
    assert sum(len(b[1]) for b in build_test_loader(data_cfg(), ds.query)) == len(ds.query)
    assert torch.equal(torch.get_rng_state(), before)


def test_test_loader_with_a_worker_reads_zip_paths(synthetic_root: Path, tmp_path: Path):
    archive = tmp_path / "market1501.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted((synthetic_root / "market1501").rglob("*.jpg")):
            zf.write(f, f.relative_to(synthetic_root).as_posix())
    ds = build_dataset("market1501", archive)
    ImageDataset(ds.gallery, to_tensor)[0]  # opens the zip in this process before the worker forks
    loader = build_test_loader(data_cfg(workers=1), ds.gallery)
    assert loader.persistent_workers
    batches = list(loader)
    assert sum(len(b[1]) for b in batches) == len(ds.gallery)
    assert torch.cat([b[3] for b in batches]).tolist() == list(range(len(ds.gallery)))


def test_bad_image_in_loader_is_one_line_error_or_skipped(synthetic_root: Path):
    ds = build_dataset("market1501", synthetic_root)
    missing = str(synthetic_root / "market1501" / "query" / "0009_c1s1_999999_00.jpg")
    items = ds.query[:3] + [(missing, 9, 0)]
    with pytest.raises(DataError) as info:
        list(build_test_loader(data_cfg(workers=1), items))
    assert missing in str(info.value) and "\n" not in str(info.value) and "Traceback" not in str(info.value)
    loader = build_test_loader(data_cfg(skip_bad_images=True), items)
    batches = list(loader)
    assert sum(len(b[1]) for b in batches) == 3 and loader.bad_images == [missing]
